"""NaLaDiTHighResPipeline: sampling above the training resolution.

Two modes:

- ``direct``: denoise the whole canvas at once, positions interpolated into the training range
  (or extended, for models trained at several sizes);
- ``progressive``: generate at the training size, then per x2 stage upsample the latents, re-noise
  them to ``strength`` and denoise at the next size (upscale-and-refine, as DemoFusion, LinFusion
  and CLEAR do). The later stages keep the layout of the first and add detail.

With NaLa no stage allocates a tokens x tokens matrix, so memory grows linearly with the pixel count.
Also usable with ``custom_pipeline=``; the base pipeline is imported as a module so that this file
holds exactly one ``DiffusionPipeline`` subclass.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from nala_diffusion.diffusion.objectives import noised, schedule_times
from nala_diffusion.models.sharpness import attention_sharpness_of, set_attention_sharpness
from nala_diffusion.pipelines import pipeline_nala_dit as base
from nala_diffusion.pipelines.request import SamplingRequest

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTTransformer2DModel

        >>> transformer = NaLaDiTTransformer2DModel.from_preset("S/4", in_channels=3, sample_size=32, num_classes=2)
        >>> pipe = NaLaDiTHighResPipeline(transformer, DDIMScheduler())
        >>> out = pipe([0], height=64, width=64, highres_mode="progressive", num_inference_steps=4, output_type="np")
        >>> out.images.shape, [(s["height"], s["width"]) for s in out.stages]
        ((1, 64, 64, 3), [(32, 32), (64, 64)])

        ```
"""


@dataclass
class HighResPipelineOutput(BaseOutput):
    """Images, and per stage its ``height``, ``width``, ``steps`` (the sampler's steps), ``model_evaluations``
    (twice the steps but one for Heun's second-order sampler), ``seconds``, the first refinement
    timestep (``start_timestep``) and, with ``attention_sharpness`` set, ``attention_report`` (training
    grid, grid and each layer's sharpness)."""

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    stages: List[Dict[str, Any]] = field(default_factory=list)


