"""Noised inputs at fixed timesteps: the one builder of the measurement tools (attention sharpness,
attention entropy, retrieval) for "these images, noised at these timesteps, with this noise"."""

from typing import Sequence, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor


def noised_copies(scheduler, x0: torch.Tensor, timesteps: Sequence[int],
                  generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x0`` noised at each of ``timesteps`` in turn by ``scheduler.add_noise``, fresh noise from
    ``generator`` drawn in timestep order: ``(noisy, noise, steps)``, each the copies of all timesteps
    concatenated along the batch (timestep-major)."""
    noisy, noises, steps = [], [], []
    for t in timesteps:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        step = torch.full((len(x0),), int(t), device=x0.device)
        noisy.append(scheduler.add_noise(x0, noise, step))
        noises.append(noise)
        steps.append(step)
    return torch.cat(noisy), torch.cat(noises), torch.cat(steps)
