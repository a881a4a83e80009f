"""NaLaDiTPipeline: class-conditional sampling with a NaLa DiT, in latent or pixel space.

Every saved folder opens with diffusers' generic loader, ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` (see :mod:`~nala_diffusion.pipelines.loader_file`). The file also works as a
diffusers community pipeline (``custom_pipeline="pipelines/pipeline_nala_dit.py"``), so it holds
exactly one ``DiffusionPipeline`` subclass and imports the rest by absolute path.
"""

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

# pipeline folders saved before the sub-packages name this module as the transformer's library, and
# diffusers loads a component only from a module that is already imported
import nala_diffusion.model  # noqa: F401
from nala_diffusion.diffusion.objectives import clipping_step_kwargs, scheduler_prediction
from nala_diffusion.models.norm_awareness import warn_if_uncalibrated
from nala_diffusion.models.sharpness import attention_sharpness_of, set_attention_sharpness
from nala_diffusion.models.sources import check_loaded_weights
from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel
from nala_diffusion.pipelines import inputs
from nala_diffusion.pipelines.attention_sharpness import SharpnessArg, set_sharpness_for_size
from nala_diffusion.pipelines.folder_loading import (
    HUB_KEYS,
    MODEL_KEYS,
    load_components,
    local_pipeline_folder,
    refuse_remote_code,
)
from nala_diffusion.pipelines.guidance import GuidanceSchedule
from nala_diffusion.pipelines.inputs import LabelArg
from nala_diffusion.pipelines.loader_file import write_loader_file
from nala_diffusion.pipelines.request import SAMPLING_DEFAULTS, SamplingRequest
from nala_diffusion.utils.files import follow_umask


