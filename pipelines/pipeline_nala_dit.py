"""NaLaDiTPipeline: class-conditional sampling with a NaLa DiT, in latent or pixel space.

Every saved folder opens with diffusers' generic loader, ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` (see :mod:`~nala_diffusion.pipelines.loader_file`). The file also works as a
diffusers community pipeline (``custom_pipeline="pipelines/pipeline_nala_dit.py"``), so it holds
exactly one ``DiffusionPipeline`` subclass and imports the rest by absolute path.
"""

import inspect
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

# pipeline folders saved before the sub-packages name this module as the transformer's library, and
# diffusers loads a component only from a module that is already imported
import nala_diffusion.model  # noqa: F401
from nala_diffusion.diffusion.noising import noised_copies
from nala_diffusion.models.loading import check_loaded_weights
from nala_diffusion.models.sharpness import (
    SHARPNESS_MODES,
    attention_sharpness_of,
    resolution_sharpness,
    set_attention_sharpness,
)
from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel
from nala_diffusion.pipelines.loader_file import carries_own_loader, write_loader_file
from nala_diffusion.utils.files import follow_umask

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_INTERVAL_UNITS = ("timestep", "sigma")
#: DDPMScheduler variance types that sample with the model's learned variance
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# what ``__call__`` uses when neither the call nor the pipeline's ``sampling_defaults`` say otherwise (DiT's)
SAMPLING_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 4.0}
LabelArg = Union[int, str, Sequence[Union[int, str]]]
SharpnessArg = Optional[Union[str, float, Mapping[str, float]]]
# noise levels of the calibration inputs of attention_sharpness="auto"
SHARPNESS_TIMESTEPS = (250, 500, 750)


