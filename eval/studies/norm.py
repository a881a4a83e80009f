"""The norm-awareness study (``nala-study --study norm``): NaLa's query-norm scale sigma (1, calibrated,
learnable) against softmax and ReLU linear, with per-layer norm-awareness measures."""

from __future__ import annotations

import sys
from typing import Dict

import numpy as np

from nala_diffusion.eval.studies.common import Kind, markdown_table, mean_std, write_results
from nala_diffusion.eval.studies.quality import entropy

NORM_VARIANTS: Dict[str, Kind] = {
    "softmax": Kind("softmax"),
    "relu_linear": Kind("relu_linear"),
    "nala_sigma1": Kind("nala", {"norm_scale_mode": "fixed", "norm_scale": 1}),
    "nala_calibrated": Kind("nala", {"norm_scale_mode": "calibrated"}),
    "nala_learnable": Kind("nala", {"norm_scale_mode": "learnable"}),
}
NORM_TIMESTEPS = (250, 500, 750)


def norm_study(args, argv, context) -> int:
    """Train and score every NORM_VARIANTS kind per seed; per-layer measures on the test crops noised at
    NORM_TIMESTEPS (every seed)."""
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "timesteps": list(NORM_TIMESTEPS), "scratch": {}, "entropy": {}}
    for name, kind in NORM_VARIANTS.items():
        results["scratch"][name] = [context.run_and_score(f"{name}_s{seed}", kind.settings(), args.steps, seed)
                                    for seed in args.seeds]
        results["entropy"][name] = [entropy(run["folder"], args.out, name, NORM_TIMESTEPS, images=20)
                                    for run in results["scratch"][name]]
    return write_results(args.out, results, norm_tables)


def norm_tables(results: dict) -> str:
    """The norm-awareness study's tables: per-kind scores, then per-layer measures (mean ± sd over seeds)."""
    scores = ("heldout_loss", "class_accuracy", "fid", "kid", "is_mean", "precision", "recall", "seconds_per_step")
    lines = [f"Command: `{results['command']}`", ""]
    lines += markdown_table(
        ["attention", "seeds", "held-out loss", "class accuracy", "domain FID", "KID", "IS", "precision", "recall", "s/step"],
        ([name, len(runs), *(mean_std([r.get(key) for r in runs]) for key in scores)]
         for name, runs in results["scratch"].items()))
    rows = []
    for name, per_seed in results["entropy"].items():
        for layer in per_seed[0]:
            stats = [seed[layer] for seed in per_seed]
            sat = [s["saturation"] for s in stats if "saturation" in s]
            power = (f"{np.mean([s['power']['p5'] for s in sat]):.2f}–{np.mean([s['power']['p95'] for s in sat]):.2f}"
                     if sat else "–")
            rows.append([name, layer.replace("transformer_blocks.", "block ").replace(".attn1", ""),
                         mean_std([s["spearman"] for s in stats]), mean_std([s["norm_effect"] for s in stats]),
                         mean_std([s["mean_entropy"] for s in stats]), power,
                         mean_std([s["responding_fraction"] for s in sat]) if sat else "–"])
    lines += [""] + markdown_table(["attention", "layer", "ρ(entropy, ‖q‖)", "dH/dlog‖q‖", "mean entropy",
                                    "power p5–p95", "responding"], rows)
    return "\n".join(lines) + "\n"
