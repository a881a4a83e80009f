"""Training data: class-per-folder image datasets, with checks that say what is wrong.

Images come out as (3, resolution, resolution) tensors in [-1, 1] (resize of the shorter side,
center crop). Random flips are applied in the training step, from a generator seeded per step,
so that a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from nala_diffusion.utils.files import written_atomically

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS


def _photos(split: str, resolution: int) -> Dataset:
    from nala_diffusion.data.builtin_photos import BuiltinPhotos

    return BuiltinPhotos(split=split, resolution=resolution)


def _pairs(mode: str, layout: str = "tiles") -> Callable[..., Dataset]:
    def factory(split: str, resolution: int) -> Dataset:
        from nala_diffusion.data.builtin_pairs import BuiltinPairs

        return BuiltinPairs(split=split, resolution=resolution, mode=mode, layout=layout)

    return factory


# name -> factory(split, resolution) -> Dataset with .classes
BUILTIN_DATASETS: Dict[str, Callable[..., Dataset]] = {
    "photos": _photos,
    "pairs": _pairs("paired"),  # the retrieval task (nala_diffusion/builtin_pairs.py): tile mosaics
    "pairs_unpaired": _pairs("unpaired"),  # its control: the bottom half is an independent mosaic
    "pairs_mixed": _pairs("mixed"),  # the two alternating, for training
    "pairs_crops": _pairs("paired", "crops"),  # the same with one photograph crop per half
    "pairs_crops_unpaired": _pairs("unpaired", "crops"),
    "pairs_crops_mixed": _pairs("mixed", "crops"),
}


def image_transform(resolution: int) -> Callable:
    """Shorter side to ``resolution``, center crop, to [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


class ImageFolderDataset(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` (one subfolder per class) that checks every image once.

    Unreadable images are skipped with a warning and counted in ``skipped``; a missing or empty
    folder, or a class folder with no readable image, raises ``ValueError``.
    """

    def __init__(self, root: str, resolution: int):
        if not os.path.isdir(root):
            raise ValueError(f"train_data_dir {root!r} does not exist or is not a folder")
        self.skipped: List[str] = []
        try:
            super().__init__(root, transform=image_transform(resolution), loader=load_rgb, is_valid_file=self._readable)
        except FileNotFoundError as error:
            raise ValueError(
                f"train_data_dir {root!r} needs one subfolder per class, each with at least one readable image "
                f"({', '.join(IMAGE_EXTENSIONS)}): {error}"
            ) from None
        if self.skipped:
            logger.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(self.skipped), root, self.skipped[:3])

    def export(self, folder: str) -> int:
        """Write the images, resized and cropped to the resolution, as PNGs (see :func:`export_images`)."""
        return export_images(self, folder)

    def find_classes(self, directory: str):
        """ImageFolder's classes without hidden folders (``.ipynb_checkpoints``, ``.git``, ...), which
        would otherwise become classes and shift every label after them."""
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}

    def _readable(self, path: str) -> bool:
        if not path.lower().endswith(IMAGE_EXTENSIONS) or os.path.basename(path).startswith("."):
            return False
        try:  # decode it whole: verify() passes truncated files that fail at the first epoch
            load_rgb(path)
            return True
        except Exception:  # any decoder error means the file cannot be used
            self.skipped.append(path)
            return False


#: PIL modes of 16- and 32-bit integer greyscale (16-bit PNGs open as one of these)
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_rgb(path: str) -> PIL.Image.Image:
    """An image file as 8-bit RGB. 16-bit greyscale is scaled from 0..65535 to 0..255 (``convert("RGB")``
    would clip it, so a mid-grey 16-bit image would load white)."""
    with PIL.Image.open(path) as image:
        image.load()
        if image.mode in WIDE_GREY_MODES:
            levels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
            image = PIL.Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")


def export_images(dataset: Dataset, folder: str) -> int:
    """Write every image of ``dataset`` (``(image in [-1, 1], label)`` items, ``classes``) as a PNG,
    ``folder/<class>/<index>.png``, e.g. as an FID reference; returns how many."""
    for index in range(len(dataset)):
        image, label = dataset[index]
        target = os.path.join(folder, str(dataset.classes[int(label)]))
        os.makedirs(target, exist_ok=True)
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        PIL.Image.fromarray(pixels).save(os.path.join(target, f"{index:05d}.png"))
    return len(dataset)


def load_dataset(spec: str, resolution: int, split: str = "train") -> Dataset:
    """A dataset from a folder path or ``builtin:<name>``; it has ``classes`` (index -> name) and
    ``export(folder)``. ``split`` selects a built-in dataset's split; a folder is used whole."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            available = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_DATASETS)) or "none installed"
            raise ValueError(f"unknown built-in dataset {spec!r}; available: {available}")
        return BUILTIN_DATASETS[name](split=split, resolution=resolution)
    return ImageFolderDataset(spec, resolution)


def dataset_id2label(dataset: Dataset) -> Dict[int, str]:
    return {i: str(name) for i, name in enumerate(getattr(dataset, "classes"))}


def dataset_fingerprint(dataset: Dataset, resolution: int, extra: Optional[str] = None, name: Optional[str] = None
                        ) -> str:
    """A short hash of the data and settings: a built-in dataset's ``name``, or an ImageFolder's file list
    (paths under its root, labels, sizes and modification times); names latent caches and checks resumes."""
    import hashlib

    digest = hashlib.sha256(f"{resolution}|{extra}|{name if name and name.startswith('builtin:') else ''}".encode())
    root = getattr(dataset, "root", None)
    for path, label in getattr(dataset, "samples", []):
        stat = os.stat(path)
        shown = os.path.relpath(path, root) if root else path
        digest.update(f"{shown}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()[:16]


class LatentMomentsDataset(Dataset):
    """Precomputed VAE latent moments (mean and log-variance) of every image and its mirror image.

    Item: ``(moments (2, 2 * C, h, w), label)``; index 0 of the first axis is the image as is, 1 the
    horizontally flipped image. Sampling ``mean + exp(logvar / 2) * noise`` in the training step gives
    the same distribution as encoding the (flipped) image each step.
    """

    def __init__(self, moments: torch.Tensor, labels: torch.Tensor, classes: List[str]):
        if len(moments) != len(labels):
            raise ValueError(f"latent cache is inconsistent: {len(moments)} latents for {len(labels)} labels")
        self.moments, self.labels, self.classes = moments, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.moments[index], int(self.labels[index])


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 2 * C, h, w) latent mean and log-variance."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters.float().cpu()


def build_latent_cache(dataset: Dataset, vae, path: str, batch_size: int = 32, show_progress: bool = True):
    """Encode ``dataset`` (both orientations) into a safetensors file at ``path``, written atomically."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    moments, labels = [], []
    for images, batch_labels in tqdm(loader, desc="caching latents", disable=not show_progress):
        both = torch.stack([encode_moments(vae, images), encode_moments(vae, images.flip(-1))], dim=1)
        moments.append(both)  # (B, 2, 2C, h, w)
        labels.append(torch.as_tensor(batch_labels))
    tensors = {"moments": torch.cat(moments).contiguous(), "labels": torch.cat(labels).long()}
    with written_atomically(path, ".safetensors") as temporary:
        save_file(tensors, temporary)


def load_latent_cache(path: str, classes: List[str]) -> LatentMomentsDataset:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as error:
        raise ValueError(f"latent cache {path!r} is unreadable ({error}); delete it to rebuild") from None
    if set(tensors) != {"moments", "labels"}:
        raise ValueError(f"latent cache {path!r} holds {sorted(tensors)}, not moments and labels; delete it to rebuild")
    return LatentMomentsDataset(tensors["moments"], tensors["labels"], classes)
