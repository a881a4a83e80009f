"""Sample sets for evaluation that do not depend on the number of processes (as NVlabs/edm does): their files,
labels, batches and fingerprints (the sampling itself is the tools', :mod:`nala_diffusion.eval.sample_sets`).

Image ``i`` has its own generator seeded ``seed + i`` and its own label. The indices are cut into
fixed batches of ``batch_size`` consecutive indices, and the batches are dealt to the processes as
``batches[rank::world_size]``: a batch holds the same images on 1 or 64 processes, so every image
comes out byte-identical. Each image is written as ``samples/{i:06d}.png`` (aside, then renamed); a
rerun regenerates the batches that hold a missing or unreadable image and writes only those images.
"""

import os
import shutil
from typing import Iterator, List, Optional, Sequence

import numpy as np
import PIL.Image

from nala_diffusion.utils.files import written_atomically
from nala_diffusion.utils.run_guard import check_fingerprint

SAMPLE_DIR = "samples"


def sample_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, SAMPLE_DIR, f"{index:06d}.png")


def is_valid_image(path: str, size: Optional[Sequence[int]] = None) -> bool:
    """True when ``path`` is a complete, decodable image (of ``size`` = (width, height) if given)."""
    if not os.path.isfile(path):
        return False
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decodes every byte: a truncated PNG fails here
            return size is None or tuple(image.size) == tuple(size)
    except Exception:  # any decoder error means the file must be written again
        return False


def balanced_labels(num_samples: int, num_classes: int, labels: Optional[Sequence[int]] = None) -> List[int]:
    """Label of every image index: the given labels cycled, or every class in turn (class-balanced)."""
    cycle = list(labels) if labels else list(range(num_classes))
    return [cycle[i % len(cycle)] for i in range(num_samples)]


LABEL_DRAWS = ("balanced", "uniform")
_LABEL_STREAM = 0x1ABE1  # keeps the label draws apart from the image noise, which is seeded seed + i too


def uniform_labels(num_samples: int, num_classes: int, seed: int) -> List[int]:
    """Label of every image index drawn uniformly at random, as DiT's ``sample_ddp.py`` draws them, but
    from a stream per image (numpy's SeedSequence of (stream, seed, i)), so that image i has the same
    label on any number of processes."""
    import numpy as np

    return [int(np.random.default_rng([_LABEL_STREAM, seed, i]).integers(num_classes)) for i in range(num_samples)]


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> List[List[int]]:
    batches = [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]
    return batches[rank::world_size]


def save_png_atomically(image: PIL.Image.Image, path: str) -> None:
    with written_atomically(path, ".png") as temporary:
        image.save(temporary, format="PNG")


#: in an exported reference folder: what it was exported from (written last, so its presence means complete)
REFERENCE_SOURCE = ".reference.json"


def export_reference(dataset: str, resolution: int, folder: str, overwrite: bool = False, split: str = "test") -> str:
    """``folder`` holding the ``split`` images of ``dataset`` at ``resolution`` as PNGs: exported aside
    and renamed, with a record of its source, so that an interrupted export is never adopted and a
    folder exported from another dataset or size is refused (``overwrite`` exports it again)."""
    import json

    from nala_diffusion.data.datasets import load_dataset

    source = {"dataset": dataset, "resolution": resolution, "split": split}
    if os.path.isdir(folder):
        recorded = None
        marker = os.path.join(folder, REFERENCE_SOURCE)
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as handle:
                recorded = json.load(handle)
        if recorded is not None and {k: recorded.get(k) for k in source} == source:
            return folder
        if not overwrite:
            what = (f"the {recorded['split']} images of {recorded['dataset']} at {recorded['resolution']} px"
                    if recorded else "images of unknown origin (an interrupted export?)")
            raise ValueError(f"{folder!r} holds {what}, not the {split} images of {dataset} at {resolution} px; pass "
                             "--overwrite to export them again, or remove the folder")
        shutil.rmtree(folder)
    temporary = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    count = load_dataset(dataset, resolution, split=split).export(temporary)
    with open(os.path.join(temporary, REFERENCE_SOURCE), "w", encoding="utf-8") as handle:
        json.dump({**source, "images": count}, handle)
    os.replace(temporary, folder)
    return folder


#: files made from a samples folder's images, removed with them by --overwrite
DERIVED_FILES = ("fid.json", "samples.npz")


def guard_samples(out_dir: str, fingerprint: dict, overwrite: bool = False, write: bool = True) -> str:
    """Refuse to add to ``out_dir/samples`` images made with another fingerprint (model weights and
    config, scheduler, steps, guidance, size, labels, seed, code version), naming what differs;
    with ``overwrite`` the old images are removed first. See :func:`~nala_diffusion.utils.run_guard.check_fingerprint`.
    Temporary files of a run killed while writing an image (``.tmp-*``) are removed."""
    samples = os.path.join(out_dir, SAMPLE_DIR)

    def has_outputs() -> bool:
        return os.path.isdir(samples) and any(name.endswith(".png") for name in os.listdir(samples))

    def clear() -> None:  # the images and everything made from them
        shutil.rmtree(samples, ignore_errors=True)
        for name in DERIVED_FILES:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))

    status = check_fingerprint(out_dir, fingerprint, overwrite=overwrite, has_outputs=has_outputs, clear=clear,
                               what="samples", write=write)
    if write and os.path.isdir(samples):  # before any process writes: images of a killed run never renamed into place
        for name in os.listdir(samples):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(samples, name))
    return status


def iter_sample_paths(out_dir: str, num_samples: int) -> Iterator[str]:
    for i in range(num_samples):
        yield sample_path(out_dir, i)


def pack_npz(out_dir: str, num_samples: int, path: str) -> None:
    """All samples as ``arr_0`` (N, H, W, 3) uint8, the format of OpenAI's ADM evaluator."""
    images = np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in iter_sample_paths(out_dir, num_samples)])
    with written_atomically(path, ".npz") as temporary:
        np.savez(temporary, arr_0=images)
