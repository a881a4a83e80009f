"""``builtin:pairs``: a retrieval-denoising task, paired images cut from ``builtin:photos``' photographs.

Each 32 x 32 image (class = source photograph) holds a random 16 x 32 crop of a photograph in its
top half; its bottom half holds the same crop, shifted cyclically to the right by a random offset
per image (a multiple of ``OFFSET_STEP`` = 4 px: 4 to 28 px, seven offsets), so that with patch 2
or 4 every bottom-half token has an exact partner token in the top half: the token in the same row
of its half, ``offset / patch`` columns to the left (cyclically). Under noise a denoiser can halve the noise
on such a pair only by finding the partner, whose position depends on the image, not on a fixed
offset.

``builtin:pairs_unpaired`` is the control with the same statistics: the bottom half is an
independent crop of the same photograph (and an offset is still drawn, so that both sets use the
same random numbers). ``builtin:pairs_mixed`` alternates the two (even indices paired, odd
unpaired): a model trained on it must find out, image by image, whether a partner exists.

Deterministic, no download (the photographs come with scikit-image), with a held-out split: train
crops come from the left three quarters of each photograph and test crops from the right quarter,
as in ``builtin:photos``. Each item is ``(image (3, 32, 32) in [-1, 1], label)``; ``offsets`` (pixels)
and ``paired`` (bool) are per-image tensors.
"""

from typing import Tuple

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from .builtin_photos import PHOTOS, TRAIN_FRACTION, load_photo

SIZE = 32  # image side
HALF = SIZE // 2  # rows of each half
OFFSET_STEP = 4  # offsets are whole patches for patch 2 and patch 4
PAIRS_PER_CLASS = {"train": 300, "test": 60}
MODES = ("paired", "unpaired", "mixed")


def _crop_origins(image: PIL.Image.Image, split: str, rng: np.random.RandomState, count: int):
    width, height = image.size
    boundary = int(width * TRAIN_FRACTION)
    left, right = (0, boundary) if split == "train" else (boundary, width)
    xs = rng.randint(left, right - SIZE + 1, size=count)
    ys = rng.randint(0, height - HALF + 1, size=count)
    return xs, ys


class BuiltinPairs(Dataset):
    """Paired (or control) images; see the module docstring. ``mode``: paired, unpaired or mixed."""

    def __init__(self, split: str = "train", resolution: int = SIZE, mode: str = "paired"):
        if split not in PAIRS_PER_CLASS:
            raise ValueError(f"split must be one of {sorted(PAIRS_PER_CLASS)}, got {split!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if resolution != SIZE:
            raise ValueError(f"builtin:pairs images are {SIZE} x {SIZE} (the partner geometry is in pixels); "
                             f"got resolution {resolution}")
        self.split, self.resolution, self.mode = split, resolution, mode
        self.classes = list(PHOTOS)
        images, labels, offsets, paired = [], [], [], []
        count = PAIRS_PER_CLASS[split]
        for label, file_name in enumerate(PHOTOS.values()):
            photo = np.asarray(load_photo(file_name))
            rng = np.random.RandomState(7000 + 10 * label + (0 if split == "train" else 1))
            xs, ys = _crop_origins(PIL.Image.fromarray(photo), split, rng, count)
            other_xs, other_ys = _crop_origins(PIL.Image.fromarray(photo), split, rng, count)
            shifts = OFFSET_STEP * rng.randint(1, SIZE // OFFSET_STEP, size=count)
            for i in range(count):
                top = photo[ys[i]:ys[i] + HALF, xs[i]:xs[i] + SIZE]
                is_paired = mode == "paired" or (mode == "mixed" and (len(labels) % 2 == 0))
                if is_paired:
                    bottom = np.roll(top, int(shifts[i]), axis=1)  # bottom[:, x] = top[:, x - offset]
                else:
                    bottom = photo[other_ys[i]:other_ys[i] + HALF, other_xs[i]:other_xs[i] + SIZE]
                images.append(np.concatenate([top, bottom], axis=0))
                labels.append(label)
                offsets.append(int(shifts[i]))
                paired.append(is_paired)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (N, 3, 32, 32) in [0, 255]
        self.images = pixels / 127.5 - 1.0
        self.labels = torch.tensor(labels)
        self.offsets = torch.tensor(offsets)
        self.paired = torch.tensor(paired)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def export(self, folder: str) -> int:
        from .builtin_photos import BuiltinPhotos

        return BuiltinPhotos.export(self, folder)


def partner_tokens(offset_pixels: int, patch: int, grid: int = SIZE) -> torch.Tensor:
    """For one image, the partner of every token on a (grid/patch)^2 token grid, in row-major order:
    a bottom-half token's partner is the top-half token in the same row of its half, offset/patch
    columns to the left (cyclically); top-half tokens get -1."""
    side = grid // patch
    if offset_pixels % patch:
        raise ValueError(f"offset {offset_pixels} px is not a whole number of {patch}-px patches")
    shift = offset_pixels // patch
    partners = torch.full((side * side,), -1, dtype=torch.long)
    for row in range(side // 2, side):
        for col in range(side):
            partners[row * side + col] = (row - side // 2) * side + (col - shift) % side
    return partners
