"""A training run's folder: what it may hold, the checks before a run starts in it, and the atomic save of
the finished pipeline."""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

#: what a training run writes in output_dir (with checkpoint-<step> folders): all --overwrite removes
RUN_OUTPUTS = ("args.json", "log.csv", "logs", "samples", "latent_cache", "model_index.json", "transformer",
               "scheduler", "vae", ".tmp-pipeline")


def clear_run(folder: str) -> List[str]:
    """Remove a training run's outputs (for --overwrite): checkpoints, the pipeline, logs, samples and
    caches; any other file in the folder (the user's own) stays. Returns what was removed."""
    from nala_diffusion.train import checkpoints
    removed = []
    for name in sorted(os.listdir(folder)):
        if name in RUN_OUTPUTS or name.startswith((checkpoints.PREFIX, checkpoints.TEMPORARY_PREFIX)):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


def check_output_dir(config) -> None:
    """Refuse an output_dir that holds the training data: --overwrite or a checkpoint could touch it."""
    if config.train_data_dir:
        out, data = os.path.realpath(config.output_dir), os.path.realpath(config.train_data_dir)
        if os.path.commonpath([out, data]) == out:
            raise ValueError(f"output_dir {config.output_dir!r} contains the training data {config.train_data_dir!r}; "
                             "choose an output_dir outside it (nothing was written or removed)")


def resume_point(config) -> Optional[str]:
    """The checkpoint the run resumes from (None: a new run), after --overwrite has cleared an earlier run;
    an earlier run without --resume_from_checkpoint or --overwrite, or a finished one with nothing to
    resume, is refused before anything is written."""
    from nala_diffusion.train import checkpoints

    finished = os.path.exists(os.path.join(config.output_dir, "model_index.json"))
    has_run = bool(checkpoints.list_checkpoints(config.output_dir)) or finished
    if has_run and config.overwrite:
        if int(os.environ.get("RANK", "0")) == 0:  # one process removes; the others start fresh with it
            removed = clear_run(config.output_dir)
            print(f"nala-train: warning: --overwrite: removed the earlier run in {config.output_dir} "
                  f"({', '.join(removed)})", file=sys.stderr)
        has_run = finished = False
    resume_path = None if config.overwrite else checkpoints.resolve_resume(config.output_dir,
                                                                          config.resume_from_checkpoint)
    if has_run and config.resume_from_checkpoint is None:
        raise ValueError(
            f"output_dir {config.output_dir!r} already holds a training run; pass --resume_from_checkpoint latest "
            "to continue it, --overwrite to train it again from step 0, or choose another output_dir "
            "(nothing was overwritten)"
        )
    if finished and config.resume_from_checkpoint and resume_path is None:
        raise ValueError(
            f"output_dir {config.output_dir!r} holds a finished training run but no checkpoint to resume from, so "
            "there is nothing to continue; its weights, log.csv and args.json were left as they are. Pass "
            "--overwrite to train it again from step 0, or choose another output_dir"
        )
    return resume_path


def save_pipeline_atomically(pipeline: NaLaDiTPipeline, output_dir: str) -> None:
    """Write the pipeline aside, then move its entries into ``output_dir`` (model_index.json last)."""
    temporary = os.path.join(output_dir, ".tmp-pipeline")
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary)
    names = sorted(os.listdir(temporary), key=lambda n: n == "model_index.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(temporary, name), target)
    shutil.rmtree(temporary, ignore_errors=True)
