"""Where models come from: a local folder or a Hugging Face Hub id, through diffusers' own loaders.

Every model a user names (a DiT or NaLa DiT transformer, a pipeline, a VAE) is read with diffusers'
``from_pretrained`` / ``load_config``, so the Hub cache (``HF_HUB_CACHE``), ``HF_HUB_OFFLINE``,
revisions and tokens behave as they do for any diffusers user. A pipeline (a folder or repository
with ``model_index.json``, such as ``facebook/DiT-XL-2-256``) gives its transformer from
``transformer/``, its VAE from ``vae/`` and its class names from ``id2label``. A model that cannot
be found is one ``ValueError`` naming what was looked for and where.

This is the one module the tools and pipelines load model weights through: :func:`load_dit` (DiT-family
transformers), :func:`load_denoiser` (those, or a SiT checkpoint file), :func:`load_vae`, and
:func:`check_loaded_weights`, the check every load ends with. Whole pipelines are
:func:`nala_diffusion.pipelines.conversion.load_pipeline`'s, built on these.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

#: transformer classes whose weights a NaLa DiT takes (the first is the legacy name of DiT's configs)
CONVERTIBLE_CLASSES = ("Transformer2DModel", "DiTTransformer2DModel", "NaLaDiTTransformer2DModel")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path (absolute, relative with ``.``, or not of the form ORG/NAME)."""
    return os.path.isabs(name) or name.startswith(".") or name.count("/") != 1 or os.path.exists(name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds (False at once when
    ``HF_HUB_OFFLINE`` is set), so that an offline machine reads its Hub cache instead of retrying."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    return _answers(urlparse(constants.ENDPOINT).hostname or "huggingface.co", timeout)


@functools.lru_cache(maxsize=8)
def _answers(host: str, timeout: float) -> bool:
    """Whether ``host`` accepts a connection on port 443; asked once per process (a blackholed network
    would otherwise cost ``timeout`` at every file a loader reads)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_options(name: str, revision: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments of diffusers' loaders for ``name``: the revision, and ``local_files_only``
    where the Hub cannot be reached (the local Hub cache still serves)."""
    options: Dict[str, Any] = {}
    if revision is not None:
        options["revision"] = revision
    if not looks_local(name) and not hub_reachable():
        options["local_files_only"] = True
    return options


def not_found(name: str, what: str, revision: Optional[str] = None) -> ValueError:
    """The one-line error for a model that is nowhere: what was looked for, and where."""
    if looks_local(name) and not os.path.exists(name):
        return ValueError(f"{what} {name!r}: no such folder (give a local folder or a Hugging Face Hub id such as "
                          "facebook/DiT-XL-2-256)")
    if os.path.isdir(name):
        return ValueError(f"{what} {name!r}: the folder holds neither model_index.json (a pipeline) nor config.json "
                          "(a model)")
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    where = (f"the Hub cannot be reached (HF_HUB_OFFLINE={'1' if constants.HF_HUB_OFFLINE else 'unset'}) and the "
             f"local Hub cache {constants.HF_HUB_CACHE} has no copy" if not hub_reachable() else
             "the Hugging Face Hub has no such repository (or it is gated: log in with `hf auth login`)")
    return ValueError(f"{what} {name!r}{at}: not a local folder, and {where}; looked for model_index.json (a "
                      "pipeline) and config.json (a model)")


def read_config(name: str, filename: str, subfolder: Optional[str] = None,
                revision: Optional[str] = None) -> Optional[dict]:
    """A JSON file of a folder or Hub repository, through diffusers' config loader (so the Hub cache
    and offline mode apply), or None where it does not exist."""
    from diffusers.configuration_utils import ConfigMixin

    class _Reader(ConfigMixin):
        config_name = filename

    if looks_local(name):
        path = os.path.join(name, subfolder or "", filename)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    try:
        return _Reader.load_config(name, subfolder=subfolder, **hub_options(name, revision))
    except (OSError, ValueError):
        return None


def pipeline_index(name: str, revision: Optional[str] = None) -> Optional[dict]:
    """``model_index.json`` of a pipeline folder or Hub repository, or None for anything else."""
    return read_config(name, "model_index.json", revision=revision)


def transformer_location(name: str, revision: Optional[str] = None, subfolder: Optional[str] = None):
    """(subfolder or None, config) of the DiT-family transformer in a transformer or pipeline folder / id
    (or in ``subfolder`` of it, when given)."""
    index = None
    if subfolder is None:
        index = pipeline_index(name, revision)
        subfolder = "transformer" if index is not None and "transformer" in index else None
        if index is None and looks_local(name) and not os.path.isfile(os.path.join(name, "config.json")) \
                and os.path.isfile(os.path.join(name, "transformer", "config.json")):
            subfolder = "transformer"  # a pipeline folder without its model_index.json
    config = read_config(name, "config.json", subfolder, revision)
    if config is None:
        if index is not None:
            raise ValueError(f"{name!r} is a {index.get('_class_name')} pipeline without a transformer/ folder, so "
                             "it holds no DiT to load")
        raise not_found(name, "model", revision)
    check_dit_config(config, f"{name}/{subfolder}" if subfolder else name)
    return subfolder, config


def check_dit_config(config: dict, where: str) -> None:
    """Refuse a config that is not a DiT (``ada_norm_zero`` blocks on patches)."""
    class_name = config.get("_class_name")
    if class_name not in CONVERTIBLE_CLASSES:
        raise ValueError(f"{where} holds a {class_name!r}, not a DiT; convertible classes: {CONVERTIBLE_CLASSES}")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or config.get("patch_size") is None:
        raise ValueError(
            f"{where} is a {class_name} without DiT's ada_norm_zero + patch_size layout "
            f"(norm_type={config.get('norm_type')!r}, patch_size={config.get('patch_size')!r})"
        )


def require_safetensors(name: str, subfolder: Optional[str]) -> None:
    """Refuse a local model folder without safetensors weights (pickled checkpoints can run code)."""
    if not looks_local(name):
        return  # diffusers' use_safetensors=True refuses a Hub repository without them
    folder = os.path.join(name, subfolder or "")
    files = os.listdir(folder)
    if not any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        others = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        raise ValueError(
            f"{folder!r} holds no safetensors weights (found {others or 'none'}); only safetensors are loaded, "
            "since pickled checkpoints can run code. Re-save the model with save_pretrained(safe_serialization=True)."
        )


def load_dit(name: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, revision: Optional[str] = None,
             variant: Optional[str] = None, subfolder: Optional[str] = None):
    """A DiT-family transformer from a local folder or Hub id, from safetensors only: a transformer folder, or a
    pipeline with a ``transformer/`` folder (the layout of ``facebook/DiT-XL-2-256``, whose config names the
    legacy ``Transformer2DModel``), or its ``subfolder``. Ours load as saved (``NaLaDiTTransformer2DModel``),
    diffusers' DiT as ``DiTTransformer2DModel``."""
    from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel

    name = os.fspath(name)
    subfolder, config = transformer_location(name, revision, subfolder)
    require_safetensors(name, subfolder)
    cls = NaLaDiTTransformer2DModel if config["_class_name"] == "NaLaDiTTransformer2DModel" else DiTTransformer2DModel
    try:
        return cls.from_pretrained(name, subfolder=subfolder, use_safetensors=True, dtype=dtype, variant=variant,
                                   **hub_options(name, revision))
    except OSError as error:  # a repository whose config exists but whose weights could not be fetched
        raise ValueError(f"cannot load the transformer of {name!r}: {str(error).splitlines()[0]}") from None


def load_denoiser(name: Union[str, os.PathLike], **kwargs):
    """A denoiser from any source the tools take: a SiT checkpoint file (``.pt``, ``.safetensors``; a flow model
    in SiT's conventions, :func:`~nala_diffusion.models.sit.load_sit`), else a transformer or pipeline folder
    or Hub id (:func:`load_dit`, with ``kwargs``)."""
    from nala_diffusion.models.sit import load_sit, looks_like_checkpoint_file

    return load_sit(name) if looks_like_checkpoint_file(name) else load_dit(name, **kwargs)


def load_vae(name: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, revision: Optional[str] = None):
    """An ``AutoencoderKL`` from a VAE folder or Hub id (``stabilityai/sd-vae-ft-ema``), or from the
    ``vae/`` folder of a pipeline (``facebook/DiT-XL-2-256``)."""
    from diffusers import AutoencoderKL

    name = os.fspath(name)
    index = pipeline_index(name, revision)
    if index is not None:
        if not (index.get("vae") or [None])[0]:
            raise ValueError(f"--vae {name!r} is a {index.get('_class_name')} pipeline without a VAE (it works in "
                             "pixel space); name a VAE or a pipeline that has one")
        subfolder = "vae"
    else:
        subfolder = None
    config = read_config(name, "config.json", subfolder, revision)
    if config is None:
        raise not_found(name, "VAE", revision)
    if config.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"{name!r} holds a {config.get('_class_name')!r}, not an AutoencoderKL")
    require_safetensors(name, subfolder)
    try:
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder, use_safetensors=True, dtype=dtype,
                                             **hub_options(name, revision))
    except OSError as error:
        raise ValueError(f"cannot load the VAE of {name!r}: {str(error).splitlines()[0]}") from None


