"""Feature extractors and statistics for FID/KID, on top of clean-fid.

Inception (clean-fid's modes ``clean``, ``legacy_tensorflow``, ``legacy_pytorch``) or a domain
classifier (:class:`nala_diffusion.DomainClassifier`) through clean-fid's custom feature extractor.
"""

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.resize import make_resizer
from cleanfid.utils import ResizeDataset
from tqdm.auto import tqdm

from nala_diffusion.metrics.feature_constants import MODES, TORCHSCRIPT_WEIGHTS  # noqa: F401  (re-exported)
from nala_diffusion.metrics.scores import statistics
from nala_diffusion.utils.files import written_atomically

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
    # the class logits of the pooled features, for the Inception Score: (N, D) -> (N, classes)
    logits: Optional[Callable[[np.ndarray], np.ndarray]] = None
    # the spatial features of sFID: (B, 3, h, w) in [0, 255] -> (B, S)
    spatial: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # why a metric is missing: {"is": reason, "sfid": reason}
    unavailable: dict = field(default_factory=dict)
    path: Optional[str] = None  # where the network was loaded from (its name identifies its weights)

    def describe(self) -> dict:
        return {"name": self.name, "mode": self.mode, "feature_dim": self.feature_dim, "path": self.path}

    def check_metrics(self, metrics) -> None:
        """A ``ValueError`` naming the first of ``metrics`` this network cannot compute, and why."""
        for metric, missing in (("is", self.logits is None), ("sfid", self.spatial is None)):
            if metric in metrics and missing:
                raise ValueError(f"--metrics {metric} is not available with this feature extractor: "
                                 f"{self.unavailable.get(metric, 'it has no such output')}")


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
        return Extractor("inception", mode, lambda x: model(x / 255)[0].squeeze(-1).squeeze(-1), feature_dim=2048,
                         unavailable={"is": NO_LOGITS_PYTORCH, "sfid": NO_SPATIAL_MODE.format(mode=mode)})

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
    logits, spatial, unavailable = inception_heads(model.base, mode)
    return Extractor("inception", mode, lambda x: model(x), feature_dim=2048, logits=logits, spatial=spatial,
                     unavailable=unavailable)


NO_LOGITS_PYTORCH = ("the legacy_pytorch network (pytorch-fid's Inception) has no class layer; use --mode clean or "
                     "legacy_tensorflow, whose network is the one the Inception Score is defined with")
NO_SPATIAL_MODE = ("sFID's spatial features (mixed_6/conv) are taken on the images as --mode clean resizes them; "
                   "--mode {mode} resizes elsewhere, so sFID is offered with --mode clean only")
#: layers of the TorchScript Inception up to mixed_5, then mixed_6's first convolution: sFID's mixed_6/conv
SPATIAL_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                  "mixed_3", "mixed_4", "mixed_5")
SPATIAL_CHANNELS = 7


def inception_heads(base: torch.nn.Module, mode: str):
    """(logits, spatial, unavailable) of the TorchScript Inception ``base``: class logits of the pooled
    features from its output layer without the bias (the Inception Score's definition), and the first
    7 channels of ``mixed_6/conv`` (sFID); each None, with the reason in ``unavailable``, where the
    network does not expose it."""
    unavailable = {}
    logits = spatial = None
    output = getattr(base, "output", None)
    weight = getattr(output, "weight", None)
    if weight is not None and tuple(weight.shape[1:]) == (2048,):
        matrix = weight.detach().double().cpu().numpy().T  # (2048, classes)
        logits = lambda features: np.asarray(features, dtype=np.float64) @ matrix  # noqa: E731
    else:
        unavailable["is"] = "this Inception network exposes no 2048-input output layer"
    if mode != "clean":
        unavailable["sfid"] = NO_SPATIAL_MODE.format(mode=mode)
    else:
        try:
            layers = base.layers
            stages = torch.nn.Sequential(*[getattr(layers, name) for name in SPATIAL_LAYERS], layers.mixed_6.conv)
        except AttributeError as error:
            unavailable["sfid"] = f"this Inception network does not expose mixed_6/conv ({error})"
        else:
            def mixed_6_conv(x):  # x in [0, 255], already 299 x 299 (clean mode resizes before the network)
                out = stages((x - 128) / 128)  # (B, 192, 17, 17)
                return out[:, :SPATIAL_CHANNELS].flatten(1)  # (B, 7 * 17 * 17)
            spatial = mixed_6_conv
    return logits, spatial, unavailable


