"""What a model was trained to predict, and how a sampler talks to it.

Two objectives, recorded in the model's config (``objective``):

* ``"ddpm"``: DiT's linear beta schedule over 1,000 integer timesteps; the model predicts the noise (or
  v); DDPM-family schedulers (DDIM, DDPM, DPM-Solver++, Euler, ...) sample it.
* ``"flow"``: flow matching on the linear path ``x_sigma = (1 - sigma) x0 + sigma noise`` with velocity
  ``noise - x0``, as diffusers' ``FlowMatchEulerDiscreteScheduler``, SD3 and SANA define it; the
  model reads ``timestep = sigma x num_train_timesteps`` (1000: pure noise) and
  ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` sample it.

A flow model may keep another convention (``flow_convention``): ``"sit"`` is SiT's released code, whose
time runs the other way, ``t = 1 - sigma`` in [0, 1] (0: noise, 1: data), and whose velocity is
``x0 - noise``. :func:`model_timestep` and :func:`to_scheduler_velocity` translate between the
scheduler's convention and the model's, so a SiT checkpoint keeps its own interface
(``model(x, timestep=t, class_labels=y)`` is SiT's ``forward(x, t, y)``) and still samples with
diffusers' schedulers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

OBJECTIVES = ("ddpm", "flow")
#: the length of the training noise schedule (DiT's linear schedule; a flow model reads sigma x this)
NUM_TRAIN_TIMESTEPS = 1000
FLOW_CONVENTIONS = ("diffusers", "sit")
#: the timestep densities of ``diffusers.training_utils.compute_density_for_timestep_sampling``
WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")
#: the schedulers that sample a flow model (diffusers' flow-matching family)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def objective_of(config: Mapping[str, Any]) -> str:
    """The objective a model config records (configs without the key are DDPM models)."""
    return config.get("objective") or "ddpm"


def flow_convention_of(config: Mapping[str, Any]) -> str:
    return config.get("flow_convention") or "diffusers"


def is_flow_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` samples on the flow path (diffusers' ``FlowMatch*`` schedulers)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def scheduler_objective(scheduler) -> str:
    return "flow" if is_flow_scheduler(scheduler) else "ddpm"


def check_scheduler(config: Mapping[str, Any], scheduler) -> None:
    """Refuse a scheduler of the other objective (a DDPM scheduler on a flow model, or the reverse)."""
    model, sampler = objective_of(config), scheduler_objective(scheduler)
    if model != sampler:
        wanted = (" or ".join(FLOW_SCHEDULERS) if model == "flow"
                  else "a DDPM-family scheduler (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, ...)")
        raise ValueError(
            f"the model was trained with the {model!r} objective, but the scheduler {type(scheduler).__name__} samples "
            f"a {sampler!r} model; use {wanted}, e.g. pipe.scheduler = "
            f"{'FlowMatchEulerDiscreteScheduler()' if model == 'flow' else 'DDIMScheduler.from_config(...)'}")


def model_timestep(config: Mapping[str, Any], timesteps: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The timestep the model reads for the scheduler's ``timesteps``: unchanged, except for a flow model
    in SiT's convention, which reads ``1 - timesteps / num_train_timesteps`` (1 - sigma)."""
    if objective_of(config) == "flow" and flow_convention_of(config) == "sit":
        return 1.0 - torch.as_tensor(timesteps, dtype=torch.float32) / num_train_timesteps
    return timesteps


def to_scheduler_velocity(config: Mapping[str, Any], output: torch.Tensor) -> torch.Tensor:
    """The model's prediction in the scheduler's convention: SiT's velocity ``x0 - noise`` is negated to
    diffusers' ``noise - x0``; anything else is returned as it is. (Its own inverse.)"""
    if objective_of(config) == "flow" and flow_convention_of(config) == "sit":
        return -output
    return output


def scheduler_prediction(transformer, sample: torch.Tensor, timesteps: torch.Tensor,
                         num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, **model_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the model's mean prediction in the scheduler's convention, its variance channels, empty without a learned
    variance) at the scheduler's ``timesteps``: the model reads them in its own convention
    (:func:`model_timestep`) and its output is translated back (:func:`to_scheduler_velocity`), so a sampler
    never sees SiT's conventions."""
    config = transformer.config
    output = transformer(sample, timestep=model_timestep(config, timesteps, num_train_timesteps), **model_kwargs).sample
    channels = config.in_channels
    return to_scheduler_velocity(config, output[:, :channels]), output[:, channels:]


def noised(x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor, scheduler=None) -> torch.Tensor:
    """x_t from ``x0`` and ``noise``: the one function that noises data, for training, the measurement tools and
    the high-resolution pipeline's re-noising. On a DDPM schedule (a scheduler that is not flow-matching)
    ``scheduler.add_noise(x0, noise, times)`` at integer timesteps; on the flow path (``scheduler`` None or a
    flow-matching one) ``(1 - sigma) x0 + sigma noise`` with ``times`` the sigmas, as
    ``FlowMatchEulerDiscreteScheduler.scale_noise`` computes it. :func:`schedule_times` converts a scheduler's
    timesteps to these times."""
    if scheduler is not None and not is_flow_scheduler(scheduler):
        return scheduler.add_noise(x0, noise, times)
    sigmas = times.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - sigmas) * x0 + sigmas * noise