def pipeline_id2label(index: Optional[dict]) -> Optional[Dict[int, str]]:
    """The class names of a pipeline's ``model_index.json`` as ``{id: name}``, or None."""
    labels = (index or {}).get("id2label")
    return {int(k): str(v) for k, v in labels.items()} if labels else None


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_loaded_weights(module: torch.nn.Module, where: str, *, missing: Optional[List[str]] = None,
                         unexpected: Optional[List[str]] = None, mismatched: Optional[list] = None) -> None:
    """Raise ``ValueError`` naming the tensors when a module loaded from ``where`` lacks weights (given
    as ``missing``, or left on the ``meta`` device), had tensors it does not use, tensors of other
    shapes, or holds NaN/inf values."""
    missing = set(missing or [])
    missing |= {name for name, tensor in [*module.named_parameters(), *module.named_buffers()]
                if tensor.device.type == "meta"}
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"tensors of another shape: {_listing(str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched)}")
    if not problems:
        bad = [name for name, tensor in module.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            problems.append(f"non-finite values (NaN or inf) in: {_listing(bad)}")
    if problems:
        raise ValueError(f"the weights in {where} do not fit {type(module).__name__}: " + "; ".join(problems)
                         + ". The file is incomplete, corrupt or for another model; nothing was loaded.")