@dataclass
class SamplingCall:
    """A call's inputs, resolved and checked (:meth:`NaLaDiTPipeline.prepare_call`)."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    class_ids: torch.Tensor  # (images,), each label repeated num_images_per_label times
    guidance: GuidanceSchedule


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
        self.id2label = inputs.checked_id2label(id2label, transformer.config.num_classes)
        self.register_to_config(id2label={str(k): v for k, v in sorted(self.id2label.items())})
        self.labels = inputs.names_to_ids(self.id2label)
        unknown = sorted(set(sampling_defaults or {}) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(f"sampling_defaults: unknown keys {unknown}; allowed: {sorted(SAMPLING_DEFAULTS)}")
        self.register_to_config(sampling_defaults=dict(sampling_defaults or {}))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A pipeline of this class from a folder or Hub id, built from its components without running any
        file of it (:mod:`~nala_diffusion.pipelines.folder_loading`): only ``diffusers`` and ``nala_diffusion``
        classes named in ``model_index.json`` are loaded, safetensors weights only; ``custom_pipeline`` and
        ``trust_remote_code`` are refused. Takes diffusers' keywords (``dtype``/``torch_dtype``, ``variant``,
        ``revision``, ``cache_dir``, ``token``, ``local_files_only``, components such as ``scheduler=``).
        Every loaded model is checked: a missing tensor or a NaN/inf value raises a ``ValueError`` naming it."""
        refuse_remote_code(cls.__name__, kwargs)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: NaLa pipelines load safetensors weights only (pickled "
                             "checkpoints can run code)")
        modules, optional = cls._get_signature_keys(cls)
        known = {*HUB_KEYS, *MODEL_KEYS, "dtype", "torch_dtype", "variant", "use_safetensors", "custom_pipeline",
                 "trust_remote_code", *modules, *optional}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_pretrained: unknown keyword arguments {unknown}")
        name = os.fspath(pretrained_model_name_or_path)
        folder = local_pipeline_folder(name, kwargs)
        components, others = load_components(cls, folder, kwargs)
        for key, component in components.items():
            if isinstance(component, torch.nn.Module) and key not in kwargs:
                check_loaded_weights(component, os.path.join(name, key))
        pipe = cls(**components, **others)
        pipe.register_to_config(_name_or_path=name)
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
        return inputs.label_ids(labels, self.labels, self.num_classes, self.id2label)

    @property
    def size_unit(self) -> int:
        """Height and width must be multiples of this: the patch size times the VAE's downsampling."""
        return self.transformer.config.patch_size * self.vae_scale_factor

    @property
    def default_sample_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def check_inputs(self, height, width, num_inference_steps, guidance_scale, output_type, num_images_per_label,
                     callback_on_step_end_tensor_inputs=("latents",)) -> None:
        inputs.check_sampling_inputs(self, height, width, num_inference_steps, guidance_scale, output_type,
                                     num_images_per_label, callback_on_step_end_tensor_inputs)

    def check_memory(self, height: int, width: int, images: int, guidance: bool = True) -> None:
        """Refuse a size whose activations alone would not fit in the device's free memory
        (:func:`~nala_diffusion.pipelines.inputs.check_memory`), before anything is sampled or written."""
        inputs.check_memory(self, height, width, images, guidance)

    def prepare_call(self, class_labels, request: SamplingRequest, output_type: str = "pil",
                     callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> "SamplingCall":
        """A call's inputs resolved (the request's choices filled in from the pipeline) and checked, before
        anything is sampled."""
        request = request.resolved(self, output_type, callback_on_step_end_tensor_inputs)
        ids = self.get_label_ids(class_labels)
        class_ids = torch.tensor(ids, device=self._execution_device).repeat_interleave(int(request.images_per_label))
        if request.check_memory:
            self.check_memory(int(request.height), int(request.width), len(class_ids), request.guidance != 1.0)
        warn_if_uncalibrated(self.transformer)
        return SamplingCall(int(request.height), int(request.width), int(request.steps), request.guidance, class_ids,
                            request.guidance_schedule)

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
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at 1

    def check_sigmas(self, sigmas: Sequence[float], num_inference_steps: Optional[int]) -> int:
        """Refuse ``sigmas`` the scheduler cannot take or that are not a decreasing list in (0, 1]; returns
        the step count they give (:func:`~nala_diffusion.pipelines.inputs.check_sigmas`)."""
        return inputs.check_sigmas(self.scheduler, sigmas, num_inference_steps)

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
        """Keywords of ``scheduler.step``: the generator, and where the scheduler clips its predicted x0,
        what keeps its step consistent (:func:`~nala_diffusion.diffusion.objectives.clipping_step_kwargs`)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: Dict[str, Any] = {"generator": generator} if "generator" in accepted else {}
        return {**kwargs, **clipping_step_kwargs(self.scheduler)}

    def denoise(
        self,
        latents: torch.Tensor,
        class_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance_scale: float,
        guidance: GuidanceSchedule = GuidanceSchedule(),
        generator=None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        position_embedding: Optional[str] = None,
        description: Optional[str] = None,
    ) -> torch.Tensor:
        """Run the scheduler over ``timesteps`` from ``latents``; returns the final latents. Steps outside
        the ``guidance`` interval run the conditional branch alone (see :meth:`__call__`)."""
        do_guidance = guidance_scale != 1.0
        self._guidance_scale, self._num_timesteps = guidance_scale, len(timesteps)
        both_ids = torch.cat([class_ids, torch.full_like(class_ids, self.transformer.null_class_label)])  # cond, uncond
        step_kwargs = self._step_kwargs(generator)
        # a step that clips x0 would turn NaN/inf predictions into finite, saturated images: checked before it
        clipping = bool(clipping_step_kwargs(self.scheduler))
        train_steps = self.scheduler.config.num_train_timesteps
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)  # none in flow schedulers
        if do_guidance:
            guidance.check_steps(timesteps, self.scheduler)
        progress = self.progress_bar(total=len(timesteps))
        if description:
            progress.set_description(description)
        with progress:
            for i, t in enumerate(timesteps):
                guided = do_guidance and guidance.applies_at(t, self.scheduler)
                model_input = torch.cat([latents, latents]) if guided else latents
                model_input = scale_input(model_input, t)
                timestep = t.expand(model_input.shape[0]).to(model_input.device) if torch.is_tensor(t) else t
                # the mean in the scheduler's convention (SiT's time and velocity sign translated); a learned variance
                prediction, variance = scheduler_prediction(self.transformer, model_input, timestep, train_steps,
                                                            class_labels=both_ids if guided else class_ids,
                                                            position_embedding=position_embedding)
                if guided:
                    prediction = guidance.combine(*prediction.chunk(2), guidance_scale)
                    variance = variance.chunk(2)[0]  # the conditional branch's, as DiT samples
                if clipping:
                    inputs.check_finite(prediction, f"model predictions (timestep {int(t)})")
                if guidance.use_learned_variance:  # DDPMScheduler(variance_type="learned_range") splits the halves
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

    def set_resolution_sharpness(self, attention_sharpness: SharpnessArg, height: int, width: int, class_ids: torch.Tensor,
                                 num_inference_steps: int = 10, position_embedding: Optional[str] = None,
                                 content: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """Set the attention sharpness for sampling at ``height`` x ``width``; returns the report (``None``
        when off). ``"auto"`` calibrates it on a short sample of this model: see
        :func:`~nala_diffusion.pipelines.attention_sharpness.set_sharpness_for_size`."""
        return set_sharpness_for_size(self, attention_sharpness, height, width, class_ids, num_inference_steps,
                                      position_embedding, content)

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents to images of ``output_type`` (``latent`` returns them unchanged); NaN or inf values,
        before or after the VAE, are a ``ValueError``."""
        inputs.check_finite(latents, "latents")
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
            inputs.check_finite(images, "decoded pixels")
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
        sigmas: Optional[List[float]] = None,
    ):
        r"""Generate images of the given classes (the choices become a
        :class:`~nala_diffusion.pipelines.request.SamplingRequest`, checked before anything is sampled).

        Args:
            class_labels (`int`, `str` or a list of them): class ids or names from ``id2label``; one image each.
            height, width (`int`, *optional*): pixels, any positive multiple of the patch size x VAE factor;
                non-square allowed (`None`: the training size).
            num_inference_steps (`int`, *optional*): denoising steps (`None`: the pipeline's ``sampling_defaults``, else 50).
            guidance_scale (`float`, *optional*): classifier-free guidance against the null class, `1.0` skips the
                unconditional half (`None`: the pipeline's ``sampling_defaults``, else 4.0).
            num_images_per_label (`int`, defaults to 1): images for each entry of ``class_labels``.
            generator (`torch.Generator` or a list, one per image, *optional*): the random source.
            latents (`torch.Tensor`, *optional*): starting noise, (images, channels, height / VAE factor, width / VAE factor).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, 3 in [0, 1]), `"pt"` (B, 3, H, W) or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a ``NaLaPipelineOutput`` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): ``callback(pipe, step, timestep, callback_kwargs)`` after each
                step; may return ``{"latents": ...}``. callback_on_step_end_tensor_inputs: the tensors it gets.
            position_embedding (`str`, *optional*): above the training size, `"interpolate"` (positions squeezed into the
                training range) or `"extend"` (models trained at several sizes); `None`: the transformer's config.
            attention_sharpness (`str` or `float`, *optional*): `None`/`"off"`, `"auto"` (keeps each layer's attention
                entropy at its training level) or a factor for every layer (:meth:`set_resolution_sharpness`).
            guidance_interval (`tuple`, *optional*): ``(low, high)``: guidance only at steps whose timestep (or sigma)
                lies in the closed interval, the conditional branch alone elsewhere (Kynkaanniemi et al. 2024).
            guidance_interval_unit (`str`, defaults to `"timestep"`): or `"sigma"`, sqrt((1 - alpha_bar) / alpha_bar).
            guidance_channels (`str` or `int`, defaults to `"all"`): `"all"` (diffusers' DiTPipeline) or `3` (DiT's own
                sampler: the first 3 latent channels guided, the conditional prediction for the rest).
            use_learned_variance (`bool`, defaults to `False`): sample with the model's variance channels (needs
                ``out_channels = 2 x in_channels`` and ``DDPMScheduler(variance_type="learned_range")``).
            check_memory (`bool`, defaults to `True`): refuse a size whose activations alone would not fit in free memory.
            sigmas (`List[float]`, *optional*): the noise levels of a flow-matching scheduler (as diffusers' SD3
                pipeline); their count is the number of steps. SiT's N-step Euler: ``1 - linspace(0, 1, N + 1)[:-1]``.

        Examples:

        Returns:
            ``NaLaPipelineOutput`` with ``images`` (and ``attention_report`` with ``attention_sharpness``), or ``(images,)``.
        """
        if sigmas is not None:
            num_inference_steps = self.check_sigmas(sigmas, num_inference_steps)
        request = SamplingRequest(
            height=height, width=width, images_per_label=num_images_per_label, steps=num_inference_steps,
            guidance=guidance_scale, position_embedding=position_embedding, attention_sharpness=attention_sharpness,
            guidance_interval=guidance_interval, guidance_interval_unit=guidance_interval_unit,
            guidance_channels=guidance_channels, use_learned_variance=use_learned_variance, check_memory=check_memory)
        call = self.prepare_call(class_labels, request, output_type, callback_on_step_end_tensor_inputs)
        callbacks = (callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents, report = self._sample(call, request, generator, latents, callbacks, sigmas)
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return NaLaPipelineOutput(images=images, attention_report=report)

    def _sample(self, call: SamplingCall, request: SamplingRequest, generator, latents, callbacks, sigmas=None):
        """(final latents, the sharpness report) of one single-size call; the sharpness is reset afterwards."""
        previous_sharpness = attention_sharpness_of(self.transformer)
        try:
            report = self.set_resolution_sharpness(request.attention_sharpness, call.height, call.width, call.class_ids,
                                                   call.num_inference_steps, request.position_embedding)
            latents = self.prepare_latents(len(call.class_ids), call.height, call.width, generator, latents)
            if sigmas is not None:
                self.scheduler.set_timesteps(sigmas=[float(s) for s in sigmas], device=self._execution_device)
            else:
                self.scheduler.set_timesteps(call.num_inference_steps, device=self._execution_device)
            latents = self.denoise(latents, call.class_ids, self.scheduler.timesteps, call.guidance_scale, call.guidance,
                                   generator=generator, callback_on_step_end=callbacks[0],
                                   callback_on_step_end_tensor_inputs=callbacks[1],
                                   position_embedding=request.position_embedding)
        finally:
            set_attention_sharpness(self.transformer, previous_sharpness)
        return latents, report

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
