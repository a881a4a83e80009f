"""What every study of ``nala-study`` shares: attention kinds as data, training runs (resumed, cached),
cached results, and the tables' cells and layout."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nala_diffusion.models.options import AttentionOptions, layer_attention_types
from nala_diffusion.train.run_config import flags_of
from nala_diffusion.utils.files import write_json_atomically

ARCHITECTURE = {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 64, "patch_size": 4,
                "norm_num_groups": 32, "use_lepe": True}
TRAINING = {"steps": 500, "batch_size": 32, "learning_rate": 5e-4}
#: model options (beside the attention's) a kind may set: nala-train flags, on or off
MODEL_OPTIONS = ("use_cpe",)
# what a study writes and a rerun reuses (under OUT)
STUDY_OUTPUTS = ("runs", "scores", "samples", "highres", "real", "grids", "results.json", "results.md",
                 "model_config.json", "retrieval_gain.png")


@dataclass(frozen=True)
class Kind:
    """One attention setting of a study, as data: an attention type, its options (names of
    :class:`~nala_diffusion.models.options.AttentionOptions`, in the order their flags are written) and
    the blocks kept softmax (negative counting from the end). :meth:`train_flags` gives the
    ``nala-train`` flags that build it."""

    attention_type: str
    options: Mapping[str, Any] = field(default_factory=dict)
    softmax_layers: Tuple[int, ...] = ()
    model: Mapping[str, Any] = field(default_factory=dict)  # model options beside the attention's (use_cpe)
    learning_rate: Optional[float] = None  # instead of the study's
    track_every: int = 0  # > 0: train in chunks of this many steps, measuring after each (retrieval: partner mass)

    def __post_init__(self):
        AttentionOptions.for_type(self.attention_type, **self.options)  # unknown options and bad values raise
        if self.softmax_layers:
            layer_attention_types(max(abs(i) for i in self.softmax_layers) + 1, self.attention_type,
                                  softmax_layers=list(self.softmax_layers))
        unknown = sorted(set(self.model) - set(MODEL_OPTIONS))
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; a kind may set {MODEL_OPTIONS}")

    def but(self, softmax_layers: Sequence[int] = None, model: Mapping[str, Any] = None,
            learning_rate: Optional[float] = None, track_every: Optional[int] = None, **options) -> "Kind":
        """The same kind with more (or other) options, another softmax layout, model options, learning rate
        or tracking."""
        layers = self.softmax_layers if softmax_layers is None else tuple(softmax_layers)
        return Kind(self.attention_type, {**self.options, **options}, layers, {**self.model, **(model or {})},
                    self.learning_rate if learning_rate is None else learning_rate,
                    self.track_every if track_every is None else track_every)

    def settings(self) -> Dict[str, Any]:
        """The :class:`~nala_diffusion.train.run_config.RunConfig` settings that build this kind."""
        settings: Dict[str, Any] = {"attention_type": self.attention_type, **self.options}
        if self.softmax_layers:
            settings["softmax_layers"] = list(self.softmax_layers)
        settings.update(self.model)
        if self.learning_rate is not None:
            settings["learning_rate"] = self.learning_rate
        return settings

    def train_flags(self) -> List[str]:
        """The ``nala-train`` flags of :meth:`settings` (what the runs' records keep as ``arguments``)."""
        return flags_of(self.settings())


def cached(path: str, compute):
    """``compute()``'s JSON-able result, kept in ``path`` (written atomically): a rerun reads it back."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    result = compute()
    write_json_atomically(path, result, sort_keys=False)
    return result


def train(out: str, name: str, settings: Mapping[str, Any], steps: int, seed: int, args,
          dataset: str = "builtin:photos") -> dict:
    """One training run in OUT/runs/NAME with these RunConfig ``settings`` beside the study's (resumed if
    interrupted); returns its record (:func:`run_info`)."""
    folder = os.path.join(out, "runs", name)
    return cached(os.path.join(folder, "study_run.json"),
                  lambda: _train(folder, out, settings, steps, seed, args, dataset))


def _train(folder: str, out: str, settings: Mapping[str, Any], steps: int, seed: int, args, dataset: str) -> dict:
    run_training(folder, out, settings, steps, seed, args, dataset)
    return run_info(folder, settings, steps, seed, args)


def run_config(folder: str, out: str, settings: Mapping[str, Any], steps: int, seed: int, args, dataset: str):
    """The RunConfig of a study run: the study's data, model (OUT/model_config.json), budget and EMA, one
    checkpoint kept, resumed from the latest; the kind's ``settings`` on top."""
    from nala_diffusion.train.run_config import RunConfig

    config = os.path.join(out, "model_config.json")
    with open(config, "w", encoding="utf-8") as handle:
        json.dump(args.architecture, handle)
    study = {"dataset": dataset, "resolution": 32, "model_config": config, "max_train_steps": steps,
             "train_batch_size": args.batch_size,
             "learning_rate": args.learning_rate,  # no warm-up: the recorded runs trained without one
             "use_ema": True, "ema_decay": 0.995, "checkpointing_steps": max(steps // 2, 1),
             "checkpoints_total_limit": 1, "seed": seed, "report_to": "none", "output_dir": folder,
             "resume_from_checkpoint": "latest"}
    return RunConfig(**{**study, **settings, **({"timestep_range": list(args.timestep_range)}
                                                if args.timestep_range else {})})


def run_training(folder: str, out: str, settings: Mapping[str, Any], steps: int, seed: int, args, dataset: str) -> None:
    """Train OUT/runs/NAME up to ``steps`` (resumed from its latest checkpoint)."""
    from nala_diffusion.train.train_nala_dit import train as train_run

    code = train_run(run_config(folder, out, settings, steps, seed, args, dataset))
    if code != 0:
        raise RuntimeError(f"nala-study: training {os.path.basename(folder)} failed (exit code {code}); see the messages above")


def run_info(folder: str, settings: Mapping[str, Any], steps: int, seed: int, args) -> dict:
    """A finished run's record: its folder, budget, seed, settings (as nala-train flags) and median seconds
    per step."""
    with open(os.path.join(folder, "log.csv"), newline="", encoding="utf-8") as handle:
        speeds = [float(r["images_per_second"]) for r in csv.DictReader(handle) if r.get("images_per_second")]
    return {"folder": folder, "steps": steps, "seed": seed, "arguments": flags_of(settings),
            "seconds_per_step": args.batch_size / float(np.median(speeds)) if speeds else None}


def mean_std(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """The lines of a Markdown table: the header, its rule, and one line per row of cells (as strings)."""
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def write_results(out: str, results: dict, make_tables) -> int:
    """OUT/results.json and OUT/results.md (the tables, also printed)."""
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(make_tables(results))
    print(make_tables(results))
    return 0
