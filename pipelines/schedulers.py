"""Sampler choices by name, for the command-line tools (light: diffusers loads on first use)."""

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
}
# the high-resolution pipeline's modes
HIGHRES_MODES = ("direct", "progressive")


def scheduler_from_name(name: str, config: Dict[str, Any]):
    """A scheduler of kind ``name`` built from another scheduler's ``config`` (same noise schedule)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)
