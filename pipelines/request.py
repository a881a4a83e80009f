"""A sampling request: what to sample, as one frozen value, built once from flags or from Python.

:class:`SamplingRequest` holds every choice of a sampling run except the model and where images go:
labels, size, steps, guidance and its schedule, the sampler, the high-resolution mode, attention
sharpness, the seed and dtype. ``nala-sample`` and ``nala-fid`` build it from their flags
(:meth:`SamplingRequest.from_flags`), the pipelines' ``__call__`` from its keyword arguments. Its own
values are checked when it is made; :meth:`SamplingRequest.resolved` fills in what the pipeline decides (its
training size, its saved steps and guidance) and runs the pipeline's checks, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from nala_diffusion.models.options import POSITION_EMBEDDINGS
from nala_diffusion.pipelines.guidance import GUIDANCE_INTERVAL_UNITS, GuidanceSchedule

#: the steps and guidance a call uses when neither the call nor the pipeline's ``sampling_defaults`` say
#: otherwise (DiT's)
SAMPLING_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 4.0}
#: the high-resolution pipeline's modes
HIGHRES_MODES = ("direct", "progressive")
#: the dtypes a pipeline samples in, by name
DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: what ``--protocol dit`` fixes: DiT's evaluation (Peebles & Xie 2023, sample_ddp.py): 250 DDPM steps,
#: the learned variance, classifier-free guidance 1.5 on the first 3 latent channels
DIT_PROTOCOL = {"steps": 250, "scheduler": "ddpm", "guidance": 1.5, "guidance_channels": 3}
PROTOCOLS = ("dit",)

Label = Union[int, str]
Sharpness = Union[None, str, float]


@dataclass(frozen=True)
class SamplingRequest:
    """What to sample. ``None`` leaves a choice to the pipeline: ``labels`` to the tool (every class of a small
    model), ``height``/``width`` to its training size, ``steps``/``guidance`` to its ``sampling_defaults``
    (else :data:`SAMPLING_DEFAULTS`), ``scheduler`` to the one saved with it, ``position_embedding`` to its
    config. ``attention_sharpness`` is ``None``/``"off"``, ``"auto"`` or a factor per layer (a ``{layer:
    factor}`` mapping once calibrated)."""

    labels: Optional[Tuple[Label, ...]] = None
    images_per_label: int = 1
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    guidance_interval: Optional[Tuple[float, float]] = None
    guidance_interval_unit: str = "timestep"
    guidance_channels: Union[None, str, int] = None  # None: every mean channel ("all"), unless a protocol sets it
    use_learned_variance: bool = False
    scheduler: Optional[str] = None
    highres_mode: str = "direct"
    strength: float = 0.6
    position_embedding: Optional[str] = None
    attention_sharpness: Any = None
    seed: int = 0
    dtype: str = "float32"
    check_memory: bool = True
    protocol: Optional[str] = None

    def __post_init__(self):
        if self.labels is not None:
            labels = (self.labels,) if isinstance(self.labels, (int, str)) else tuple(self.labels)
            object.__setattr__(self, "labels", labels)
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))
        if isinstance(self.guidance_channels, str) and self.guidance_channels.isdigit():
            object.__setattr__(self, "guidance_channels", int(self.guidance_channels))  # "3", as the flag gives it
        for problem in self.problems():
            raise ValueError(problem)

    def problems(self) -> list:
        """What is wrong with the request's own values (what needs the model is :meth:`resolved`'s)."""
        from nala_diffusion.pipelines.schedulers import SCHEDULERS

        found = []  # sizes, steps, guidance and labels need the model: resolved() has the pipeline check them
        if self.guidance_interval_unit not in GUIDANCE_INTERVAL_UNITS:
            found.append(f"guidance_interval_unit must be one of {GUIDANCE_INTERVAL_UNITS}, "
                         f"got {self.guidance_interval_unit!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            found.append(f"unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        if self.use_learned_variance and self.scheduler not in (None, "ddpm"):
            found.append(f"--learned_variance samples with DDPM (variance_type learned_range), not --scheduler "
                         f"{self.scheduler}")
        if self.highres_mode not in HIGHRES_MODES:
            found.append(f"highres_mode must be one of {HIGHRES_MODES}, got {self.highres_mode!r}")
        if not 0 < self.strength <= 1:
            found.append(f"strength must be in (0, 1], got {self.strength}")
        if self.position_embedding not in (None, *POSITION_EMBEDDINGS):
            found.append(f"position_embedding must be one of {POSITION_EMBEDDINGS} or None, got "
                         f"{self.position_embedding!r}")
        if self.dtype not in DTYPE_NAMES:
            found.append(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.protocol not in (None, *PROTOCOLS):
            found.append(f"protocol must be one of {PROTOCOLS} or None, got {self.protocol!r}")
        return found

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, args) -> "SamplingRequest":
        """The request of a tool's parsed flags (``nala-sample``'s or ``nala-fid sample/calc``'s: the same names;
        a flag a tool lacks keeps the default)."""
        values = {"labels": args.labels, "height": args.height, "width": args.width, "steps": args.steps,
                  "guidance": args.guidance, "scheduler": args.scheduler, "highres_mode": args.highres_mode,
                  "position_embedding": args.position_embedding, "attention_sharpness": args.attention_sharpness,
                  "seed": args.seed, "check_memory": args.memory_check,
                  "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
                  "guidance_interval_unit": args.guidance_interval_unit,
                  "guidance_channels": args.guidance_channels,
                  "use_learned_variance": args.learned_variance}
        for name in ("images_per_label", "strength", "dtype", "protocol"):
            if getattr(args, name, None) is not None:
                values[name] = getattr(args, name)
        return cls(**values)

    def but(self, **changes) -> "SamplingRequest":
        """The same request with some choices changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def with_dit_protocol(self, learned_variance: bool) -> "SamplingRequest":
        """The request with what ``protocol="dit"`` fixes (:data:`DIT_PROTOCOL`); a choice given with another
        value is a ``ValueError``. ``learned_variance``: whether the model has variance channels (DiT's do; one
        without samples with fixed variance)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in DIT_PROTOCOL.items():
            given = getattr(self, name)
            if given != defaults[name] and given != value:
                flag = {"steps": "--steps", "scheduler": "--scheduler", "guidance": "--guidance",
                        "guidance_channels": "--guidance_channels"}[name]
                raise ValueError(f"--protocol dit fixes {flag} {value}; drop {flag} {given} or the protocol")
        if self.use_learned_variance and not learned_variance:
            raise ValueError("--learned_variance: this model has no variance channels (out_channels = in_channels); "
                             "--protocol dit samples it with fixed variance, so drop --learned_variance")
        return self.but(protocol="dit", use_learned_variance=learned_variance, **DIT_PROTOCOL)

    # -- against a pipeline ---------------------------------------------------------------------------------
    @property
    def guidance_schedule(self) -> GuidanceSchedule:
        return GuidanceSchedule(self.guidance_interval, self.guidance_interval_unit, self.channels,
                                self.use_learned_variance)

    @property
    def channels(self) -> Union[str, int]:
        """The guided channels as the pipelines take them: ``"all"`` or a count."""
        return "all" if self.guidance_channels is None else self.guidance_channels

    def resolved(self, pipe, output_type: str = "pt", callback_tensor_inputs=("latents",)) -> "SamplingRequest":
        """The request with the pipeline's choices filled in (size, steps, guidance) and every check the
        pipeline makes before sampling (sizes, steps, guidance and its schedule, the scheduler's objective)
        made once."""
        from nala_diffusion.diffusion.objectives import check_scheduler

        chosen = pipe.sampling_settings(self.steps, self.guidance)
        size = pipe.default_sample_size
        request = self.but(height=size if self.height is None else self.height, width=size if self.width is None else self.width,
                           steps=chosen["num_inference_steps"], guidance=chosen["guidance_scale"])
        pipe.check_inputs(request.height, request.width, request.steps, request.guidance, output_type,
                          request.images_per_label, callback_tensor_inputs)
        if request.labels is not None:
            pipe.get_label_ids(list(request.labels))  # unknown names and ids out of range
        check_scheduler(pipe.transformer.config, pipe.scheduler)
        request.guidance_schedule.check(pipe.scheduler, pipe.transformer.config.in_channels,
                                        pipe.transformer.out_channels)
        return request

    def guidance_kwargs(self) -> Dict[str, Any]:
        """The pipelines' guidance-schedule keyword arguments."""
        return {"guidance_interval": self.guidance_interval, "guidance_interval_unit": self.guidance_interval_unit,
                "guidance_channels": self.channels, "use_learned_variance": self.use_learned_variance}

    def pipeline_kwargs(self, highres: bool = True) -> Dict[str, Any]:
        """The keyword arguments of a pipeline call for this request (labels, generators and output type
        apart); ``highres``: with the high-resolution pipeline's mode and strength."""
        kwargs = {"height": self.height, "width": self.width, "num_inference_steps": self.steps,
                  "guidance_scale": self.guidance, "num_images_per_label": self.images_per_label,
                  "position_embedding": self.position_embedding, "attention_sharpness": self.attention_sharpness,
                  "check_memory": self.check_memory, **self.guidance_kwargs()}
        if highres:
            kwargs.update(highres_mode=self.highres_mode, strength=self.strength)
        return kwargs