def classifier_extractor(path: str, device: torch.device) -> Extractor:
    """Penultimate features of a :class:`~nala_diffusion.DomainClassifier` folder (safetensors)."""
    from nala_diffusion.metrics.classifier import DomainClassifier

    try:
        model = DomainClassifier.from_pretrained(path, use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a DomainClassifier from {path!r}: {error}") from None
    size = model.config.image_size

    weight = model.head.weight.detach().double().cpu().numpy()
    bias = model.head.bias.detach().double().cpu().numpy()

    def logits(features: np.ndarray) -> np.ndarray:  # the classifier's own head on its pooled features
        return np.asarray(features, dtype=np.float64) @ weight.T + bias

    from nala_diffusion.utils.run_guard import folder_weights_hash

    # named by its weights, not its path: a stats file made with other weights is refused, a copy accepted
    return Extractor(
        f"{CLASSIFIER_PREFIX}{folder_weights_hash(path)[:16]}", "clean", lambda x: model.features(x / 255),
        path=os.path.abspath(path),
        resize=make_resizer("PIL", False, "bicubic", (size, size)), feature_dim=model.feature_dim, logits=logits,
        unavailable={"sfid": "sFID is defined on Inception's spatial features; a domain classifier has none"},
    )


CLASSIFIER_PREFIX = "domain-classifier:"


def recorded_classifier(source: str) -> Optional[str]:
    """The domain-classifier folder a stats file of ``nala-fid ref`` was made with, when it was (None for
    Inception statistics and anything else). The folder recorded must still hold the same weights; else a
    ``ValueError`` says which extractor to pass."""
    if not (isinstance(source, str) and source.endswith(".npz") and os.path.isfile(source)):
        return None
    try:
        with np.load(source, allow_pickle=False) as data:
            name = str(data["extractor"]) if "extractor" in data.files else ""
            path = str(data["extractor_path"]) if "extractor_path" in data.files else None
    except (OSError, ValueError):
        return None  # unreadable: the reference checks say so
    if not name.startswith(CLASSIFIER_PREFIX):
        return None
    from nala_diffusion.utils.run_guard import folder_weights_hash

    if path and os.path.isdir(path):
        try:
            if CLASSIFIER_PREFIX + folder_weights_hash(path)[:16] == name:
                return path
        except ValueError:
            pass
    raise ValueError(f"{source!r} was made with the domain classifier {name[len(CLASSIFIER_PREFIX):]} (weights hash)"
                     + (f" at {path!r}, which no longer holds those weights" if path else "")
                     + "; pass --feature_extractor with that classifier's folder")


def build_extractor(mode: str, device, inception_weights: Optional[str] = None, feature_extractor: Optional[str] = None):
    if feature_extractor:
        return classifier_extractor(feature_extractor, device)
    return inception_extractor(mode, device, inception_weights)


@torch.no_grad()
def image_files(folder: str) -> List[str]:
    """The image files in ``folder`` (recursively), sorted: clean-fid's image extensions, without its
    ``.npy`` (a stray ``labels.npy`` is not an image)."""
    from glob import glob

    from cleanfid.fid import EXTENSIONS

    return sorted(f for ext in EXTENSIONS if ext.lower() != "npy"
                  for f in glob(os.path.join(glob_escape(folder), f"**/*.{ext}"), recursive=True))


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


def _network(extractor: Extractor, spatial: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The extractor's pooled features, with the spatial ones appended when asked (one pass)."""
    if not spatial:
        return extractor.fn
    extractor.check_metrics(["sfid"])
    return lambda x: torch.cat([extractor.fn(x).flatten(1), extractor.spatial(x)], dim=1)


def _split(features: np.ndarray, extractor: Extractor, spatial: bool):
    features = features.astype(np.float64)
    if not spatial:
        return features
    return features[:, :extractor.feature_dim], features[:, extractor.feature_dim:]


def folder_features(folder: str, extractor: Extractor, device, batch_size: int = 32, verbose: bool = True,
                    files: Optional[Sequence[str]] = None, spatial: bool = False):
    """Features of the images in ``folder`` (or of exactly ``files``), one row per image in sorted order;
    with ``spatial``, (pooled, spatial) features from one pass."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    files = list(files) if files is not None else image_files(folder)
    if not files:
        raise ValueError(f"image folder {folder!r} holds no images")
    try:
        loader = torch.utils.data.DataLoader(FileImages(files, extractor.mode, extractor.resize), batch_size=batch_size,
                                             shuffle=False, num_workers=0)
        network = _network(extractor, spatial)
        batches = tqdm(loader, desc=f"features {os.path.basename(folder.rstrip('/'))}") if verbose else loader
        features = np.concatenate([cleanfid_fid.get_batch_features(batch, network, device) for batch in batches])
    except (OSError, ValueError) as error:
        bad = _first_unreadable(files)
        if bad is None:
            raise
        raise ValueError(f"cannot read the image {bad!r} ({error}); remove or replace it") from None
    return _split(features, extractor, spatial)


class FileImages(ResizeDataset):
    """clean-fid's ``ResizeDataset`` over image files, each read as training reads it
    (:func:`~nala_diffusion.data.datasets.load_rgb`: 16-bit greyscale scaled to 8 bits, where clean-fid's
    ``convert("RGB")`` would clip it to white); 8-bit images give clean-fid's own pixels."""

    def __init__(self, files: Sequence[str], mode: str, fn_resize: Optional[Callable] = None):
        super().__init__(files=list(files), mode=mode)
        if fn_resize is not None:
            self.fn_resize = fn_resize

    def pixels(self, i) -> np.ndarray:
        from nala_diffusion.data.datasets import load_rgb

        return np.array(load_rgb(str(self.files[i])))

    def __getitem__(self, i):
        resized = self.fn_resize(self.pixels(i))
        if resized.dtype == "uint8":
            return self.transforms(np.array(resized)) * 255
        return self.transforms(resized)


class ArrayImages(FileImages):
    """clean-fid's ``ResizeDataset`` over an in-memory ``(N, H, W, 3)`` uint8 array (the guided-diffusion
    evaluator's ``arr_0``): the same resize and scaling as for image files, so an array and a folder of
    the same images (PNG, lossless) give the same features."""

    def __init__(self, images: np.ndarray, mode: str, fn_resize: Optional[Callable] = None):
        super().__init__(range(len(images)), mode, fn_resize)
        self.images = images

    def pixels(self, i) -> np.ndarray:
        return np.asarray(self.images[i])


def array_features(images: np.ndarray, extractor: Extractor, device, batch_size: int = 32, verbose: bool = True,
                   spatial: bool = False, description: str = "features"):
    """Features of ``(N, H, W, 3)`` uint8 images in memory, as :func:`folder_features` gives them for files."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"expected (N, height, width, 3) uint8 images, got {images.dtype} {images.shape}")
    loader = torch.utils.data.DataLoader(ArrayImages(images, extractor.mode, extractor.resize), batch_size=batch_size,
                                         shuffle=False, num_workers=0)
    network = _network(extractor, spatial)
    batches = tqdm(loader, desc=description) if verbose else loader
    features = np.concatenate([cleanfid_fid.get_batch_features(batch, network, device) for batch in batches])
    return _split(features, extractor, spatial)


@dataclass
class Reference:
    """What a reference gives: pooled statistics always; features (KID, precision/recall) and spatial
    statistics (sFID) where it has them."""

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    num_images: Optional[int] = None
    kind: str = "folder"

    @classmethod
    def from_features(cls, features: np.ndarray, spatial: Optional[np.ndarray] = None, kind: str = "folder"):
        mu_s, sigma_s = statistics(spatial) if spatial is not None else (None, None)
        return cls(*statistics(features), features=features, mu_s=mu_s, sigma_s=sigma_s, num_images=len(features),
                   kind=kind)

    def allows(self) -> List[str]:
        """The metrics this reference supports (the extractor may allow fewer)."""
        return reference_allows(self.features is not None, self.mu_s is not None)


def reference_allows(features: bool, spatial: bool) -> List[str]:
    """The metrics a reference with (or without) features and spatial statistics supports; IS needs no
    reference and is always listed."""
    return ["fid"] + (["kid"] if features else []) + ["is"] + (["pr"] if features else []) + (["sfid"] if spatial else [])


def check_reference_metrics(metrics, allows: Sequence[str], source: str, kind: str) -> None:
    missing = [m for m in metrics if m not in allows]
    if missing:
        needs = {"kid": "its features", "pr": "its features", "sfid": "its spatial statistics", "fid": "its statistics"}
        raise ValueError(
            f"--metrics {' '.join(missing)} need(s) {' and '.join(sorted({needs[m] for m in missing}))} of the "
            f"reference, which {source!r} ({kind}) does not hold; it allows {' '.join(allows)}. Pass the image "
            "folder (or an evaluator .npz with images), or make a stats file with "
            "`nala-fid ref --images DIR --out ref.npz --metrics " + " ".join(metrics) + "`")


def _npz_header(path: str, key: str) -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape, dtype) of array ``key`` in an .npz, read from its header without loading it."""
    import zipfile

    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
    return tuple(shape), np.dtype(dtype)


def check_npz_arrays(source: str, keys, extractor: "Extractor") -> None:
    """Refuse, from the headers alone, an .npz whose arrays cannot serve: evaluator images that are not
    (N, H, W, 3) uint8, or statistics without both mu and sigma of the extractor's feature size."""
    if EVALUATOR_IMAGES in keys:
        shape, dtype = _npz_header(source, EVALUATOR_IMAGES)
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or shape[0] == 0:
            raise ValueError(f"{source!r}: its images ({EVALUATOR_IMAGES}) are {dtype} {shape}; a reference batch holds "
                             "(N, height, width, 3) uint8 RGB images (not float, channels-first, greyscale or RGBA)")
        return
    if ("mu" in keys) != ("sigma" in keys):
        raise ValueError(f"{source!r} holds {'mu' if 'mu' in keys else 'sigma'} without "
                         f"{'sigma' if 'mu' in keys else 'mu'}; FID needs both")
    if "mu" in keys:
        (mu_shape, _), (sigma_shape, _) = _npz_header(source, "mu"), _npz_header(source, "sigma")
        size = extractor.feature_dim
        if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]) or (size and mu_shape[0] != size):
            raise ValueError(f"{source!r}: mu {mu_shape} and sigma {sigma_shape} do not fit {extractor.name}'s "
                             f"{size}-dimensional features (mu ({size},), sigma ({size}, {size}))")


