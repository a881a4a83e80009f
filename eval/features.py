"""Feature extractors and statistics for FID/KID, on top of clean-fid.

Inception (clean-fid's modes ``clean``, ``legacy_tensorflow``, ``legacy_pytorch``) or a domain
classifier (:class:`nala_diffusion.DomainClassifier`) through clean-fid's custom feature extractor.
"""

import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.resize import make_resizer

from nala_diffusion.eval.feature_constants import MODES, TORCHSCRIPT_WEIGHTS  # noqa: F401  (re-exported)

PYTORCH_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
DEFAULT_WEIGHTS_DIR = "/tmp"  # where clean-fid looks for and downloads the torchscript Inception


class MissingWeightsError(RuntimeError):
    """The Inception weights are neither on disk nor downloadable."""


@dataclass
class Extractor:
    name: str  # "inception" or the classifier's path
    mode: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, h, w) in [0, 255] -> (B, D)
    resize: Optional[Callable] = None  # clean-fid custom_fn_resize (numpy image -> numpy image)
    feature_dim: Optional[int] = None

    def describe(self) -> dict:
        return {"name": self.name, "mode": self.mode, "feature_dim": self.feature_dim}


def _missing(file_name: str, where: str, error: Exception) -> MissingWeightsError:
    return MissingWeightsError(
        f"the Inception weights {file_name} are not at {where} and could not be downloaded from "
        f"{inception_url if file_name == TORCHSCRIPT_WEIGHTS else 'the PyTorch FID release'} ({type(error).__name__}: {error}). "
        f"Download {file_name} on a machine with network access and pass --inception_weights /path/to/{file_name} "
        f"(or put it at {where}); or use --feature_extractor with a domain classifier."
    )


def _check_torchscript_archive(path: str) -> None:
    """A TorchScript file is a zip archive; anything else (a truncated download, an HTML error page)
    is refused before it is copied or loaded."""
    import zipfile

    if os.path.exists(path) and not zipfile.is_zipfile(path):
        raise MissingWeightsError(
            f"{path} is not a TorchScript archive (a truncated or failed download?); download {TORCHSCRIPT_WEIGHTS} "
            f"again from {inception_url} and pass it with --inception_weights"
        )


