"""Sampler and guidance choices of the command-line tools, by name (light: diffusers loads on first use)."""

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
# the high-resolution pipeline's modes
HIGHRES_MODES = ("direct", "progressive")


def scheduler_from_name(name: str, config: Dict[str, Any]):
    """A scheduler of kind ``name`` built from another scheduler's ``config`` (same noise schedule)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    import diffusers

    if SCHEDULERS[name] != "DDPMScheduler":  # a learned variance (DDPM's variance_type) does not carry over
        config = {k: v for k, v in dict(config).items() if k != "variance_type"}
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)

GUIDANCE_CHANNEL_CHOICES = ("all", "3")
#: what ``--protocol dit`` fixes: DiT's evaluation (Peebles & Xie 2023, sample_ddp.py): 250 DDPM steps,
#: the learned variance, classifier-free guidance 1.5 on the first 3 latent channels
DIT_PROTOCOL = {"steps": 250, "scheduler": "ddpm", "guidance": 1.5, "guidance_channels": "3"}
#: DiT's respacing, ``space_timesteps(1000, "250")``, visits round(i * 999 / 249): 999, 995, ..., 4, 0, which is
#: diffusers' ``linspace`` spacing (its default ``leading`` visits 996 ... 0)
DIT_TIMESTEP_SPACING = "linspace"


def use_dit_timesteps(pipe) -> None:
    """Give ``pipe`` its scheduler with DiT's timestep spacing (:data:`DIT_TIMESTEP_SPACING`)."""
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=DIT_TIMESTEP_SPACING)


def add_guidance_args(parser) -> None:
    """The guidance-schedule and learned-variance flags, each under both spellings (``--guidance_interval``,
    as every tool spells its flags, and ``--guidance-interval``)."""

    def names(flag):
        return f"--{flag}", f"--{flag.replace('_', '-')}"

    parser.add_argument(*names("guidance_interval"), dest="guidance_interval", type=float, nargs=2, default=None,
                        metavar=("LOW", "HIGH"),
                        help="guide only at steps whose timestep (or sigma, --guidance_interval_unit) is in [LOW, HIGH]; "
                             "elsewhere the conditional branch runs alone (default: every step)")
    parser.add_argument(*names("guidance_interval_unit"), dest="guidance_interval_unit", choices=("timestep", "sigma"),
                        default="timestep", help="unit of --guidance_interval")
    parser.add_argument(*names("guidance_channels"), dest="guidance_channels", choices=GUIDANCE_CHANNEL_CHOICES,
                        default=None, help="'all' mean channels (diffusers' DiTPipeline; the default) or '3' (DiT's own "
                                           "sampler)")
    parser.add_argument(*names("learned_variance"), dest="learned_variance", action="store_true",
                        help="sample with the model's learned variance (DDPM, variance_type learned_range; models with "
                             "out_channels = 2 x in_channels)")


def guidance_kwargs(args) -> Dict[str, Any]:
    """The pipeline keyword arguments of the flags of :func:`add_guidance_args`."""
    return {"guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
            "guidance_interval_unit": args.guidance_interval_unit,
            "guidance_channels": "all" if args.guidance_channels in (None, "all") else int(args.guidance_channels),
            "use_learned_variance": args.learned_variance}


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
