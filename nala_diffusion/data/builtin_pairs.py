"""``builtin:pairs``: a retrieval-denoising task, paired images cut from ``builtin:photos``' photographs.

Each 32 x 32 image (class = source photograph) has a top half (16 x 32 px) and a bottom half that
holds the same pixels, shifted cyclically to the right by a random offset per image (a multiple of
``OFFSET_STEP`` = 4 px: 4 to 28 px, seven offsets). With patch 2 or 4 every bottom-half token thus
has an exact partner token in the top half: the token in the same row of its half, ``offset / patch``
columns to the left (cyclically). Under noise a denoiser can halve the noise on such a pair only by
finding the partner, whose position depends on the image, not on a fixed offset.

Two layouts of the top half:

- ``tiles`` (``builtin:pairs``): a mosaic of 4 x 8 tiles of 4 x 4 px, each a random 4 x 4 crop of the
  photograph. Neighbouring tiles are unrelated, so a bottom-half token's neighbours say little about
  it and its partner is the one token that does. This is the calibrated task: it separates softmax
  from ReLU linear attention (docs/results.md, "Retrieval").
- ``crops`` (``builtin:pairs_crops``): one 16 x 32 crop of the photograph, the task's first layout.
  Neighbouring tokens are alike, so a denoiser does much from its neighbours alone, and a window
  around the partner, not the partner alone, is what attention can be credited for finding.

``..._unpaired`` is the control with the same statistics: the bottom half is an independent mosaic
(or crop) of the same photograph, and an offset is still drawn, so that both sets use the same
random numbers. ``..._mixed`` alternates the two (even indices paired, odd unpaired): a model
trained on it must find out, image by image, whether a partner exists.

Deterministic, no download (the photographs come with scikit-image), with a held-out split: train
crops come from the left three quarters of each photograph and test crops from the right quarter,
as in ``builtin:photos``. Each item is ``(image (3, 32, 32) in [-1, 1], label)``; ``offsets`` (pixels)
and ``paired`` (bool) are per-image tensors.
"""

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from nala_diffusion.data.builtin_photos import PHOTOS, TRAIN_FRACTION, load_photo

SIZE = 32  # image side
HALF = SIZE // 2  # rows of each half
OFFSET_STEP = 4  # offsets are whole patches for patch 2 and patch 4
TILE = 4  # tile side of the tiles layout (a whole number of patches at patch 2 and 4)
PAIRS_PER_CLASS = {"train": 300, "test": 60}
MODES = ("paired", "unpaired", "mixed")
LAYOUTS = ("tiles", "crops")


def _crop_origins(photo: np.ndarray, split: str, rng: np.random.RandomState, count, width: int, height: int):
    """Top-left corners of ``count`` (an int or a shape) random width x height crops from the split's
    part of the photograph (train: the left three quarters, test: the rest)."""
    boundary = int(photo.shape[1] * TRAIN_FRACTION)
    left, right = (0, boundary) if split == "train" else (boundary, photo.shape[1])
    xs = rng.randint(left, right - width + 1, size=count)
    ys = rng.randint(0, photo.shape[0] - height + 1, size=count)
    return xs, ys


def _halves(photo: np.ndarray, split: str, rng: np.random.RandomState, count: int, layout: str) -> np.ndarray:
    """``count`` top halves (count, HALF, SIZE, 3) of the given layout."""
    if layout == "crops":
        xs, ys = _crop_origins(photo, split, rng, count, SIZE, HALF)
        return np.stack([photo[y:y + HALF, x:x + SIZE] for x, y in zip(xs, ys)])
    rows, columns = HALF // TILE, SIZE // TILE
    xs, ys = _crop_origins(photo, split, rng, (count, rows, columns), TILE, TILE)
    offsets = np.arange(TILE)
    # pixel (i, r * TILE + a, c * TILE + b) = photo[ys[i, r, c] + a, xs[i, r, c] + b]
    y = ys[:, :, None, :, None] + offsets[None, None, :, None, None]
    x = xs[:, :, None, :, None] + offsets[None, None, None, None, :]
    tiles = photo[y, x]  # (count, rows, TILE, columns, TILE, 3)
    return tiles.reshape(count, HALF, SIZE, photo.shape[2])


class BuiltinPairs(Dataset):
    """Paired (or control) images; see the module docstring. ``mode``: paired, unpaired or mixed;
    ``layout``: tiles or crops."""

    def __init__(self, split: str = "train", resolution: int = SIZE, mode: str = "paired", layout: str = "tiles"):
        if split not in PAIRS_PER_CLASS:
            raise ValueError(f"split must be one of {sorted(PAIRS_PER_CLASS)}, got {split!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if resolution != SIZE:
            raise ValueError(f"builtin:pairs images are {SIZE} x {SIZE} (the partner geometry is in pixels); "
                             f"got resolution {resolution}")
        self.split, self.resolution, self.mode, self.layout = split, resolution, mode, layout
        self.classes = list(PHOTOS)
        images, labels, offsets, paired = [], [], [], []
        count = PAIRS_PER_CLASS[split]
        for label, file_name in enumerate(PHOTOS.values()):
            photo = np.asarray(load_photo(file_name))
            rng = np.random.RandomState(7000 + 10 * label + (0 if split == "train" else 1))
            tops = _halves(photo, split, rng, count, layout)
            others = _halves(photo, split, rng, count, layout)
            shifts = OFFSET_STEP * rng.randint(1, SIZE // OFFSET_STEP, size=count)
            for i in range(count):
                top = tops[i]
                is_paired = mode == "paired" or (mode == "mixed" and (len(labels) % 2 == 0))
                if is_paired:
                    bottom = np.roll(top, int(shifts[i]), axis=1)  # bottom[:, x] = top[:, x - offset]
                else:
                    bottom = others[i]
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
        from nala_diffusion.data.datasets import export_images

        return export_images(self, folder)


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