def schedule_times(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The times :func:`noised` takes for ``scheduler``'s timesteps: the timesteps themselves on a DDPM
    schedule, sigma = t / num_train_timesteps on the flow path."""
    if is_flow_scheduler(scheduler):
        return timesteps.float() / scheduler.config.num_train_timesteps
    return timesteps


@dataclass(frozen=True)
class Objective:
    """How training noises data, what the model's timestep input is and what it must predict, for one
    model config. DDPM draws integer timesteps uniformly and noises with ``scheduler.add_noise``; flow draws
    sigma from ``weighting_scheme`` (``compute_density_for_timestep_sampling``), on
    ``timestep_range / num_train_timesteps`` when a range is given."""

    name: str
    scheduler: Any  # the DDPM training schedule (``DDPMScheduler``), or None for flow
    prediction_type: str = "epsilon"
    timestep_range: Optional[Tuple[int, int]] = None
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    flow_convention: str = "diffusers"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @property
    def bounds(self) -> Tuple[int, int]:
        """(low, high): training timesteps lie in low <= t < high (for flow, sigma in [low, high) / T)."""
        return tuple(self.timestep_range or (0, self.num_train_timesteps))

    def draw(self, count: int, generator: torch.Generator, device) -> torch.Tensor:
        """Training times for ``count`` images: integer timesteps (DDPM) or sigmas in [0, 1] (flow)."""
        low, high = self.bounds
        if self.name == "ddpm":
            return torch.randint(low, high, (count,), generator=generator, device=device)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, count, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  device=device, generator=generator)
        return (low + u.float() * (high - low)) / self.num_train_timesteps

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(noisy input, the model's timestep input) at ``times`` from :meth:`draw`."""
        noisy = noised(x0, noise, times, self.scheduler)
        if self.name == "ddpm":
            return noisy, times
        return noisy, model_timestep(self.config, times * self.num_train_timesteps, self.num_train_timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """What the model should output, in its own convention."""
        if self.name == "ddpm":
            return denoising_target(self.config, x0, noise, self.scheduler, times)
        return denoising_target(self.config, x0, noise)

    @property
    def config(self) -> dict:
        """The model-config keys this objective stands for."""
        return {"objective": self.name, "flow_convention": self.flow_convention}

    def to_common(self, output: torch.Tensor) -> torch.Tensor:
        """A prediction in the diffusers convention (for comparing models of different conventions)."""
        return to_scheduler_velocity(self.config, output)

    def sampling_scheduler(self):
        """The scheduler a trained model is saved with: DDIM for DDPM (on the training schedule), flow-matching
        Euler for flow."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        if self.name == "ddpm":
            return DDIMScheduler.from_config(self.scheduler.config)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps)


def training_objective(config: Mapping[str, Any], *, prediction_type: str = "epsilon",
                       timestep_range: Optional[Sequence[int]] = None, clip_sample: bool = True,
                       weighting_scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Objective:
    """The :class:`Objective` of a model config: DDPM on DiT's linear schedule (beta 1e-4 .. 0.02), or flow."""
    name = objective_of(config)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
    scheduler = None
    if name == "ddpm":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
                                  beta_end=0.02, prediction_type=prediction_type, clip_sample=clip_sample)
    elif weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    return Objective(name, scheduler, prediction_type, tuple(timestep_range) if timestep_range else None,
                     num_train_timesteps, flow_convention_of(config), weighting_scheme, logit_mean, logit_std, mode_scale)


def denoising_target(config: Mapping[str, Any], x0: torch.Tensor, noise: torch.Tensor, scheduler=None,
                     timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the model predicts for ``x0`` noised with ``noise``, in its own convention, for the tools that
    score predictions at fixed timesteps: a DDPM model's target by its scheduler's ``prediction_type`` (the
    noise; v = sqrt(abar) noise - sqrt(1 - abar) x0 at ``timesteps``; x0 for ``"sample"``), a flow model's
    velocity (SiT's sign for SiT's)."""
    if objective_of(config) != "flow":
        prediction_type = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else "epsilon"
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            if timesteps is None:
                raise ValueError("the v-prediction target depends on the timestep: pass timesteps")
            return scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    velocity = noise - x0
    return -velocity if flow_convention_of(config) == "sit" else velocity


def noise_schedule_for(config: Mapping[str, Any], scheduler):
    """The schedule that noises inputs for a model at fixed timesteps (the measurement tools): a DDPM model's
    own training schedule (a ``DDPMScheduler`` from its sampler's config), or the flow scheduler itself."""
    check_scheduler(config, scheduler)
    if is_flow_scheduler(scheduler):
        return scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)


def clipping_step_kwargs(scheduler) -> dict:
    """Keywords that make a scheduler's step consistent where it clips its predicted x0 (pixel space,
    ``clip_sample`` or ``thresholding``): for DDIM, ``use_clipped_model_output=True``, so that the noise is
    recomputed from the clipped x0 as DiT's and ADM's ``ddim_sample`` do. diffusers' default keeps the
    unclipped noise beside the clipped x0, and the mismatch grows with the number of steps. DDPM's step needs
    nothing (its posterior mean is computed from the clipped x0); other schedulers get no keywords."""
    import inspect

    config = scheduler.config
    clips = bool(config.get("clip_sample") or config.get("thresholding"))
    if clips and "use_clipped_model_output" in inspect.signature(scheduler.step).parameters:
        return {"use_clipped_model_output": True}
    return {}
