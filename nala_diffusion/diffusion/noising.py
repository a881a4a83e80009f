"""Noised inputs at fixed timesteps: the one builder of the measurement tools (attention sharpness,
attention entropy, retrieval) for "these images, noised at these timesteps, with this noise"."""

from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor


def noised_copies(scheduler, x0: torch.Tensor, timesteps: Sequence[int], generator: torch.Generator,
                  model_config: Optional[Mapping[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x0`` noised at each of ``timesteps`` in turn, fresh noise from ``generator`` drawn in timestep
    order: ``(noisy, noise, steps)``, each the copies of all timesteps concatenated along the batch
    (timestep-major); ``steps`` are what the model reads. A DDPM schedule noises with ``add_noise``; a
    flow-matching scheduler on the flow path at sigma = t / num_train_timesteps, and ``steps`` follow the
    model's convention (``model_config``; :mod:`~nala_diffusion.diffusion.objectives`)."""

    count = scheduler.config.num_train_timesteps
    bad = [t for t in timesteps if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < count]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the noise schedule: integers 0 .. {count - 1} (0 is the least "
                         "noisy)")
    noisy, noises, steps = [], [], []
    for t in timesteps:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        step = torch.full((len(x0),), int(t), device=x0.device)
        noisy_t, step = noised_at(scheduler, x0, noise, step, model_config)
        noisy.append(noisy_t)
        noises.append(noise)
        steps.append(step)
    return torch.cat(noisy), torch.cat(noises), torch.cat(steps)


def noised_at(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              model_config: Optional[Mapping[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(noisy, the timesteps the model reads) for integer ``timesteps`` (one per image): ``scheduler.add_noise``
    on a DDPM schedule; on a flow-matching scheduler's path at sigma = t / num_train_timesteps, with the
    timestep in the model's convention (``model_config``; :mod:`~nala_diffusion.diffusion.objectives`)."""
    from nala_diffusion.diffusion.objectives import is_flow_scheduler, model_timestep, noised, schedule_times

    noisy = noised(x0, noise, schedule_times(scheduler, timesteps), scheduler)
    if not is_flow_scheduler(scheduler):
        return noisy, timesteps
    config = {"objective": "flow", **(model_config or {})}
    return noisy, model_timestep(config, timesteps.float(), scheduler.config.num_train_timesteps)
