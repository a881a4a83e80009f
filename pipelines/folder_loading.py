"""How ``NaLaDiTPipeline.from_pretrained`` opens a folder or Hub id without running any file of it.

diffusers' generic loader imports Python files that a folder names (a pipeline file in
``_class_name``, a component file such as ``"transformer": ["evil", "Evil"]``) once the user passes
``trust_remote_code=True``. A NaLa pipeline knows its own class, so its loader needs none of that:

1. a Hub id is fetched without its Python files (``*.py`` never leaves the Hub cache's blob store,
   and nothing here imports it); a folder is read where it is;
2. ``model_index.json`` names each component as ``[library, class]``; only classes of the installed
   ``diffusers`` and ``nala_diffusion`` packages that are models or schedulers are accepted, anything
   else is a ``ValueError`` naming the entry;
3. each component is loaded with its class's own ``from_pretrained`` (safetensors only) and the
   pipeline is built from them.

``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` stays the way to run a folder's
own code, as the user's explicit choice.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Dict, Tuple

#: packages a component class may come from (``nala_diffusion`` with any of its modules)
TRUSTED_LIBRARIES = ("diffusers", "nala_diffusion")
#: from_pretrained keywords that say where a Hub repository is read from
HUB_KEYS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
#: from_pretrained keywords handed to every model component (diffusers' names)
MODEL_KEYS = ("low_cpu_mem_usage", "device_map", "max_memory", "offload_folder", "offload_state_dict",
              "disable_mmap")
#: the files a pipeline needs from the Hub: configs and safetensors weights, never code
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors"]


def refuse_remote_code(cls_name: str, kwargs: Dict[str, Any]) -> None:
    """Refuse the keywords that would run a folder's code through our classes."""
    if kwargs.get("custom_pipeline") is not None:
        raise ValueError(
            f"{cls_name}.from_pretrained takes no custom_pipeline: it runs no file of the folder. For the "
            "high-resolution pipeline use NaLaDiTHighResPipeline.from_pretrained(folder); to run a folder's own "
            "pipeline file, if you trust it, use DiffusionPipeline.from_pretrained(folder, custom_pipeline=..., "
            "trust_remote_code=True)")
    if kwargs.get("trust_remote_code"):
        raise ValueError(
            f"{cls_name}.from_pretrained runs no code from the folder, so trust_remote_code=True does nothing here; "
            "drop it (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) is the way to run a "
            "folder's own files)")


def local_pipeline_folder(name: str, kwargs: Dict[str, Any]) -> str:
    """The local folder of a pipeline folder or Hub id, fetched without its Python files."""
    from nala_diffusion.models.sources import hub_options, looks_local, not_found

    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise not_found(name, "pipeline")
        return name
    if looks_local(name):
        raise not_found(name, "pipeline")
    from huggingface_hub import snapshot_download

    options = {**hub_options(name), **{k: kwargs[k] for k in HUB_KEYS if kwargs.get(k) is not None}}
    try:
        folder = snapshot_download(name, allow_patterns=HUB_PATTERNS, **options)
    except Exception as error:  # not on the Hub, not cached offline, gated: say so in one line
        raise not_found(name, "pipeline", options.get("revision")) from error
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise not_found(name, "pipeline", options.get("revision"))
    return folder


def component_class(name: str, entry, where: str):
    """The class of one ``model_index.json`` entry ``[library, class]``, if it is a model or scheduler of
    a trusted package; else a ``ValueError`` naming the entry."""
    from diffusers import ModelMixin, SchedulerMixin

    library, class_name = (list(entry) + [None, None])[:2] if isinstance(entry, (list, tuple)) else (None, None)
    refused = ValueError(
        f"{where}: model_index.json names {name!r} as {entry!r}; a NaLa pipeline loads components only from the "
        f"installed {' and '.join(TRUSTED_LIBRARIES)} packages and runs no file of the folder. If you trust the folder's "
        "code, load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)")
    if not isinstance(library, str) or not isinstance(class_name, str) or \
            not any(library == root or library.startswith(root + ".") for root in TRUSTED_LIBRARIES):
        raise refused
    try:
        module = importlib.import_module(library)  # a module of an installed package, never a folder's file
    except ImportError:
        raise refused from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, (ModelMixin, SchedulerMixin))):
        raise refused
    return cls


def _has_variant(folder: str, variant: str) -> bool:
    return os.path.isdir(folder) and any(f".{variant}." in f for f in os.listdir(folder))


def load_components(pipeline_class, folder: str, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(components, other init arguments) of ``pipeline_class`` from a local pipeline folder, each
    component by its own class; components passed in ``kwargs`` (e.g. ``scheduler=...``) replace the
    folder's."""
    import torch

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    modules, optional = pipeline_class._get_signature_keys(pipeline_class)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype (e.g. torch.float16), got {dtype!r}")
    variant = kwargs.get("variant")
    if variant is not None and not any(_has_variant(os.path.join(folder, m), variant) for m in modules):
        raise ValueError(f"{folder}: no component has weights of variant {variant!r}")
    components = {}
    for name in modules:
        if name in kwargs:
            components[name] = kwargs[name]
            continue
        entry = index.get(name)
        if entry is None or (isinstance(entry, (list, tuple)) and entry and entry[0] is None):
            if name not in pipeline_class._optional_components:
                raise ValueError(f"{folder}: model_index.json has no {name!r} component, which "
                                 f"{pipeline_class.__name__} needs")
            components[name] = None
            continue
        cls = component_class(name, entry, folder)
        from diffusers import ModelMixin

        options: Dict[str, Any] = {}
        if issubclass(cls, ModelMixin):
            options = {"use_safetensors": True, **{k: kwargs[k] for k in MODEL_KEYS if k in kwargs}}
            if dtype is not None:
                options["dtype"] = dtype
            if variant is not None and _has_variant(os.path.join(folder, name), variant):
                options["variant"] = variant
        components[name] = cls.from_pretrained(folder, subfolder=name, **options)
    others = {key: kwargs.get(key, index.get(key)) for key in optional if key in kwargs or key in index}
    return components, others
