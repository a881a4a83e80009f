"""A sampling call's inputs, checked before anything is sampled (sizes, steps, guidance scale, labels,
output type, and whether the activations fit in the device's memory), and its samples, checked before
they are returned. Both pipelines use these."""

import math
import numbers
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from nala_diffusion.data.classes import refuse_ambiguous

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LabelArg = Union[int, str, Sequence[Union[int, str]]]


def is_integer(value) -> bool:
    """An integral number of any type (int, numpy or 0-d torch integers, 3.0), not a bool."""
    if isinstance(value, bool):
        return False
    if torch.is_tensor(value):
        return value.ndim == 0 and (not value.is_floating_point() or float(value).is_integer())
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()


def flatten_labels(labels) -> list:
    """Nested lists and tensors of labels as one flat list ([[1], [2]], as DiTPipeline takes them, is [1, 2])."""
    if torch.is_tensor(labels):
        return list(labels.flatten())
    flat = []
    for label in labels:
        if isinstance(label, (list, tuple)) or torch.is_tensor(label) and label.ndim > 0:
            flat.extend(flatten_labels(label))
        else:
            flat.append(label)
    return flat


def checked_id2label(id2label: Optional[Mapping], num_classes: int) -> Dict[int, str]:
    """``{id: "name"}`` (ids as ints or strings, as JSON keeps them) with int ids, each a class of the model."""
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
    bad = [k for k in id2label if not 0 <= k < num_classes]
    if bad:
        raise ValueError(f"id2label has ids {bad} outside the model's classes 0..{num_classes - 1}")
    return id2label


def names_to_ids(id2label: Mapping[int, str]) -> Dict[str, int]:
    """Every name of ``id2label`` (``"name, synonym"`` gives two, as in DiT) -> its id."""
    return {name.strip(): k for k, v in id2label.items() for name in v.split(",") if name.strip()}


def label_ids(labels: LabelArg, names: Mapping[str, int], num_classes: int,
              id2label: Optional[Mapping[int, str]] = None) -> List[int]:
    """Class ids for labels given as ids, names (``names``: name -> id) or a list of either; with
    ``id2label``, a name of several classes is refused, listing them."""
    if isinstance(labels, (int, str)) or torch.is_tensor(labels) and labels.ndim == 0:
        labels = [labels]
    labels = flatten_labels(labels)
    if len(labels) == 0:
        raise ValueError("class_labels is empty; give at least one class id or name")
    ids = []
    for label in labels:
        if isinstance(label, str):
            if id2label is not None:
                refuse_ambiguous([label], id2label, "class_labels: the name", lower=False)
            if label not in names:
                known = ", ".join(sorted(names)[:20]) or "none: this pipeline has no id2label"
                raise ValueError(f"class_labels: unknown label name {label!r}; known names: {known}")
            ids.append(names[label])
            continue
        if not is_integer(label):
            raise ValueError(f"class_labels: {label!r} is not a class id (an integer) or a name")
        label = int(label)
        if not 0 <= label < num_classes:
            raise ValueError(f"class_labels: id {label} is out of range; allowed ids are 0..{num_classes - 1}")
        ids.append(label)
    return ids


def check_sampling_inputs(pipe, height, width, num_inference_steps, guidance_scale, output_type, num_images_per_label,
                          callback_on_step_end_tensor_inputs=("latents",)) -> None:
    """Refuse sizes the patch and VAE do not divide, step counts outside the schedule, a negative or
    non-finite guidance scale, unknown callback tensors and output types, and images a pipeline
    without a VAE cannot show."""
    unit = pipe.size_unit
    for name, value in (("height", height), ("width", width)):
        if not is_integer(value) or value <= 0 or value % unit:
            raise ValueError(f"{name}={value} must be a positive multiple of {unit} (patch size x VAE factor)")
    if not is_integer(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
    schedule = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if schedule is not None and num_inference_steps > schedule:
        raise ValueError(f"num_inference_steps={num_inference_steps} exceeds the scheduler's {schedule} training "
                         "timesteps; sample with at most that many steps")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 disables guidance), got {guidance_scale}")
    bad_inputs = set(callback_on_step_end_tensor_inputs) - set(pipe._callback_tensor_inputs)
    if bad_inputs:
        raise ValueError(f"callback_on_step_end_tensor_inputs: {sorted(bad_inputs)} not in {pipe._callback_tensor_inputs}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    channels = pipe.transformer.config.in_channels
    if output_type == "pil" and pipe.vae is None and channels != 3:
        raise ValueError(
            f"this pipeline has no vae and its transformer works on {channels}-channel latents, which cannot be "
            "shown as images: give it a vae, or ask for output_type='latent' (or 'np'/'pt', which return them)"
        )
    if not is_integer(num_images_per_label) or num_images_per_label < 1:
        raise ValueError(f"num_images_per_label must be an integer >= 1, got {num_images_per_label}")


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


def estimated_bytes(pipe, height: int, width: int, images: int, guidance: bool = True) -> int:
    """A lower estimate of the memory one denoising step needs at ``height`` x ``width`` for ``images``
    images: the transformer's widest activations (the MLP's 4x hidden plus the block input, queries,
    keys and values) for every token, in the model's dtype, twice with guidance."""
    config = pipe.transformer.config
    tokens = (height // pipe.size_unit) * (width // pipe.size_unit)
    hidden = config.num_attention_heads * config.attention_head_dim
    element = torch.finfo(pipe.transformer.dtype).bits // 8
    return (2 if guidance else 1) * images * tokens * hidden * (4 + 4) * element


def check_memory(pipe, height: int, width: int, images: int, guidance: bool = True) -> None:
    """Refuse a size whose :func:`estimated_bytes` exceeds the memory the pipeline's device has free
    (CUDA: ``mem_get_info``; CPU: the system's available memory)."""
    needed = estimated_bytes(pipe, height, width, images, guidance)
    device = pipe._execution_device
    free = available_memory(device)
    if free is not None and needed > free:
        raise ValueError(
            f"{height}x{width} x {images} image(s) needs at least {needed / 2**30:.1f} GiB for its activations, "
            f"more than the {free / 2**30:.1f} GiB free on {device}; sample fewer or smaller images (a smaller "
            "--batch_size), or pass check_memory=False (--no_memory_check) to try anyway")


def check_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf samples (they would be written as black images), naming how many and the usual causes."""
    bad = ~torch.isfinite(values.float()).flatten(1).all(dim=1)  # (B,)
    if bool(bad.any()):
        raise ValueError(
            f"sampling produced NaN or inf {what} in {int(bad.sum())} of {len(bad)} images (indices "
            f"{bad.nonzero().flatten().tolist()[:8]}); usual causes: a huge guidance_scale, NaN/inf in the given "
            "latents, or float16 overflow (sample in float32 or bfloat16). Nothing was returned.")


def check_sigmas(scheduler, sigmas: Sequence[float], num_inference_steps: Optional[int]) -> int:
    """Refuse ``sigmas`` the scheduler cannot take or that are not a decreasing list in (0, 1]; returns the step
    count they give."""
    import inspect

    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"sigmas: {type(scheduler).__name__}.set_timesteps takes no sigmas; use a flow-matching "
                         "scheduler (FlowMatchEulerDiscreteScheduler), or num_inference_steps")
    values = [float(s) for s in sigmas]
    if not values or not all(0 < v <= 1 for v in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be a non-empty, strictly decreasing list in (0, 1], got {list(sigmas)[:6]}")
    if num_inference_steps is not None and num_inference_steps != len(values):
        raise ValueError(f"num_inference_steps={num_inference_steps} but {len(values)} sigmas; give one of them")
    return len(values)