@dataclass
class NaLaPipelineOutput(ImagePipelineOutput):
    """``images``, and with ``attention_sharpness`` set, ``attention_report``: the training grid, the
    sampled grid and each layer's sharpness (see :meth:`NaLaDiTPipeline.set_resolution_sharpness`)."""

    attention_report: Optional[Dict[str, Any]] = None

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> from nala_diffusion import NaLaDiTPipeline, NaLaDiTTransformer2DModel

        >>> transformer = NaLaDiTTransformer2DModel.from_preset("S/4", in_channels=3, sample_size=32, num_classes=2)
        >>> pipe = NaLaDiTPipeline(transformer, DDIMScheduler(), id2label={0: "cat", 1: "dog"})
        >>> images = pipe(["cat", 1], num_inference_steps=4, generator=torch.manual_seed(0)).images
        >>> images[0].size
        (32, 32)
        >>> pipe(["dog"], height=32, width=64, num_inference_steps=4, output_type="np").images.shape
        (1, 32, 64, 3)

        ```
"""


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device``: CUDA's ``mem_get_info``, or the system's available memory for the CPU
    (``/proc/meminfo``'s MemAvailable, else free pages); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _is_integer(value) -> bool:
    """An integral number of any type (int, numpy or 0-d torch integers, 3.0), not a bool."""
    if isinstance(value, bool):
        return False
    if torch.is_tensor(value):
        return value.ndim == 0 and (not value.is_floating_point() or float(value).is_integer())
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()


def _flatten(labels) -> list:
    if torch.is_tensor(labels):
        return list(labels.flatten())
    flat = []
    for label in labels:
        if isinstance(label, (list, tuple)) or torch.is_tensor(label) and label.ndim > 0:
            flat.extend(_flatten(label))
        else:
            flat.append(label)
    return flat


class NaLaDiTPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with a :class:`~nala_diffusion.NaLaDiTTransformer2DModel`.

    Args:
        transformer: the denoiser; its config's ``num_classes`` is the null class for guidance.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver++, Euler, ...).
        vae: optional ``AutoencoderKL``; without one a 3-channel transformer works in pixel space (in
            [-1, 1]), and any other returns latents only (``output_type="latent"``).
        id2label: class names, ``{id: "name"}`` or ``{id: "name, synonym"}`` as in DiT; saved in
            ``model_index.json``, so names survive ``save_pretrained``.
        sampling_defaults: the sampler settings this model was measured with, e.g.
            ``{"num_inference_steps": 25, "guidance_scale": 2.0}``; saved in ``model_index.json`` and
            used by ``__call__`` (and the command-line tools) when a call leaves them out. Unset keys
            fall back to DiT's 50 steps and guidance 4.0.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: NaLaDiTTransformer2DModel,
        scheduler: SchedulerMixin,
        vae: Optional[AutoencoderKL] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
        sampling_defaults: Optional[Dict[str, Union[int, float]]] = None,
    ):
        super().__init__()
        if not isinstance(transformer, NaLaDiTTransformer2DModel):
            raise ValueError(
                f"the transformer is a {type(transformer).__name__}; this pipeline needs a NaLaDiTTransformer2DModel. "
                "Convert a diffusers DiT with nala_diffusion.convert_dit_to_nala(dit) (attention_type='softmax' keeps "
                "its outputs exactly) and save that, or load the folder with diffusers' DiTPipeline")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        num_classes = transformer.config.num_classes
        bad = [k for k in id2label if not 0 <= k < num_classes]
        if bad:
            raise ValueError(f"id2label has ids {bad} outside the model's classes 0..{num_classes - 1}")
        self.register_to_config(id2label={str(k): v for k, v in sorted(id2label.items())})
        self.id2label = id2label
        sampling_defaults = dict(sampling_defaults or {})
        unknown = sorted(set(sampling_defaults) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(f"sampling_defaults: unknown keys {unknown}; allowed: {sorted(SAMPLING_DEFAULTS)}")
        self.register_to_config(sampling_defaults=sampling_defaults)
        self.labels = {name.strip(): k for k, v in id2label.items() for name in v.split(",") if name.strip()}
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, then a check of every loaded model: a missing tensor
        (left uninitialised by diffusers, with only a warning) or a NaN/inf value raises a
        ``ValueError`` naming it. A folder's loader file (:mod:`~nala_diffusion.pipelines.loader_file`)
        is trusted without ``trust_remote_code`` only when all it does is import this package's pipeline."""
        if not kwargs.get("trust_remote_code") and carries_own_loader(pretrained_model_name_or_path, kwargs):
            kwargs["trust_remote_code"] = True  # the folder's loader file imports this installed package, nothing else
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not isinstance(pipe, cls):  # the loader file names the base class; a subclass takes its components
            pipe = cls(**pipe.components, id2label=pipe.id2label, sampling_defaults=pipe.config.get("sampling_defaults"))
            pipe.register_to_config(_name_or_path=pretrained_model_name_or_path)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                check_loaded_weights(component, os.path.join(str(pretrained_model_name_or_path), name))
        return pipe

    def sampling_settings(
        self, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None
    ) -> Dict[str, Union[int, float]]:
        """The steps and guidance a call uses: the arguments, else the pipeline's ``sampling_defaults``,
        else DiT's (50 steps, guidance 4.0)."""
        chosen = {**SAMPLING_DEFAULTS, **(self.config.get("sampling_defaults") or {})}
        if num_inference_steps is not None:
            chosen["num_inference_steps"] = num_inference_steps
        if guidance_scale is not None:
            chosen["guidance_scale"] = guidance_scale
        return chosen

    # -- labels and sizes ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    def get_label_ids(self, labels: LabelArg) -> List[int]:
        """Class ids for labels given as ids, names from ``id2label``, or a list of either."""
        if isinstance(labels, (int, str)) or torch.is_tensor(labels) and labels.ndim == 0:
            labels = [labels]
        labels = _flatten(labels)  # [[1], [2]], as DiTPipeline takes it, is [1, 2]
        if len(labels) == 0:
            raise ValueError("class_labels is empty; give at least one class id or name")
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label not in self.labels:
                    known = ", ".join(sorted(self.labels)[:20]) or "none: this pipeline has no id2label"
                    raise ValueError(f"class_labels: unknown label name {label!r}; known names: {known}")
                ids.append(self.labels[label])
                continue
            if not _is_integer(label):
                raise ValueError(f"class_labels: {label!r} is not a class id (an integer) or a name")
            label = int(label)
            if not 0 <= label < self.num_classes:
                raise ValueError(f"class_labels: id {label} is out of range; allowed ids are 0..{self.num_classes - 1}")
            ids.append(label)
        return ids

    def estimated_bytes(self, height: int, width: int, images: int, guidance: bool = True) -> int:
        """A lower estimate of the memory one denoising step needs at ``height`` x ``width`` for
        ``images`` images: the transformer's widest activations (the MLP's 4x hidden plus the block
        input, queries, keys and values) for every token, in the model's dtype, twice with guidance."""
        config = self.transformer.config
        tokens = (height // self.size_unit) * (width // self.size_unit)
        hidden = config.num_attention_heads * config.attention_head_dim
        element = torch.finfo(self.transformer.dtype).bits // 8
        return (2 if guidance else 1) * images * tokens * hidden * (4 + 4) * element

    def check_memory(self, height: int, width: int, images: int, guidance: bool = True) -> None:
        """Refuse a size whose :meth:`estimated_bytes` exceeds the memory this device has free (CUDA:
        ``mem_get_info``; CPU: the system's available memory), before anything is sampled or written."""
        needed = self.estimated_bytes(height, width, images, guidance)
        device = self._execution_device
        free = available_memory(device)
        if free is not None and needed > free:
            raise ValueError(
                f"{height}x{width} x {images} image(s) needs at least {needed / 2**30:.1f} GiB for its activations, "
                f"more than the {free / 2**30:.1f} GiB free on {device}; sample fewer or smaller images (a smaller "
                "--batch_size), or pass check_memory=False (--no_memory_check) to try anyway")

    @property
    def size_unit(self) -> int:
        """Height and width must be multiples of this: the patch size times the VAE's downsampling."""
        return self.transformer.config.patch_size * self.vae_scale_factor

    @property
    def default_sample_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def check_inputs(self, height, width, num_inference_steps, guidance_scale, output_type, num_images_per_label,
                     callback_on_step_end_tensor_inputs=("latents",)):
        unit = self.size_unit
        for name, value in (("height", height), ("width", width)):
            if not _is_integer(value) or value <= 0 or value % unit:
                raise ValueError(f"{name}={value} must be a positive multiple of {unit} (patch size x VAE factor)")
        if not _is_integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        schedule = getattr(self.scheduler.config, "num_train_timesteps", None)
        if schedule is not None and num_inference_steps > schedule:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds the scheduler's {schedule} training "
                             "timesteps; sample with at most that many steps")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 disables guidance), got {guidance_scale}")
        bad_inputs = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {sorted(bad_inputs)} not in {self._callback_tensor_inputs}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        channels = self.transformer.config.in_channels
        if output_type == "pil" and self.vae is None and channels != 3:
            raise ValueError(
                f"this pipeline has no vae and its transformer works on {channels}-channel latents, which cannot be "
                "shown as images: give it a vae, or ask for output_type='latent' (or 'np'/'pt', which return them)"
            )
        if not _is_integer(num_images_per_label) or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be an integer >= 1, got {num_images_per_label}")

    def prepare_latents(self, batch_size, height, width, generator, latents=None):
        channels = self.transformer.config.in_channels
        shape = (batch_size, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        device, dtype = self._execution_device, self.transformer.dtype
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch_size:
                raise ValueError(f"generator: got a list of {len(generator)} generators for {batch_size} images")
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; for this call they must be {shape}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # -- what a callback_on_step_end may read, as in diffusers' pipelines --------------------------
    @property
    def guidance_scale(self) -> Optional[float]:
        """The guidance scale of the running (or last) denoising loop."""
        return getattr(self, "_guidance_scale", None)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    @property
    def num_timesteps(self) -> Optional[int]:
        """The length of the running (or last) denoising loop's schedule."""
        return getattr(self, "_num_timesteps", None)

    # -- the denoising loop, shared with the high-resolution pipeline -----------------------------
    def _step_kwargs(self, generator) -> Dict[str, Any]:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepted else {}

    def check_guidance(self, guidance_interval=None, guidance_interval_unit: str = "timestep",
                       guidance_channels: Union[str, int] = "all", use_learned_variance: bool = False) -> None:
        """Refuse guidance and variance settings this pipeline's model or scheduler cannot honour."""
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or not all(math.isfinite(float(v)) for v in guidance_interval):
                raise ValueError(f"guidance_interval must be (low, high), two finite numbers, got {guidance_interval!r}")
        if guidance_interval_unit not in GUIDANCE_INTERVAL_UNITS:
            raise ValueError(f"guidance_interval_unit must be one of {GUIDANCE_INTERVAL_UNITS}, got {guidance_interval_unit!r}")
        if guidance_interval_unit == "sigma" and getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"guidance_interval_unit='sigma' needs a scheduler with alphas_cumprod; "
                             f"{type(self.scheduler).__name__} has none")
        if guidance_interval is not None:
            low, high = (float(v) for v in guidance_interval)
            first, last = self.interval_range(guidance_interval_unit)
            if low > high or low < 0 or low > last or high < first:
                raise ValueError(
                    f"guidance_interval ({low:g}, {high:g}) in {guidance_interval_unit} units must be (low, high) with "
                    f"0 <= low <= high, overlapping the schedule's {first:.4g} .. {last:.4g}; this one would turn "
                    "guidance off")
        channels = self.transformer.config.in_channels
        if guidance_channels != "all" and (not _is_integer(guidance_channels) or not 1 <= guidance_channels <= channels):
            raise ValueError(f"guidance_channels must be 'all' or a channel count in 1..{channels} (DiT guides 3), "
                             f"got {guidance_channels!r}")
        variance_type = getattr(self.scheduler.config, "variance_type", None)
        learns = variance_type in LEARNED_VARIANCE_TYPES
        if use_learned_variance:
            if self.transformer.out_channels != 2 * channels:
                raise ValueError("use_learned_variance needs a model with learned variance (out_channels = 2 x "
                                 f"in_channels); this one has out_channels {self.transformer.out_channels}")
            if not learns:
                raise ValueError(
                    f"use_learned_variance needs a scheduler that samples with it, DDPMScheduler(variance_type="
                    f"'learned_range'); this one is {type(self.scheduler).__name__} (variance_type {variance_type!r}). "
                    "Set pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type='learned_range')")
        elif learns:
            raise ValueError(f"the scheduler's variance_type is {variance_type!r}, which needs the model's variance: "
                             "pass use_learned_variance=True, or use a scheduler with a fixed variance")

    def interval_range(self, unit: str) -> Tuple[float, float]:
        """The smallest and largest value a step can have in ``unit`` (timesteps 0 .. T - 1, or their sigma)."""
        last_step = self.scheduler.config.num_train_timesteps - 1
        if unit == "timestep":
            return 0.0, float(last_step)
        alphas = self.scheduler.alphas_cumprod
        return tuple(math.sqrt((1 - float(alphas[t])) / float(alphas[t])) for t in (0, last_step))

    def guided_at(self, t, guidance_interval, guidance_interval_unit: str = "timestep") -> bool:
        """Whether step ``t`` lies inside ``guidance_interval`` (closed; timesteps, or sigma =
        sqrt((1 - alpha_bar_t) / alpha_bar_t) with ``guidance_interval_unit="sigma"``)."""
        if guidance_interval is None:
            return True
        value = float(t)
        if guidance_interval_unit == "sigma":
            alpha_bar = float(self.scheduler.alphas_cumprod[int(round(value))])
            value = math.sqrt((1 - alpha_bar) / alpha_bar)
        low, high = (float(v) for v in guidance_interval)
        return low <= value <= high

    def denoise(
        self,
        latents: torch.Tensor,
        class_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance_scale: float,
        generator=None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        position_embedding: Optional[str] = None,
        description: Optional[str] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
        guidance_interval_unit: str = "timestep",
        guidance_channels: Union[str, int] = "all",
        use_learned_variance: bool = False,
    ) -> torch.Tensor:
        """Run the scheduler over ``timesteps`` from ``latents``; returns the final latents. Steps outside
        ``guidance_interval`` run the conditional branch alone (see :meth:`__call__`)."""
        do_guidance = guidance_scale != 1.0
        self._guidance_scale, self._num_timesteps = guidance_scale, len(timesteps)
        channels = self.transformer.config.in_channels
        null = torch.full_like(class_ids, self.transformer.null_class_label)
        both_ids = torch.cat([class_ids, null])  # (2B,): conditional, then unconditional
        step_kwargs = self._step_kwargs(generator)
        if do_guidance and guidance_interval is not None and not any(
                self.guided_at(t, guidance_interval, guidance_interval_unit) for t in timesteps):
            raise ValueError(f"guidance_interval {tuple(guidance_interval)} ({guidance_interval_unit}) holds none of the "
                             f"{len(timesteps)} sampled steps ({[int(t) for t in timesteps][:6]} ...), so guidance "
                             f"{guidance_scale} would never apply; widen it or sample with more steps")
        progress = self.progress_bar(total=len(timesteps))
        if description:
            progress.set_description(description)
        with progress:
            for i, t in enumerate(timesteps):
                guided = do_guidance and self.guided_at(t, guidance_interval, guidance_interval_unit)
                model_input = torch.cat([latents, latents]) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                timestep = t.expand(model_input.shape[0]).to(model_input.device) if torch.is_tensor(t) else t
                output = self.transformer(
                    model_input, timestep=timestep, class_labels=both_ids if guided else class_ids,
                    position_embedding=position_embedding,
                ).sample  # (B or 2B, C or 2C, h, w)
                prediction, variance = output[:, :channels], output[:, channels:]  # the mean; v of a learned variance
                if guided:
                    cond, uncond = prediction.chunk(2)
                    if guidance_channels == "all":
                        prediction = uncond + guidance_scale * (cond - uncond)
                    else:  # DiT's own code guides its first 3 channels and keeps the conditional rest
                        k = int(guidance_channels)  # 3.0 is 3
                        prediction = torch.cat([uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k]),
                                                cond[:, k:]], dim=1)
                    variance = variance.chunk(2)[0]  # the conditional branch's, as DiT samples
                if use_learned_variance:  # DDPMScheduler(variance_type="learned_range") splits the two halves
                    prediction = torch.cat([prediction, variance], dim=1)
                latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    outputs = callback_on_step_end(
                        self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    ) or {}
                    latents = outputs.get("latents", latents)
                progress.update()
        return latents

    # -- resolution-aware attention sharpness ---------------------------------------------------
    @torch.no_grad()
    def set_resolution_sharpness(self, attention_sharpness: SharpnessArg, height: int, width: int, class_ids: torch.Tensor,
                                 num_inference_steps: int = 10, position_embedding: Optional[str] = None,
                                 content: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """Set the attention sharpness for sampling at ``height`` x ``width``; returns the report
        (``None`` when off).

        ``attention_sharpness``: ``None``/``"off"`` (1, the attention as trained), a positive number
        for every layer, or ``"auto"``: on a grid of N tokens instead of the training n, softmax
        layers scale their logits by sqrt(log N / log n) and NaLa layers their power by a factor
        calibrated on this model so that each layer's mean attention entropy per query at N equals
        the one at n. The calibration content is a short sample (2 images of ``class_ids``, at most 10
        steps, seed 0) at the training size, noised at :data:`SHARPNESS_TIMESTEPS` at both sizes;
        pass the same ``content`` dict to calls for several sizes (progressive stages) to draw it once.
        """
        model = self.transformer
        if attention_sharpness is None or attention_sharpness == "off":
            set_attention_sharpness(model, 1.0)
            return None
        train_rows, train_cols = model.training_grid
        rows, cols = height // self.size_unit, width // self.size_unit
        report = {"training_grid": [train_rows, train_cols], "grid": [rows, cols], "setting": attention_sharpness}
        if isinstance(attention_sharpness, str):
            if attention_sharpness not in SHARPNESS_MODES:
                raise ValueError(f"attention_sharpness must be one of {SHARPNESS_MODES} or a positive number, "
                                 f"got {attention_sharpness!r}")
            if rows * cols == train_rows * train_cols:  # nothing to calibrate: every factor is 1
                train_inputs = target_inputs = {}
            else:
                train_inputs, target_inputs = self._sharpness_inputs(class_ids, height, width, num_inference_steps,
                                                                     position_embedding, content)
            report["layers"] = resolution_sharpness(model, train_rows * train_cols, rows * cols, train_inputs, target_inputs)
            return report
        # a factor for every layer, or {layer: factor} (e.g. the factors of an earlier "auto" report)
        set_attention_sharpness(model, attention_sharpness if isinstance(attention_sharpness, Mapping)
                                else float(attention_sharpness))
        report["layers"] = {name: {"sharpness": value} for name, value in attention_sharpness_of(model).items()}
        return report

    def _sharpness_inputs(self, class_ids, height, width, num_inference_steps, position_embedding, content=None):
        """Model inputs with the same content at the training size and at height x width; the content
        (and the generator's state after drawing it) is kept in ``content`` when given."""
        device = self._execution_device
        ids = class_ids[:2]
        generator = torch.Generator(device).manual_seed(0)
        if content is not None and "clean" in content:
            clean = content["clean"]
            generator.set_state(content["generator_state"])
        else:
            size = self.default_sample_size
            set_attention_sharpness(self.transformer, 1.0)
            latents = self.prepare_latents(len(ids), size, size, generator)
            self.scheduler.set_timesteps(min(num_inference_steps, 10), device=device)
            clean = self.denoise(latents, ids, self.scheduler.timesteps, guidance_scale=1.0, generator=generator,
                                 description="calibrating attention sharpness")  # (2, C, h, w)
            if content is not None:
                content.update(clean=clean, generator_state=generator.get_state())
        shape = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        large = F.interpolate(clean.float(), size=shape, mode="bicubic", align_corners=False).to(clean.dtype)
        noising = DDPMScheduler.from_config(self.scheduler.config)
        inputs = []
        for x0 in (clean, large):
            noisy, _, steps = noised_copies(noising, x0, SHARPNESS_TIMESTEPS, generator)
            inputs.append({"hidden_states": noisy, "timestep": steps,
                           "class_labels": ids.repeat(len(SHARPNESS_TIMESTEPS)), "position_embedding": position_embedding})
        return inputs

    @staticmethod
    def check_finite(values: torch.Tensor, what: str) -> None:
        """Refuse NaN/inf samples (they would be written as black images), naming how many and the usual causes."""
        bad = ~torch.isfinite(values.float()).flatten(1).all(dim=1)  # (B,)
        if bool(bad.any()):
            raise ValueError(
                f"sampling produced NaN or inf {what} in {int(bad.sum())} of {len(bad)} images (indices "
                f"{bad.nonzero().flatten().tolist()[:8]}); usual causes: a huge guidance_scale, NaN/inf in the given "
                "latents, or float16 overflow (sample in float32 or bfloat16). Nothing was returned.")

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents to images of ``output_type`` (``latent`` returns them unchanged); NaN or inf values,
        before or after the VAE, are a ``ValueError``."""
        self.check_finite(latents, "latents")
        if output_type == "latent":
            return latents
        if self.vae is None and latents.shape[1] != 3:  # latents with no VAE to decode them: returned as they are
            warnings.warn(f"this pipeline has no vae to decode its {latents.shape[1]}-channel latents; output_type="
                          f"{output_type!r} returns the latents themselves", stacklevel=3)
            return latents.float().permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else latents
        if self.vae is not None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
            images = self.vae.decode(latents).sample
            self.check_finite(images, "decoded pixels")
        else:
            images = latents  # pixel space, in [-1, 1]
        return self.image_processor.postprocess(images.float(), output_type=output_type)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: LabelArg,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        num_images_per_label: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict[str, Any]]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers' convention)
        position_embedding: Optional[str] = None,
        attention_sharpness: SharpnessArg = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
        guidance_interval_unit: str = "timestep",
        guidance_channels: Union[str, int] = "all",
        use_learned_variance: bool = False,
        check_memory: bool = True,
    ):
        r"""Generate images of the given classes.

        Args:
            class_labels (`int`, `str` or a list of them):
                Class ids, or names from ``id2label``; one image per entry and ``num_images_per_label``.
            height (`int`, *optional*, defaults to `None`):
                Image height in pixels; `None` means the training size. Any positive multiple of the patch
                size times the VAE factor.
            width (`int`, *optional*, defaults to `None`):
                Image width in pixels, as ``height``; non-square sizes are allowed.
            num_inference_steps (`int`, *optional*, defaults to `None`):
                Number of denoising steps (at least 1); `None` takes the pipeline's ``sampling_defaults``
                (50 if it has none).
            guidance_scale (`float`, *optional*, defaults to `None`):
                Classifier-free guidance against the null class; `1.0` skips the unconditional half.
                `None` takes the pipeline's ``sampling_defaults`` (4.0 if it has none).
            num_images_per_label (`int`, *optional*, defaults to `1`):
                Images generated for each entry of ``class_labels``.
            generator (`torch.Generator` or a list of them, *optional*, defaults to `None`):
                Random source; a list gives one generator per image.
            latents (`torch.Tensor`, *optional*, defaults to `None`):
                Starting noise of shape (images, channels, height / VAE factor, width / VAE factor).
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` (B, H, W, 3 in [0, 1]), `"pt"` (B, 3, H, W in [0, 1]) or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*, defaults to `None`):
                Called as ``callback(pipe, step, timestep, callback_kwargs)`` after each step; may return
                ``{"latents": ...}`` to replace the latents.
            callback_on_step_end_tensor_inputs (`List[str]`, *optional*, defaults to `["latents"]`):
                Tensors passed in ``callback_kwargs``.
            position_embedding (`str`, *optional*, defaults to `None`):
                `"interpolate"` (positions squeezed into the training range) or `"extend"` (positions
                beyond it, for models trained at several sizes) for sizes other than the training size;
                `None` uses the transformer's config.
            attention_sharpness (`str` or `float`, *optional*, defaults to `None`):
                `None`/`"off"`, `"auto"` (resolution-aware: keeps each layer's attention entropy at its
                training level above the training size) or a factor for every layer; see
                :meth:`set_resolution_sharpness`. Reset after the call.
            guidance_interval (`tuple`, *optional*, defaults to `None`):
                ``(low, high)``: classifier-free guidance only at steps whose timestep (or sigma, see
                ``guidance_interval_unit``) lies in the closed interval; outside it the conditional branch
                runs alone, with no unconditional pass (Kynkaanniemi et al. 2024). `None` guides every step.
            guidance_interval_unit (`str`, *optional*, defaults to `"timestep"`):
                `"timestep"` or `"sigma"` (sqrt((1 - alpha_bar_t) / alpha_bar_t), the EDM noise level).
            guidance_channels (`str` or `int`, *optional*, defaults to `"all"`):
                `"all"` guides every mean channel (diffusers' DiTPipeline); `3` reproduces DiT's own sampler,
                which guides the first 3 latent channels and keeps the conditional prediction for the rest.
            use_learned_variance (`bool`, *optional*, defaults to `False`):
                Sample with the model's learned variance (its second half of channels); needs a model with
                ``out_channels = 2 x in_channels`` and ``DDPMScheduler(variance_type="learned_range")``.
                `False` drops it, as diffusers' DiTPipeline does.
            check_memory (`bool`, *optional*, defaults to `True`):
                Refuse a size whose activations alone would not fit in the device's free memory
                (:meth:`check_memory`), before sampling; `False` tries anyway.

        Examples:

        Returns:
            ``NaLaPipelineOutput`` with ``images`` (and ``attention_report`` when ``attention_sharpness`` is
            set), or a tuple ``(images,)`` when ``return_dict`` is False.
        """
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        settings = self.sampling_settings(num_inference_steps, guidance_scale)
        num_inference_steps, guidance_scale = settings["num_inference_steps"], settings["guidance_scale"]
        self.check_inputs(height, width, num_inference_steps, guidance_scale, output_type, num_images_per_label,
                          callback_on_step_end_tensor_inputs)
        guidance = dict(guidance_interval=guidance_interval, guidance_interval_unit=guidance_interval_unit,
                        guidance_channels=guidance_channels, use_learned_variance=use_learned_variance)
        self.check_guidance(**guidance)
        height, width, num_inference_steps = int(height), int(width), int(num_inference_steps)
        num_images_per_label = int(num_images_per_label)
        ids = self.get_label_ids(class_labels)
        device = self._execution_device
        class_ids = torch.tensor(ids, device=device).repeat_interleave(num_images_per_label)  # (B,)
        if check_memory:
            self.check_memory(height, width, len(class_ids), guidance_scale != 1.0)

        previous_sharpness = attention_sharpness_of(self.transformer)
        try:
            report = self.set_resolution_sharpness(attention_sharpness, height, width, class_ids, num_inference_steps,
                                                   position_embedding)
            latents = self.prepare_latents(len(class_ids), height, width, generator, latents)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = self.denoise(
                latents,
                class_ids,
                self.scheduler.timesteps,
                guidance_scale,
                generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                position_embedding=position_embedding,
                **guidance,
            )
        finally:
            set_attention_sharpness(self.transformer, previous_sharpness)
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return NaLaPipelineOutput(images=images, attention_report=report)

    # -- saving, with the file diffusers' generic loader needs ---------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True,
                        variant: Optional[str] = None, max_shard_size=None, push_to_hub: bool = False, **kwargs):
        """``DiffusionPipeline.save_pretrained`` (same parameters, ``variant`` included), then the loader file
        (:mod:`~nala_diffusion.pipelines.loader_file`): ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)`` opens the folder wherever ``nala_diffusion`` is installed."""
        if push_to_hub:
            raise ValueError("save the pipeline to a folder, then upload the folder (huggingface_hub's upload_folder), "
                             "so that the upload holds the loader file")
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size, **kwargs)
        follow_umask(os.fspath(save_directory))
        write_loader_file(os.fspath(save_directory))
