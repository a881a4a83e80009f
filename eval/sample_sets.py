"""Writing a sample set for evaluation: a pipeline's images of a :class:`~nala_diffusion.pipelines.request.
SamplingRequest`, image ``i`` seeded ``seed + i`` and written as ``samples/{i:06d}.png``, the same on any number
of processes (:mod:`nala_diffusion.metrics.samples` has the layout, batches and fingerprints)."""

import os
from typing import Sequence

import torch
from tqdm.auto import tqdm

from nala_diffusion.metrics.samples import SAMPLE_DIR, is_valid_image, rank_batches, sample_path, save_png_atomically
from nala_diffusion.pipelines.request import SamplingRequest


def generate_samples(pipe, out_dir: str, num_samples: int, *, labels: Sequence[int], request: SamplingRequest,
                     batch_size: int = 16, rank: int = 0, world_size: int = 1, show_progress: bool = True) -> int:
    """Write this process's share of the samples (those missing or unreadable); returns how many it wrote.
    ``request`` gives everything but the labels (one per image) and the batching."""
    os.makedirs(os.path.join(out_dir, SAMPLE_DIR), exist_ok=True)
    height = request.height or pipe.default_sample_size
    width = request.width or pipe.default_sample_size
    device = pipe._execution_device
    todo = []  # (batch, the images of it to write), each image checked once
    for batch in rank_batches(num_samples, batch_size, rank, world_size):
        missing = {i for i in batch if not is_valid_image(sample_path(out_dir, i), (width, height))}
        if missing:
            todo.append((batch, missing))
    written = 0
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**request.pipeline_kwargs(highres=hasattr(pipe, "stage_sizes")), "height": height, "width": width}
    for batch, missing in tqdm(todo, desc=f"sampling (process {rank})", disable=not show_progress):
        generators = [torch.Generator(device).manual_seed(request.seed + i) for i in batch]
        output = pipe([labels[i] for i in batch], generator=generators, output_type="pil", **kwargs)
        for i, image in zip(batch, output.images):
            if i in missing:
                save_png_atomically(image, sample_path(out_dir, i))
                written += 1
    return written
