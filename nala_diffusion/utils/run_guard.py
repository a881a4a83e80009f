"""Guards for output folders that runs write and reruns reuse: fingerprints and locks.

A **fingerprint** (``fingerprint.json``) records what made a folder's outputs: the model's weights
hash and config, the scheduler, the sampling settings, the seed, the code version. A rerun on the
same folder continues only when its fingerprint is the same; otherwise it refuses, naming the
fields that differ, unless told to overwrite (the old outputs are then removed first).

A **lock** (``.lock``, a kernel lock that dies with its process; the file names the holder's process
id and host) keeps two runs from writing one folder at the same time.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional

from nala_diffusion.utils.files import write_json_atomically

FINGERPRINT_FILE = "fingerprint.json"


def code_version() -> str:
    """The installed nala_diffusion version."""
    try:
        from importlib.metadata import version

        return version("nala-diffusion")
    except Exception:  # not installed (run from a source tree)
        return "unknown"


def folder_weights_hash(folder: str) -> str:
    """sha256 over every ``*.safetensors`` file under ``folder`` (relative path and bytes), in
    sorted order: two folders with the same weights hash alike wherever they are."""
    files = [os.path.relpath(os.path.join(root, n), folder) for root, _, names in os.walk(folder)
             for n in names if n.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{folder!r} holds no .safetensors weights")
    return files_hash(folder, files)


def files_hash(folder: str, relative_paths) -> str:
    """sha256 over the given files under ``folder``, each as its relative path and its bytes, in sorted order."""
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        digest.update(relative.replace(os.sep, "/").encode())
        with open(os.path.join(folder, relative), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """The fields whose values differ, as ``"field: old -> new"`` lines."""
    old, new = _jsonable(old), _jsonable(new)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before, after = json.dumps(old.get(key))[:200], json.dumps(new.get(key))[:200]
            lines.append(f"{key}: {before} -> {after}")
    return lines


def check_fingerprint(
    folder: str,
    fingerprint: Mapping[str, Any],
    *,
    overwrite: bool = False,
    has_outputs: Optional[Callable[[], bool]] = None,
    clear: Optional[Callable[[], None]] = None,
    what: str = "outputs",
    flag: str = "--overwrite",
    write: bool = True,
) -> str:
    """Make sure ``folder``'s outputs were made with ``fingerprint`` before they are reused.

    Returns ``"new"`` (no outputs yet), ``"same"`` (same fingerprint: continue) or
    ``"overwritten"`` (``overwrite``: ``clear()`` removed the old outputs). Raises ``ValueError``
    naming the differing fields when the folder holds outputs of another fingerprint, or outputs
    with no fingerprint, and ``overwrite`` is False. ``write=False`` checks without writing (other
    processes of a distributed run).
    """
    path = os.path.join(folder, FINGERPRINT_FILE)
    existing = has_outputs() if has_outputs else False
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                old = json.load(handle)
        except (OSError, ValueError) as error:
            old = {"unreadable fingerprint": str(error)}
        differences = fingerprint_differences(old, fingerprint)
        if not differences:
            return "same"
        if has_outputs is not None and not existing:
            overwrite = True  # a fingerprint with nothing made under it (a run that failed early) is adopted
        if not overwrite:
            raise ValueError(
                f"{folder!r} holds {what} made with other settings; they differ in\n  " + "\n  ".join(differences)
                + f"\nPass {flag} to replace them, or choose another output folder (nothing was changed)."
            )
        existing = True
    elif existing and not overwrite:
        raise ValueError(
            f"{folder!r} already holds {what} but no {FINGERPRINT_FILE} to say what made them; pass {flag} to replace "
            "them, or choose another output folder (nothing was changed)."
        )
    status = "new"
    if existing and overwrite:
        if clear and write:
            clear()
        status = "overwritten"
    if write:
        write_json_atomically(path, _jsonable(fingerprint))
    return status


def pipeline_weights_hash(folder: str) -> str:
    """sha256 over the weights a pipeline folder's ``model_index.json`` loads (the ``*.safetensors`` of its
    component subfolders): checkpoints, latent caches and other files beside them do not count. A
    folder without ``model_index.json`` (a bare model) hashes every ``*.safetensors`` under it."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return folder_weights_hash(folder)
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    components = sorted(name for name, value in index.items()
                        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0])
    files = [os.path.join(name, file) for name in components if os.path.isdir(os.path.join(folder, name))
             for file in os.listdir(os.path.join(folder, name)) if file.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{folder!r} holds no .safetensors weights in its components {components}")
    return files_hash(folder, files)


#: the objective's config keys at their values for DDPM models, which sampled folders were fingerprinted without
OBJECTIVE_DEFAULTS = {"objective": "ddpm", "flow_convention": "diffusers", "timestep_freq_shift": 1}


def _public(config) -> Dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def pipeline_fingerprint(model_path: str, pipe) -> Dict[str, Any]:
    """What a pipeline folder contributes to its samples: the hash of the weights it loads, the
    transformer's and the VAE's configs (the VAE's scaling factor changes every image) and the
    scheduler with its settings."""
    transformer_config = {k: v for k, v in _public(pipe.transformer.config).items()
                          if OBJECTIVE_DEFAULTS.get(k, object()) != v}  # DDPM models' folders keep their fingerprint
    fingerprint = {
        "model_weights_sha256": pipeline_weights_hash(model_path) if os.path.isdir(model_path) else model_path,
        "transformer_config": transformer_config,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": _public(pipe.scheduler.config),
        "code_version": code_version(),
    }
    from nala_diffusion.diffusion.objectives import clipping_step_kwargs

    step_kwargs = clipping_step_kwargs(pipe.scheduler)
    if step_kwargs:  # DDIM steps from the clipped x0: other samples than folders sampled before
        fingerprint["scheduler_step"] = step_kwargs
    if transformer_config.get("objective", "ddpm") != "ddpm":
        fingerprint["objective"] = transformer_config["objective"]
    if getattr(pipe, "vae", None) is not None:
        fingerprint["vae_config"] = _public(pipe.vae.config)
    return fingerprint
