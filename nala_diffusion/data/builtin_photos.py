"""``builtin:photos``: a 10-class image dataset cut from the photographs that scikit-image ships.

One class per photograph; each image is a crop of it. No download: the files come inside the
scikit-image wheel (``skimage/data``). The split is deterministic and the two splits never overlap:
each photograph (shorter side resized to 128 px) gives its training crops from its left three
quarters and its test crops from its right quarter, at fixed pseudo-random positions.

Licences (as scikit-image documents them): astronaut (NASA, public domain), chelsea (CC0, Stefan
van der Walt), coffee (CC0, Rachel Michetti), hubble_deep_field (NASA, public domain), ihc (no known
copyright restrictions), retina (CC0, Mikael Häggström), rocket (SpaceX, public domain), camera (CC0,
Lav Varshney), grass (CC0), brick (CC0, CC0Textures). The last three are greyscale photographs,
served as RGB.
"""

import importlib.util
import os
from typing import Dict, List, Tuple

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

PHOTOS: Dict[str, str] = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "galaxies": "hubble_deep_field.jpg",
    "tissue": "ihc.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "camera": "camera.png",
    "grass": "grass.png",
    "brick": "brick.png",
}
SHORT_SIDE = 128  # photographs are resized to this before cropping
CROP = 32  # crop side at that scale
CROPS_PER_CLASS = {"train": 300, "test": 100}
TRAIN_FRACTION = 0.75  # of the width; the test crops come from the rest


def skimage_data_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("builtin:photos needs scikit-image (pip install scikit-image), whose wheel holds the photographs")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_photo(file_name: str) -> PIL.Image.Image:
    path = os.path.join(skimage_data_dir(), file_name)
    if not os.path.isfile(path):
        raise ValueError(f"scikit-image's photograph {path} is missing; reinstall scikit-image")
    image = PIL.Image.open(path).convert("RGB")
    scale = SHORT_SIDE / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.BICUBIC)


def crops(image: PIL.Image.Image, split: str, count: int, seed: int) -> List[PIL.Image.Image]:
    """``count`` CROP x CROP crops from the split's region of ``image``, at seeded positions."""
    width, height = image.size
    boundary = int(width * TRAIN_FRACTION)
    left, right = (0, boundary) if split == "train" else (boundary, width)
    rng = np.random.RandomState(seed)
    xs = rng.randint(left, right - CROP + 1, size=count)
    ys = rng.randint(0, height - CROP + 1, size=count)
    return [image.crop((x, y, x + CROP, y + CROP)) for x, y in zip(xs, ys)]


class BuiltinPhotos(Dataset):
    """Items ``(image (3, resolution, resolution) in [-1, 1], label)``; ``classes`` names the labels."""

    def __init__(self, split: str = "train", resolution: int = CROP):
        if split not in CROPS_PER_CLASS:
            raise ValueError(f"split must be one of {sorted(CROPS_PER_CLASS)}, got {split!r}")
        self.split, self.resolution = split, resolution
        self.classes = list(PHOTOS)
        images, labels = [], []
        for label, (name, file_name) in enumerate(PHOTOS.items()):
            seed = 1000 * label + (0 if split == "train" else 1)
            for crop in crops(load_photo(file_name), split, CROPS_PER_CLASS[split], seed):
                if resolution != CROP:
                    crop = crop.resize((resolution, resolution), PIL.Image.BICUBIC)
                images.append(np.asarray(crop))
                labels.append(label)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (N, 3, R, R) in [0, 255]
        self.images = pixels / 127.5 - 1.0
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def export(self, folder: str) -> int:
        """Write the images as PNGs (``folder/<class>/<index>.png``), e.g. as an FID reference."""
        from nala_diffusion.data.datasets import export_images

        return export_images(self, folder)
