"""A training run's data stage: the dataset and its classes, the VAE (and cached latents), the hashes of
the weights that go into the run, and the clean inputs ``x0`` of a batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from nala_diffusion.train.run_setup import LazyLogger

logger = LazyLogger(__name__)


@dataclass
class RunData:
    """What the data stage hands on: the dataset (pixels, or cached latent moments), its class names and
    fingerprint, the VAE (None in pixel space) and where it came from, the denoiser's input channels and
    grid size, the hashes of the input weights and a resumed checkpoint's saved state."""

    dataset: Any
    classes: List[str]
    fingerprint: str
    vae_source: Optional[str]
    vae: Any = None
    in_channels: int = 3
    sample_size: int = 0
    input_weights: Optional[Dict[str, Optional[str]]] = None
    saved: Optional[Dict[str, Any]] = None


def weights_id(path: Optional[str]) -> Optional[str]:
    """The sha256 of the weights a local folder loads (pipeline components, or every safetensors file),
    or the Hub id as given; None for no path."""
    if not path:
        return None
    if os.path.isdir(path):
        from nala_diffusion.utils.run_guard import pipeline_weights_hash

        return pipeline_weights_hash(path)
    if os.path.isfile(path):  # a checkpoint file (SiT)
        from nala_diffusion.utils.run_guard import files_hash

        return files_hash(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])
    return path


def read_data(config) -> RunData:
    """The dataset and its classes, checked before any accelerator or model is made."""
    from nala_diffusion.data.datasets import dataset_fingerprint, load_dataset
    from nala_diffusion.train.run_setup import inherited_vae

    dataset = load_dataset(config.dataset or config.train_data_dir, config.resolution)
    fingerprint = dataset_fingerprint(dataset, config.resolution, name=config.dataset)
    if len(dataset) == 0:
        raise ValueError("the dataset holds no images")
    classes = [str(c) for c in dataset.classes]
    bad_labels = [label for label in config.validation_labels or [] if not 0 <= label < len(classes)]
    if bad_labels:
        raise ValueError(f"--validation_labels {bad_labels} are not classes of the data (0..{len(classes) - 1})")
    vae_source = config.vae or inherited_vae(config.init_from)
    if config.cache_latents and not vae_source:
        raise ValueError(f"--cache_latents needs a VAE, and --init_from {config.init_from!r} has none; pass --vae")
    return RunData(dataset, classes, fingerprint, vae_source)


def load_inputs(config, data: RunData, accelerator, resume_path: Optional[str]) -> RunData:
    """The VAE and (with --cache_latents) the cached latents; the input weights' hashes, checked against a
    resumed checkpoint's."""
    from nala_diffusion.data.datasets import build_latent_cache, dataset_fingerprint, load_latent_cache
    from nala_diffusion.models.sources import load_vae
    from nala_diffusion.train import checkpoints

    input_weights = {key: weights_id(getattr(config, key)) for key in ("teacher", "init_from")}
    input_weights["vae"] = weights_id(data.vae_source)
    saved = checkpoints.read_state(resume_path) if resume_path else None
    if saved is not None:
        checkpoints.check_inputs(saved, {"data_fingerprint": data.fingerprint, "input_weights": input_weights},
                                 resume_path)
    vae = load_vae(data.vae_source).to(accelerator.device).eval() if data.vae_source else None
    dataset = data.dataset
    if vae is not None:
        vae.requires_grad_(False)
        logger.info(f"latent space: the VAE of {data.vae_source}", main_process_only=True)
    if config.cache_latents:
        # named by the data and the VAE's weights: a VAE replaced at the same path gets its own latents
        vae_id = f"{data.vae_source}|{input_weights['vae']}"
        cache = os.path.join(config.output_dir, "latent_cache",
                             f"{dataset_fingerprint(dataset, config.resolution, vae_id, name=config.dataset)}.safetensors")
        if accelerator.is_main_process and not os.path.exists(cache):
            build_latent_cache(dataset, vae, cache)
        accelerator.wait_for_everyone()
        dataset = load_latent_cache(cache, dataset.classes)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if config.resolution % vae_factor:
        raise ValueError(f"resolution {config.resolution} must be a multiple of the VAE factor {vae_factor}")
    in_channels = vae.config.latent_channels if vae is not None else 3
    return RunData(dataset, data.classes, data.fingerprint, data.vae_source, vae, in_channels,
                   config.resolution // vae_factor, input_weights, saved)


def clean_latents(batch, vae, cached: bool, flip: torch.Tensor, generator) -> torch.Tensor:
    """x0 for the diffusion loss: pixels in [-1, 1], or VAE latents x scaling_factor."""
    if cached:  # (B, 2, 2C, h, w): moments of the image and of its mirror
        moments = batch[torch.arange(len(batch)), flip.long()]
        mean, logvar = moments.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * vae.config.scaling_factor
    pixels = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if vae is None:
        return pixels
    with torch.no_grad():
        return vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator).float() * vae.config.scaling_factor


def probe_batch(config, dataset, vae, objective, device):
    """A fixed batch of noised training data (seeded by --seed), for sigma's calibration and the
    saturation check at validation: (noisy x, timesteps, labels)."""
    generator = torch.Generator().manual_seed(config.seed)
    count = min(len(dataset), max(config.train_batch_size, 16))
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    batch = torch.stack([dataset[i][0] for i in indices]).to(device)
    labels = torch.tensor([int(dataset[i][1]) for i in indices], device=device)
    flip = torch.zeros(count, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    x0 = clean_latents(batch, vae, config.cache_latents, flip, generator)
    times = objective.draw(count, generator, device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    noisy, timesteps = objective.noised(x0, noise, times)
    return noisy, timesteps, labels
