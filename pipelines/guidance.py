"""Classifier-free guidance as the pipelines apply it: the interval in which it applies (timesteps or
sigma), the channels it guides, and the learned variance it may carry along."""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from nala_diffusion.diffusion.objectives import is_flow_scheduler
from nala_diffusion.pipelines.inputs import is_integer

GUIDANCE_INTERVAL_UNITS = ("timestep", "sigma")
#: DDPMScheduler variance types that sample with the model's learned variance
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def sigma_of(t, scheduler) -> float:
    """The noise level of step ``t``: sqrt((1 - alpha_bar_t) / alpha_bar_t) on a DDPM schedule (EDM's sigma),
    ``t / num_train_timesteps`` on the flow path (the sigma of x = (1 - sigma) x0 + sigma noise)."""
    if is_flow_scheduler(scheduler):
        return float(t) / scheduler.config.num_train_timesteps
    alpha_bar = float(scheduler.alphas_cumprod[int(round(float(t)))])
    return math.sqrt((1 - alpha_bar) / alpha_bar)


@dataclass(frozen=True)
class GuidanceSchedule:
    """Where and how guidance applies.

    ``interval``: ``(low, high)``, guidance only at steps whose timestep (or sigma with ``unit="sigma"``:
    sqrt((1 - alpha_bar_t) / alpha_bar_t) for DDPM, t / 1000 in [0, 1] for flow; :func:`sigma_of`) lies in the closed interval; elsewhere the
    conditional branch runs alone. ``channels``: ``"all"`` mean channels, or the first k (DiT guides 3
    and keeps the conditional rest). ``use_learned_variance``: pass the model's variance channels to the
    scheduler (``DDPMScheduler(variance_type="learned_range")``)."""

    interval: Optional[Tuple[float, float]] = None
    unit: str = "timestep"
    channels: Union[str, int] = "all"
    use_learned_variance: bool = False

    @classmethod
    def from_call(cls, guidance_interval=None, guidance_interval_unit: str = "timestep",
                  guidance_channels: Union[str, int] = "all", use_learned_variance: bool = False) -> "GuidanceSchedule":
        """From the pipelines' keyword arguments."""
        return cls(guidance_interval, guidance_interval_unit, guidance_channels, use_learned_variance)

    def check(self, scheduler, in_channels: int, out_channels: int) -> None:
        """Refuse settings the model (``in_channels``, ``out_channels``) or the scheduler cannot honour."""
        if self.interval is not None:
            if len(self.interval) != 2 or not all(math.isfinite(float(v)) for v in self.interval):
                raise ValueError(f"guidance_interval must be (low, high), two finite numbers, got {self.interval!r}")
        if self.unit not in GUIDANCE_INTERVAL_UNITS:
            raise ValueError(f"guidance_interval_unit must be one of {GUIDANCE_INTERVAL_UNITS}, got {self.unit!r}")
        if self.unit == "sigma" and not is_flow_scheduler(scheduler) and getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"guidance_interval_unit='sigma' needs a scheduler with alphas_cumprod; "
                             f"{type(scheduler).__name__} has none")
        if self.interval is not None:
            low, high = (float(v) for v in self.interval)
            first, last = self.range(scheduler)
            if low > high or low < 0 or low > last or high < first:
                raise ValueError(
                    f"guidance_interval ({low:g}, {high:g}) in {self.unit} units must be (low, high) with "
                    f"0 <= low <= high, overlapping the schedule's {first:.4g} .. {last:.4g}; this one would turn "
                    "guidance off")
        if self.channels != "all" and (not is_integer(self.channels) or not 1 <= self.channels <= in_channels):
            raise ValueError(f"guidance_channels must be 'all' or a channel count in 1..{in_channels} (DiT guides 3), "
                             f"got {self.channels!r}")
        variance_type = getattr(scheduler.config, "variance_type", None)
        learns = variance_type in LEARNED_VARIANCE_TYPES
        if self.use_learned_variance:
            if out_channels != 2 * in_channels:
                raise ValueError("use_learned_variance needs a model with learned variance (out_channels = 2 x "
                                 f"in_channels); this one has out_channels {out_channels}")
            if not learns:
                raise ValueError(
                    f"use_learned_variance needs a scheduler that samples with it, DDPMScheduler(variance_type="
                    f"'learned_range'); this one is {type(scheduler).__name__} (variance_type {variance_type!r}). "
                    "Set pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type='learned_range')")
        elif learns:
            raise ValueError(f"the scheduler's variance_type is {variance_type!r}, which needs the model's variance: "
                             "pass use_learned_variance=True, or use a scheduler with a fixed variance")

    def range(self, scheduler) -> Tuple[float, float]:
        """The smallest and largest value a step can have in this unit (timesteps 0 .. T - 1, or their sigma;
        a flow scheduler's timesteps run to T, its sigma = t / T from 0 to 1)."""
        last_step = scheduler.config.num_train_timesteps - (0 if is_flow_scheduler(scheduler) else 1)
        if self.unit == "timestep":
            return 0.0, float(last_step)
        return sigma_of(0, scheduler), sigma_of(last_step, scheduler)

    def applies_at(self, t, scheduler) -> bool:
        """Whether step ``t`` lies inside the interval (always, without one)."""
        if self.interval is None:
            return True
        value = sigma_of(t, scheduler) if self.unit == "sigma" else float(t)
        low, high = (float(v) for v in self.interval)
        return low <= value <= high

    def check_steps(self, timesteps, scheduler) -> None:
        """Refuse an interval that holds none of the sampled ``timesteps``."""
        if self.interval is not None and not any(self.applies_at(t, scheduler) for t in timesteps):
            raise ValueError(f"guidance_interval {tuple(self.interval)} ({self.unit}) holds none of the "
                             f"{len(timesteps)} sampled steps ({[int(t) for t in timesteps][:6]} ...), so guidance "
                             "would never apply; widen it or sample with more steps")

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """uncond + scale (cond - uncond) on the guided channels; the conditional prediction on the rest."""
        if self.channels == "all":
            return uncond + scale * (cond - uncond)
        k = int(self.channels)  # 3.0 is 3
        return torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
