"""The samplers a pipeline can be given, by name (light: diffusers loads on first use), and DiT's timestep
spacing."""

from typing import Any, Dict

# name -> diffusers scheduler class
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M)
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    # flow-matching models (objective "flow")
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
}
#: DiT's respacing, ``space_timesteps(1000, "250")``, visits round(i * 999 / 249): 999, 995, ..., 4, 0, which is
#: diffusers' ``linspace`` spacing (its default ``leading`` visits 996 ... 0)
DIT_TIMESTEP_SPACING = "linspace"


def scheduler_from_name(name: str, config: Dict[str, Any]):
    """A scheduler of kind ``name`` built from another scheduler's ``config`` (same noise schedule)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    import diffusers

    if SCHEDULERS[name] != "DDPMScheduler":  # a learned variance (DDPM's variance_type) does not carry over
        config = {k: v for k, v in dict(config).items() if k != "variance_type"}
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def use_dit_timesteps(pipe) -> None:
    """Give ``pipe`` its scheduler with DiT's timestep spacing (:data:`DIT_TIMESTEP_SPACING`)."""
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=DIT_TIMESTEP_SPACING)


def set_sampler(pipe, name=None, learned_variance: bool = False) -> None:
    """Give ``pipe`` the ``name`` sampler (None keeps its own) built from its scheduler's config; with
    ``learned_variance``, DDPM with ``variance_type="learned_range"`` (the only sampler that uses it)."""
    if learned_variance:
        if name not in (None, "ddpm"):
            raise ValueError(f"--learned_variance samples with DDPM (variance_type learned_range), not --scheduler {name}")
        import diffusers

        pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config, variance_type="learned_range")
    elif name:
        pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    from nala_diffusion.diffusion.objectives import check_scheduler

    check_scheduler(pipe.transformer.config, pipe.scheduler)  # --scheduler flow_euler on a DDPM model, or the reverse


def apply_request_sampler(pipe, request) -> None:
    """The sampler a :class:`~nala_diffusion.pipelines.request.SamplingRequest` asks for (its ``scheduler``,
    DDPM with the learned variance, DiT's spacing under ``protocol="dit"``)."""
    set_sampler(pipe, request.scheduler, request.use_learned_variance)
    if request.protocol == "dit":
        use_dit_timesteps(pipe)
