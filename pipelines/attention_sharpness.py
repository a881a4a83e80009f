"""Resolution-aware attention sharpness for the pipelines: the factors for a sampling size, set on the
model before sampling (and the short calibration sample ``"auto"`` draws)."""

from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from nala_diffusion.diffusion.noising import noised_copies
from nala_diffusion.diffusion.objectives import noise_schedule_for
from nala_diffusion.models.sharpness import (
    SHARPNESS_MODES,
    attention_sharpness_of,
    resolution_sharpness,
    set_attention_sharpness,
)

SharpnessArg = Optional[Union[str, float, Mapping[str, float]]]
# noise levels of the calibration inputs of attention_sharpness="auto"
SHARPNESS_TIMESTEPS = (250, 500, 750)


@torch.no_grad()
def set_sharpness_for_size(pipe, attention_sharpness: SharpnessArg, height: int, width: int, class_ids: torch.Tensor,
                             num_inference_steps: int = 10, position_embedding: Optional[str] = None,
                             content: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Set the attention sharpness of ``pipe``'s transformer for sampling at ``height`` x ``width``;
    returns the report (``None`` when off).

    ``attention_sharpness``: ``None``/``"off"`` (1, the attention as trained), a positive number
    for every layer, or ``"auto"``: on a grid of N tokens instead of the training n, softmax
    layers scale their logits by sqrt(log N / log n) and NaLa layers their power by a factor
    calibrated on this model so that each layer's mean attention entropy per query at N equals
    the one at n. The calibration content is a short sample (2 images of ``class_ids``, at most 10
    steps, seed 0) at the training size, noised at :data:`SHARPNESS_TIMESTEPS` at both sizes;
    pass the same ``content`` dict to calls for several sizes (progressive stages) to draw it once.
    """
    model = pipe.transformer
    if attention_sharpness is None or attention_sharpness == "off":
        set_attention_sharpness(model, 1.0)
        return None
    train_rows, train_cols = model.training_grid
    rows, cols = height // pipe.size_unit, width // pipe.size_unit
    report = {"training_grid": [train_rows, train_cols], "grid": [rows, cols], "setting": attention_sharpness}
    if isinstance(attention_sharpness, str):
        if attention_sharpness not in SHARPNESS_MODES:
            raise ValueError(f"attention_sharpness must be one of {SHARPNESS_MODES} or a positive number, "
                             f"got {attention_sharpness!r}")
        if rows * cols == train_rows * train_cols:  # nothing to calibrate: every factor is 1
            train_inputs = target_inputs = {}
        else:
            train_inputs, target_inputs = calibration_inputs(pipe, class_ids, height, width, num_inference_steps,
                                                             position_embedding, content)
        report["layers"] = resolution_sharpness(model, train_rows * train_cols, rows * cols, train_inputs, target_inputs)
        return report
    # a factor for every layer, or {layer: factor} (e.g. the factors of an earlier "auto" report)
    set_attention_sharpness(model, attention_sharpness if isinstance(attention_sharpness, Mapping)
                            else float(attention_sharpness))
    report["layers"] = {name: {"sharpness": value} for name, value in attention_sharpness_of(model).items()}
    return report


def calibration_inputs(pipe, class_ids, height, width, num_inference_steps, position_embedding, content=None):
    """Model inputs with the same content at the training size and at height x width; the content
    (and the generator's state after drawing it) is kept in ``content`` when given."""
    device = pipe._execution_device
    ids = class_ids[:2]
    generator = torch.Generator(device).manual_seed(0)
    if content is not None and "clean" in content:
        clean = content["clean"]
        generator.set_state(content["generator_state"])
    else:
        size = pipe.default_sample_size
        set_attention_sharpness(pipe.transformer, 1.0)
        latents = pipe.prepare_latents(len(ids), size, size, generator)
        pipe.scheduler.set_timesteps(min(num_inference_steps, 10), device=device)
        clean = pipe.denoise(latents, ids, pipe.scheduler.timesteps, guidance_scale=1.0, generator=generator,
                             description="calibrating attention sharpness")  # (2, C, h, w)
        if content is not None:
            content.update(clean=clean, generator_state=generator.get_state())
    shape = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    large = F.interpolate(clean.float(), size=shape, mode="bicubic", align_corners=False).to(clean.dtype)
    noising = noise_schedule_for(pipe.transformer.config, pipe.scheduler)
    inputs = []
    for x0 in (clean, large):
        noisy, _, steps = noised_copies(noising, x0, SHARPNESS_TIMESTEPS, generator, pipe.transformer.config)
        inputs.append({"hidden_states": noisy, "timestep": steps,
                       "class_labels": ids.repeat(len(SHARPNESS_TIMESTEPS)), "position_embedding": position_embedding})
    return inputs