def reference_signature(source: str) -> Optional[Tuple[int, int]]:
    """(size, modification time) of a reference file, to see at load time that it is the file that was
    checked before sampling; None for folders, built-in data and names."""
    if not os.path.isfile(source):
        return None
    stat = os.stat(source)
    return stat.st_size, stat.st_mtime_ns


#: ``--ref builtin:<name>[:<split>]``: a built-in dataset's images (default split: train)
BUILTIN_PREFIX = "builtin:"
BUILTIN_REFERENCE_SIZE = 32  # the built-in datasets' own size, where the samples' size is not known


def builtin_reference(source: str, resolution: Optional[int] = None):
    """The dataset behind ``builtin:<name>[:<split>]`` at ``resolution`` (default: the dataset's own size)."""
    from nala_diffusion.data.datasets import BUILTIN_DATASETS, load_dataset

    name, _, split = source[len(BUILTIN_PREFIX):].partition(":")
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"--ref {source!r}: unknown built-in dataset; available: "
                         + ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_DATASETS)))
    try:
        return load_dataset(BUILTIN_PREFIX + name, resolution or BUILTIN_REFERENCE_SIZE, split=split or "train")
    except ValueError as error:
        raise ValueError(f"--ref {source!r}: {error}") from None


def builtin_reference_images(source: str, resolution: Optional[int] = None) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images of a built-in dataset, the pixels its PNG export would hold."""
    dataset = builtin_reference(source, resolution)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, H, W) in [-1, 1]
    return ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def peek_reference(source: str, extractor: Extractor) -> Tuple[str, List[str], Optional[int]]:
    """(kind, metrics it allows, image count or None) of a ``--ref``, read cheaply (no features), so that
    a run can refuse an unusable reference before it samples; every refusal of a reference is here."""
    if source.startswith(BUILTIN_PREFIX):
        return "built-in dataset", reference_allows(True, True), len(builtin_reference(source))
    if os.path.isdir(source):
        count = len(image_files(source))
        if count == 0:
            raise ValueError(f"reference folder {source!r} holds no images")
        return "folder", reference_allows(True, True), count
    if not os.path.isfile(source):
        if source.endswith(".npz") or os.sep in source or not source:
            raise ValueError(f"--ref {source!r}: no such file or folder")
        if extractor.name != "inception":
            raise ValueError(f"--ref {source!r} is neither a folder nor a stats file (custom-stats names are Inception only)")
        import cleanfid

        stats = os.path.join(os.path.dirname(cleanfid.__file__), "stats", f"{source}_{extractor.mode}_custom_na.npz".lower())
        if not os.path.isfile(stats):
            raise ValueError(f"--ref {source!r} is not a folder, a file, a built-in dataset (builtin:<name>) or a clean-fid "
                             f"custom-stats name registered for mode {extractor.mode} (no {stats})")
        return "clean-fid custom statistics", reference_allows(False, False), None
    try:
        with np.load(source, allow_pickle=False) as data:
            keys = set(data.files)
            saved = (str(data["extractor"]), str(data["mode"]) if "mode" in keys else "clean") if "extractor" in keys \
                else None
            count = int(data["num_images"]) if "num_images" in keys else None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read reference statistics {source!r}: {error}") from None
    if saved is not None and saved != (extractor.name, extractor.mode):
        raise ValueError(f"{source!r} was made with extractor {saved[0]} mode {saved[1]}, not {extractor.name} "
                         f"mode {extractor.mode}")
    try:
        check_npz_arrays(source, keys, extractor)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(str(error) if isinstance(error, ValueError) else f"cannot read {source!r}: {error}") from None
    if is_evaluator_batch(keys):
        if EVALUATOR_IMAGES in keys:
            return "evaluator images", reference_allows(True, True), _npz_header(source, EVALUATOR_IMAGES)[0][0]
        if extractor.name != "inception":
            raise ValueError(f"{source!r} holds the evaluator's Inception statistics, which cannot serve the "
                             f"domain classifier {extractor.name}; give a reference with images")
        return "evaluator statistics", reference_allows(False, False), None
    if "mu" not in keys or "sigma" not in keys:
        raise ValueError(f"{source!r} has no mu/sigma arrays (nor the evaluator's arr_0 images)")
    if saved != (extractor.name, extractor.mode):
        raise ValueError(f"{source!r} was made with extractor {saved[0]} mode {saved[1]}, not {extractor.name} "
                         f"mode {extractor.mode}")
    return "stats file", reference_allows("features" in keys, "mu_s" in keys), count


def save_stats(path: str, reference: Reference, extractor: Extractor, keep_features: bool = False) -> None:
    """Write ``reference`` as our stats file (mu, sigma, and features and spatial statistics when
    kept), aside and then renamed."""
    arrays = {"mu": reference.mu, "sigma": reference.sigma, "num_images": np.array(reference.num_images),
              "extractor": np.array(extractor.name), "mode": np.array(extractor.mode)}
    if extractor.path and extractor.name.startswith(CLASSIFIER_PREFIX):  # so that compare/calc find it again
        arrays["extractor_path"] = np.array(extractor.path)
    if keep_features and reference.features is not None:
        arrays["features"] = reference.features
    if reference.mu_s is not None:
        arrays["mu_s"], arrays["sigma_s"] = reference.mu_s, reference.sigma_s
    with written_atomically(path, ".npz") as temporary:
        np.savez(temporary, **arrays)


#: keys of the guided-diffusion evaluator's reference batches (VIRTUAL_imagenet256_labeled.npz, ...)
EVALUATOR_IMAGES = "arr_0"


def is_evaluator_batch(data) -> bool:
    """An evaluator reference batch: images under ``arr_0`` and/or its own statistics, none of our keys."""
    return "extractor" not in data and (EVALUATOR_IMAGES in data or "mu" in data)


def load_reference(path: str, extractor: Extractor, device, batch_size: int = 32, spatial: bool = False,
                   verbose: bool = True) -> Reference:
    """A reference from a ``.npz``: our stats file (made with the same extractor), or the guided-diffusion
    evaluator's batch, whose images (``arr_0``) get this extractor's features, or, without images, whose
    own statistics (``mu``/``sigma``, from the evaluator's TensorFlow Inception) serve FID only."""
    kind, _, count = peek_reference(path, extractor)  # refuses what cannot serve
    data = np.load(path, allow_pickle=False)
    if kind == "evaluator images":
        features = array_features(data[EVALUATOR_IMAGES], extractor, device, batch_size, verbose, spatial,
                                  description=f"features {os.path.basename(path)}")
        features, spatial_features = features if spatial else (features, None)
        return Reference.from_features(features, spatial_features, kind=kind)
    if kind == "evaluator statistics":  # its mu_s/sigma_s come from another network: FID only
        return Reference(data["mu"], data["sigma"], kind=kind)
    optional = {key: data[key] for key in ("features", "mu_s", "sigma_s") if key in data.files}
    return Reference(data["mu"], data["sigma"], num_images=count, kind=kind, **optional)