class NaLaDiTHighResPipeline(base.NaLaDiTPipeline):
    r"""High-resolution class-conditional sampling; components as :class:`NaLaDiTPipeline`.

    Works with softmax models too, for comparison (their memory grows with the square of the pixel
    count unless the attention processor is a flash-style one).
    """

    def enable_vae_tiling(self):
        """Decode large images tile by tile (needs a VAE)."""
        if self.vae is None:
            raise ValueError("this pipeline has no vae (pixel space); there is nothing to tile")
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        if self.vae is not None:
            self.vae.disable_tiling()

    def stage_sizes(self, height: int, width: int, num_stages: Optional[int] = None) -> List[tuple]:
        """Sizes of the progressive stages, smallest first, ending at (height, width). By default the first
        stage has its longer side at the training size and each next stage doubles it, the last one
        clamped to (height, width); ``num_stages`` instead halves (height, width) that many times less one."""
        unit = self.size_unit
        if num_stages is None:
            scale = self.default_sample_size / max(height, width)
            if scale >= 1:
                return [(height, width)]
            sizes = []
            while scale < 1:
                sizes.append((max(unit, round(height * scale / unit) * unit), max(unit, round(width * scale / unit) * unit)))
                scale *= 2
            return sizes + [(height, width)]
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        sizes = []
        for k in reversed(range(num_stages)):
            h = max(unit, int(height / 2**k) // unit * unit)
            w = max(unit, int(width / 2**k) // unit * unit)
            sizes.append((h, w))
        return sizes

    def _refine_timesteps(self, num_inference_steps: int, strength: float, device):
        """The tail of the schedule that starts at noise level ``strength`` (as diffusers' img2img)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # at least one step: int(steps * strength) is 0 for few steps or a small strength, and an empty
        # schedule would return the upsampled latents unrefined (or nothing to noise them with)
        init_steps = min(max(int(num_inference_steps * strength), 1), num_inference_steps)
        t_start = max(num_inference_steps - init_steps, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps

    def _run_stages(self, call, sizes, request, refine_steps: int, latents, common: Dict[str, Any]):
        """(final latents, per-stage records): the first stage from noise, each later one from the previous
        stage's latents upsampled and re-noised to ``request.strength``; the sharpness is reset afterwards."""
        device, class_ids, generator = self._execution_device, call.class_ids, common["generator"]
        attention_sharpness, position_embedding, strength = (request.attention_sharpness, request.position_embedding,
                                                             request.strength)
        stages = []
        previous_sharpness = attention_sharpness_of(self.transformer)
        calibration_content: Dict[str, Any] = {}  # the sharpness calibration's sample, drawn once for all stages
        try:
            for index, (h, w) in enumerate(sizes):
                start = time.perf_counter()
                description = f"stage {index + 1}/{len(sizes)} {h}x{w}"
                report = self.set_resolution_sharpness(attention_sharpness, h, w, class_ids, call.num_inference_steps,
                                                       position_embedding, calibration_content)
                if index == 0:
                    latents = self.prepare_latents(len(class_ids), h, w, generator, latents)
                    self.scheduler.set_timesteps(call.num_inference_steps, device=device)
                    timesteps = self.scheduler.timesteps
                else:
                    shape = (h // self.vae_scale_factor, w // self.vae_scale_factor)
                    upsampled = F.interpolate(latents.float(), size=shape, mode="bicubic", align_corners=False)
                    upsampled = upsampled.to(latents.dtype)  # (B, C, h', w')
                    timesteps = self._refine_timesteps(refine_steps, strength, device)
                    noise = randn_tensor(upsampled.shape, generator=generator, device=device, dtype=upsampled.dtype)
                    start_steps = timesteps[:1].repeat(len(upsampled))
                    latents = noised(upsampled, noise, schedule_times(self.scheduler, start_steps), self.scheduler)
                latents = self.denoise(latents, class_ids, timesteps, description=description, **common)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                order = getattr(self.scheduler, "order", 1)  # Heun visits each timestep but the last twice
                stage = {"height": h, "width": w, "steps": (len(timesteps) + order - 1) // order,
                         "model_evaluations": len(timesteps), "start_timestep": int(timesteps[0]),
                         "seconds": time.perf_counter() - start}
                if report is not None:
                    stage["attention_report"] = report
                stages.append(stage)
        finally:
            set_attention_sharpness(self.transformer, previous_sharpness)

        return latents, stages

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels,
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
        highres_mode: str = "direct",
        strength: float = 0.6,
        num_stages: Optional[int] = None,
        refine_steps: Optional[int] = None,
        attention_sharpness: base.SharpnessArg = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
        guidance_interval_unit: str = "timestep",
        guidance_channels: Union[str, int] = "all",
        use_learned_variance: bool = False,
        check_memory: bool = True,
    ):
        r"""Generate images, possibly far above the training size.

        Args:
            class_labels, num_inference_steps, guidance_scale, num_images_per_label, generator,
            output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            position_embedding, guidance_interval, guidance_interval_unit, guidance_channels,
            use_learned_variance, check_memory: as :meth:`NaLaDiTPipeline.__call__` (every stage samples
            with them; the memory check is for the final size).
            height, width (`int`, *optional*, defaults to `None`):
                Output size in pixels (`None`: twice the training size).
            latents (`torch.Tensor`, *optional*, defaults to `None`):
                Starting noise of the first stage (the whole canvas in ``direct`` mode).
            highres_mode (`str`, *optional*, defaults to `"direct"`):
                `"direct"` (one pass at full size) or `"progressive"` (upscale and refine in x2 stages).
            strength (`float`, *optional*, defaults to `0.6`):
                Progressive mode: noise level each refinement starts from, in (0, 1].
            num_stages (`int`, *optional*, defaults to `None`):
                Progressive mode: number of stages including the first; `None` picks the number of x2
                steps that brings the longer side of the output down to the training size.
            refine_steps (`int`, *optional*, defaults to `None`):
                Progressive mode: schedule length of each refinement (`None`: ``num_inference_steps``).
                Each refinement runs at least one step, even when ``int(refine_steps * strength)`` is 0.
            attention_sharpness (`str` or `float`, *optional*, defaults to `None`):
                `None`/`"off"`, `"auto"` or a factor, set per stage for its size (see
                :meth:`NaLaDiTPipeline.set_resolution_sharpness`); in each stage's ``attention_report``.

        Examples:

        Returns:
            ``HighResPipelineOutput`` with ``images`` and ``stages`` (size and seconds of each), or ``(images, stages)``.
        """
        request = SamplingRequest(
            height=2 * self.default_sample_size if height is None else height, images_per_label=num_images_per_label,
            width=2 * self.default_sample_size if width is None else width, steps=num_inference_steps,
            guidance=guidance_scale, position_embedding=position_embedding, attention_sharpness=attention_sharpness,
            guidance_interval=guidance_interval, guidance_interval_unit=guidance_interval_unit,
            guidance_channels=guidance_channels, use_learned_variance=use_learned_variance, check_memory=check_memory,
            highres_mode=highres_mode, strength=strength)
        call = self.prepare_call(class_labels, request, output_type, callback_on_step_end_tensor_inputs)
        refine_steps = call.num_inference_steps if refine_steps is None else refine_steps
        if not isinstance(refine_steps, int) or refine_steps < 1:
            raise ValueError(f"refine_steps must be an integer >= 1, got {refine_steps}")
        sizes = [(call.height, call.width)] if highres_mode == "direct" else self.stage_sizes(call.height, call.width,
                                                                                               num_stages)
        common = dict(guidance_scale=call.guidance_scale, guidance=call.guidance, generator=generator,
                      callback_on_step_end=callback_on_step_end, position_embedding=position_embedding,
                      callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        latents, stages = self._run_stages(call, sizes, request, refine_steps, latents, common)
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, stages
        return HighResPipelineOutput(images=images, stages=stages)
