"""Checkpoints that lose nothing: written aside and renamed into place, resumable, pruned.

A checkpoint folder ``checkpoint-<step>`` holds accelerate's ``save_state`` output (model weights as
safetensors, optimizer, LR schedule, RNG states), the EMA weights as safetensors and
``training_state.json`` (step, model config, data settings). It only ever appears complete: it is
written as ``.tmp-checkpoint-<step>`` and renamed, so a run killed mid-save leaves the previous
checkpoint as the latest one. The optimizer and RNG files are accelerate's own ``torch.save``
format; accelerate reads them with ``torch.load(weights_only=True)`` (it does in 1.16), which
refuses arbitrary objects. Still, resume only from checkpoints you trust.
"""

import copy
import errno
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from nala_diffusion.utils.files import follow_umask

PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "training_state.json"
EMA_DIR = "ema"  # EMAModel.save_pretrained's folder inside a checkpoint


def list_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``folder`` as (step, path), oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{PREFIX}(\d+)", name)
        if match and os.path.isfile(os.path.join(folder, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def remove_partial_checkpoints(folder: str) -> List[str]:
    """Delete checkpoints that were being written when a run died; returns what was removed."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TEMPORARY_PREFIX):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                removed.append(name)
    return removed


def resolve_resume(folder: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint path for ``--resume_from_checkpoint`` (``latest`` or a path), or None."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(folder)
        return checkpoints[-1][1] if checkpoints else None
    path = resume if os.path.isabs(resume) or os.path.isdir(resume) else os.path.join(folder, resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"resume_from_checkpoint {resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def ema_model(model: torch.nn.Module, decay: float):
    """diffusers' ``EMAModel`` of ``model``'s parameters, whose ``save_pretrained`` writes a copy of
    the live model with the averaged parameters: its buffers (NaLa's calibrated sigma) are the
    trained ones, where ``EMAModel``'s own would come fresh from the config."""
    from diffusers.training_utils import EMAModel

    class LiveBuffersEMAModel(EMAModel):
        def save_pretrained(self, path):
            saved = copy.deepcopy(model)
            state = self.state_dict()
            state.pop("shadow_params", None)
            saved.register_to_config(**state)
            self.copy_to(saved.parameters())
            saved.save_pretrained(path)

    return LiveBuffersEMAModel(model.parameters(), decay=decay, model_cls=type(model), model_config=model.config)


def read_ema_state(folder: str, ema) -> Dict[str, Any]:
    """The state ``EMAModel.save_pretrained`` wrote to ``folder``, for ``ema.load_state_dict``: its settings
    (decay, step count, ...) from ``config.json`` and the weights from the safetensors files, in the order of
    the model's parameters. Read directly, as ``EMAModel.from_pretrained`` would, but without handing the EMA
    settings to the model class (which warns that they are ignored) or a path to ``from_config`` (deprecated)."""
    import glob

    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    settings = {k: config[k] for k in ema.state_dict() if k != "shadow_params" and k in config}
    template = ema.model_cls.from_config({k: v for k, v in config.items() if k not in settings})
    tensors: Dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    names = [name for name, _ in template.named_parameters()]
    missing = [name for name in names if name not in tensors]
    if missing or len(names) != len(ema.shadow_params):
        raise ValueError(f"the EMA weights in {folder!r} do not fit this model: missing {missing[:5]}, "
                         f"{len(names)} parameters for {len(ema.shadow_params)} EMA tensors")
    return {**settings, "shadow_params": [tensors[name] for name in names]}


def register_ema_hooks(accelerator, ema) -> None:
    """EMA weights travel with accelerate's checkpoints, as in diffusers' training examples: a save
    hook writes them with ``EMAModel.save_pretrained`` into ``<checkpoint>/ema`` (safetensors, with
    the decay and step count in its config), a load hook reads them back into ``ema`` (:func:`read_ema_state`)."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, EMA_DIR))

    def load(models, input_dir):
        folder = os.path.join(input_dir, EMA_DIR)
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint {input_dir!r} holds no EMA weights ({EMA_DIR}/); it was written without "
                             "--use_ema or by another version of nala-train. Resume it with the version that wrote it, "
                             "or start again with --overwrite")
        ema.load_state_dict(read_ema_state(folder, ema))
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


#: below this many free bytes a failed write is reported as a full disk
LOW_DISK_BYTES = 64 * 2**20


def write_error(folder: str, what: str, error: Exception) -> Exception:
    """A one-line error for a failed checkpoint write: a full disk named as such, with where and how much
    is free; the earlier checkpoints are untouched (the new one was written aside and is removed)."""
    free = shutil.disk_usage(folder).free
    full = getattr(error, "errno", None) == errno.ENOSPC or free < LOW_DISK_BYTES
    cause = (f"the disk holding {folder!r} is full ({free / 2**20:.0f} MiB free)" if full
             else f"{type(error).__name__}: {error}")
    return ValueError(f"could not write {what} in {folder!r}: {cause}. The earlier checkpoints are intact; free some "
                      "space (or choose another output_dir) and resume with --resume_from_checkpoint latest")


def save_checkpoint(accelerator, folder: str, step: int, state: Dict[str, Any],
                    total_limit: Optional[int] = None) -> str:
    """Write ``checkpoint-<step>`` atomically on every process's behalf; returns its path."""
    final = os.path.join(folder, f"{PREFIX}{step}")
    temporary = os.path.join(folder, f"{TEMPORARY_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary)  # the EMA too, through register_ema_hooks
        if accelerator.is_main_process:
            with open(os.path.join(temporary, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=2, sort_keys=True, default=str)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as "basic_ios::clear: iostream error"
        shutil.rmtree(temporary, ignore_errors=True)
        raise write_error(folder, f"{PREFIX}{step}", error) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        follow_umask(temporary)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit:
            for _, old in list_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def input_problems(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """What differs in the data and the weights a run reads (VAE, teacher, initialisation) between a
    checkpoint and this run; checkpoints written before these were recorded pass."""
    problems = []
    if "data_fingerprint" in saved and saved["data_fingerprint"] != current.get("data_fingerprint"):
        problems.append("the training data (another dataset, or files added, removed or changed): fingerprint "
                        f"{saved['data_fingerprint']} at the checkpoint, {current.get('data_fingerprint')} now")
    for key, value in saved.get("input_weights", {}).items():
        now = current.get("input_weights", {}).get(key)
        if value != now:
            problems.append(f"--{key} weights: checkpoint {value!r}, this run {now!r}")
    return problems


def check_inputs(saved: Dict[str, Any], current: Dict[str, Any], path: str) -> None:
    """:func:`input_problems` as a refusal, early: before latents are cached or models loaded."""
    problems = input_problems(saved, current)
    if problems:
        raise ValueError(f"cannot resume from {path}: incompatible inputs\n  " + "\n  ".join(problems)
                         + "\nResume with the checkpoint's data and weights, or pass --overwrite to start again.")


def schedule_as_run(args: Dict[str, Any]) -> Dict[str, Any]:
    """Arguments with the warm-up a ``constant`` schedule ignores set to 0: checkpoints written before
    ``--lr_warmup_steps`` acted record it beside ``constant``, and trained without it."""
    if args.get("lr_scheduler") in (None, "constant") and args.get("lr_warmup_steps"):
        return {**args, "lr_scheduler": "constant", "lr_warmup_steps": 0}
    return args


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], path: str, model_cls=None) -> None:
    """Refuse to resume when the model or the data layout differs from the checkpoint's (the data and
    input weights themselves are checked earlier, by :func:`check_inputs`). With ``model_cls``, options the
    checkpoint's config lacks (written before they existed) count at the value loading gives them
    (``model_cls.config_as_loaded``)."""
    problems = []
    saved_model, current_model = saved.get("model_config", {}), current["model_config"]
    if model_cls is not None and hasattr(model_cls, "config_as_loaded"):
        saved_model = model_cls.config_as_loaded(saved_model)
    for key in sorted(set(saved_model) | set(current_model)):
        if not key.startswith("_") and saved_model.get(key) != current_model.get(key):
            problems.append(f"model {key}: checkpoint {saved_model.get(key)!r}, this run {current_model.get(key)!r}")
    for key in ("dataset_size", "train_batch_size", "gradient_accumulation_steps", "num_processes", "latent_space"):
        if saved.get(key) != current.get(key):
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}")
    if "class_names" in saved and saved["class_names"] != current.get("class_names"):
        problems.append(f"class names: checkpoint {saved['class_names']!r}, this run {current.get('class_names')!r}")
    if "class_ids" in saved and saved["class_ids"] != current.get("class_ids"):
        problems.append(f"model ids of the classes: checkpoint {saved['class_ids']!r}, this run {current.get('class_ids')!r}")
    saved_args, current_args = (schedule_as_run(saved.get("result_args", {})),
                                schedule_as_run(current.get("result_args", {})))
    for key in sorted(set(saved_args) & set(current_args)):
        if saved_args[key] != current_args[key]:
            problems.append(f"--{key}: checkpoint {saved_args[key]!r}, this run {current_args[key]!r}")
    if problems:
        raise ValueError(f"cannot resume from {path}: incompatible configuration\n  " + "\n  ".join(problems)
                         + "\nResume with the checkpoint's settings, or pass --overwrite to start again from step 0.")