def inception_extractor(mode: str, device: torch.device, weights: Optional[str] = None) -> Extractor:
    """clean-fid's Inception for ``mode``; ``weights`` is a local copy of the weights file."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import InceptionV3

        target = os.path.join(torch.hub.get_dir(), "checkpoints", PYTORCH_WEIGHTS)
        if weights and not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(weights, target)
        try:
            model = InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
        except Exception as error:  # the download inside clean-fid failed
            raise _missing(PYTORCH_WEIGHTS, target, error) from None
        return Extractor("inception", mode, lambda x: model(x / 255)[0].squeeze(-1).squeeze(-1), feature_dim=2048)

    from cleanfid.inception_torchscript import InceptionV3W

    if weights:
        if not os.path.isfile(weights):
            raise _missing(TORCHSCRIPT_WEIGHTS, weights, FileNotFoundError(weights))
        _check_torchscript_archive(weights)
        folder = os.path.dirname(os.path.abspath(weights))
        if os.path.basename(weights) != TORCHSCRIPT_WEIGHTS:  # InceptionV3W wants this file name
            folder = os.path.join(DEFAULT_WEIGHTS_DIR, "nala-inception")
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(weights, os.path.join(folder, TORCHSCRIPT_WEIGHTS))
    else:
        folder = DEFAULT_WEIGHTS_DIR
        try:
            check_download_inception(fpath=folder)
        except Exception as error:
            partial = os.path.join(folder, TORCHSCRIPT_WEIGHTS)
            if os.path.exists(partial) and os.path.getsize(partial) == 0:
                os.remove(partial)  # clean-fid opens the file before the download fails
            raise _missing(TORCHSCRIPT_WEIGHTS, partial, error) from None
    _check_torchscript_archive(os.path.join(folder, TORCHSCRIPT_WEIGHTS))
    try:
        model = InceptionV3W(folder, download=False, resize_inside=mode == "legacy_tensorflow").to(device).eval()
    except Exception as error:  # a zip that is not this TorchScript model
        raise MissingWeightsError(
            f"{os.path.join(folder, TORCHSCRIPT_WEIGHTS)} is not a usable Inception TorchScript file "
            f"({type(error).__name__}: {error}); download {TORCHSCRIPT_WEIGHTS} again from {inception_url}"
        ) from None
    return Extractor("inception", mode, lambda x: model(x), feature_dim=2048)


def classifier_extractor(path: str, device: torch.device) -> Extractor:
    """Penultimate features of a :class:`~nala_diffusion.DomainClassifier` folder (safetensors)."""
    from nala_diffusion.classifier import DomainClassifier

    try:
        model = DomainClassifier.from_pretrained(path, use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a DomainClassifier from {path!r}: {error}") from None
    size = model.config.image_size
    return Extractor(
        os.path.abspath(path), "clean", lambda x: model.features(x / 255),
        resize=make_resizer("PIL", False, "bicubic", (size, size)), feature_dim=model.feature_dim,
    )


def build_extractor(mode: str, device, inception_weights: Optional[str] = None, feature_extractor: Optional[str] = None):
    if feature_extractor:
        return classifier_extractor(feature_extractor, device)
    return inception_extractor(mode, device, inception_weights)


@torch.no_grad()
def image_files(folder: str) -> List[str]:
    """The image files clean-fid reads in ``folder`` (recursively), sorted."""
    from glob import glob

    from cleanfid.fid import EXTENSIONS

    return sorted(f for ext in EXTENSIONS for f in glob(os.path.join(glob_escape(folder), f"**/*.{ext}"), recursive=True))


def glob_escape(path: str) -> str:
    from glob import escape

    return escape(path)


def _first_unreadable(files: Sequence[str]) -> Optional[str]:
    import PIL.Image

    for path in files:
        try:
            with PIL.Image.open(path) as image:
                image.load()
        except Exception:
            return path
    return None


def folder_features(folder: str, extractor: Extractor, device, batch_size: int = 32, verbose: bool = True,
                    files: Optional[Sequence[str]] = None) -> np.ndarray:
    """Features of the images in ``folder`` (or of exactly ``files``), one row per image in sorted order."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    files = list(files) if files is not None else image_files(folder)
    if not files:
        raise ValueError(f"image folder {folder!r} holds no images")
    try:
        features = cleanfid_fid.get_files_features(
            files, model=extractor.fn, num_workers=0, batch_size=batch_size, device=device, mode=extractor.mode,
            custom_fn_resize=extractor.resize, description=f"features {os.path.basename(folder.rstrip('/'))}",
            verbose=verbose,
        )
    except (OSError, ValueError) as error:
        bad = _first_unreadable(files)
        if bad is None:
            raise
        raise ValueError(f"cannot read the image {bad!r} ({error}); remove or replace it") from None
    return features.astype(np.float64)


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    return float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, seed: int = 0) -> float:
    state = np.random.get_state()
    np.random.seed(seed)  # clean-fid draws its KID subsets from numpy's global generator
    try:
        return float(cleanfid_fid.kernel_distance(features1, features2))
    finally:
        np.random.set_state(state)


def save_stats(path: str, features: np.ndarray, extractor: Extractor, keep_features: bool = False) -> None:
    mu, sigma = statistics(features)
    arrays = {"mu": mu, "sigma": sigma, "num_images": np.array(len(features)),
              "extractor": np.array(extractor.name), "mode": np.array(extractor.mode)}
    if keep_features:
        arrays["features"] = features
    temporary = f"{path}.tmp.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def load_stats(path: str, extractor: Extractor):
    """(mu, sigma, features or None) from a stats file made with the same extractor."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(f"cannot read reference statistics {path!r}: {error}") from None
    if "mu" not in data or "sigma" not in data:
        raise ValueError(f"{path!r} has no mu/sigma arrays")
    saved = (str(data["extractor"]) if "extractor" in data else "inception", str(data["mode"]) if "mode" in data else "clean")
    if saved != (extractor.name, extractor.mode):
        raise ValueError(f"{path!r} was made with extractor {saved[0]} mode {saved[1]}, not {extractor.name} mode {extractor.mode}")
    return data["mu"], data["sigma"], data["features"] if "features" in data else None
