"""The objective study (``nala-study --study objective``): DDPM against flow matching (uniform and
logit-normal timestep densities) on builtin:photos with the demo's architecture, each sampled with its
natural sampler (DDIM for DDPM, flow-matching Euler for flow) at several step counts and scored with the
domain classifier (class accuracy, domain FID, KID, IS, precision, recall)."""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

from nala_diffusion.eval.sample_sets import generate_samples
from nala_diffusion.eval.studies.common import TRAINING, Kind, cached, markdown_table, mean_std, train, write_results
from nala_diffusion.metrics.samples import SAMPLE_DIR, balanced_labels
from nala_diffusion.pipelines.request import SamplingRequest

#: the demo's attention (NaLa, sigma calibrated) under each objective
ATTENTION = Kind("nala")
OBJECTIVE_KINDS: Dict[str, Dict[str, str]] = {
    "ddpm": {"objective": "ddpm"},
    "flow_uniform": {"objective": "flow", "weighting_scheme": "uniform"},
    "flow_logit_normal": {"objective": "flow", "weighting_scheme": "logit_normal"},
}
#: the quickstart's budget (README: 2,000 steps at learning rate 5e-4, EMA 0.995, no warm-up)
OBJECTIVE_TRAINING = {**TRAINING, "steps": 2000}
#: sampling steps every model is scored at
SAMPLE_STEPS = (10, 25, 50)
SCORES = ("class_accuracy", "fid", "kid", "is_mean", "precision", "recall")
SCORE_NAMES = ("class accuracy", "domain FID", "KID", "IS", "precision", "recall")


def score_at_steps(run: str, out: str, args, context, steps: int) -> dict:
    """Scores of ``args.num_samples`` class-balanced samples of the run's own (natural) scheduler at ``steps``
    steps (cached in OUT/scores/NAME_stepsK.json)."""
    name = f"{os.path.basename(run)}_steps{steps}"
    return cached(os.path.join(out, "scores", f"{name}.json"),
                  lambda: _score(run, os.path.join(out, "samples", name), args, context, steps))


def _score(run: str, folder: str, args, context, steps: int) -> dict:
    from nala_diffusion import NaLaDiTPipeline
    from nala_diffusion.eval.quality import class_accuracy
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib

    pipe = NaLaDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    labels = balanced_labels(args.num_samples, pipe.num_classes)
    generate_samples(pipe, folder, args.num_samples, labels=labels, batch_size=100,
                     request=SamplingRequest(steps=steps, guidance=args.guidance, seed=0))
    feats = features.folder_features(os.path.join(folder, SAMPLE_DIR), context.extractor, "cpu", verbose=False)
    return {"scheduler": type(pipe.scheduler).__name__, "sample_steps": steps,
            "class_accuracy": class_accuracy(context.classifier, folder, labels, pipe.num_classes)["accuracy"],
            "fid": metrics_lib.frechet_distance(*metrics_lib.statistics(feats), *context.real_stats),
            "kid": metrics_lib.kernel_inception_distance(feats, context.real_feats),
            **metrics_lib.suite(feats, context.real_feats, context.extractor.logits)}


def grid(run: str, out: str, steps: int = 25) -> str:
    """One sample of every class from the run at ``steps`` steps (seed 0): OUT/grids/NAME.png."""
    from nala_diffusion import NaLaDiTPipeline
    from nala_diffusion.utils.files import save_grid_atomically

    path = os.path.join(out, "grids", f"{os.path.basename(run)}.png")
    if not os.path.exists(path):
        pipe = NaLaDiTPipeline.from_pretrained(run)
        pipe.set_progress_bar_config(disable=True)
        import torch

        labels = list(range(pipe.num_classes))
        generators = [torch.Generator().manual_seed(i) for i in labels]
        images = pipe(labels, num_inference_steps=steps, generator=generators, output_type="pt").images
        save_grid_atomically(images.float(), path, nrow=len(labels))
    return path


def tables(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", ""]
    rows = []
    for name, runs in results["runs"].items():
        for steps in map(str, results["sample_steps"]):
            scored = [run["scores"][steps] for run in runs]
            rows.append([name, scored[0]["scheduler"], steps, len(runs),
                         *(mean_std([s.get(key) for s in scored]) for key in SCORES)])
    lines += markdown_table(["objective", "sampler", "steps", "seeds", *SCORE_NAMES], rows)
    lines += [""] + markdown_table(["objective", "s/step (training)"], (
        [name, mean_std([run.get("seconds_per_step") for run in runs])] for name, runs in results["runs"].items()))
    return "\n".join(lines) + "\n"


def recorded_run(out: str, name: str) -> Optional[dict]:
    """A finished run's record from OUT (``runs/NAME/study_run.json``, its scores and grid), or None where
    any of them is missing: what ``--report_only`` builds the tables from."""
    paths = [os.path.join(out, "runs", name, "study_run.json"),
             *(os.path.join(out, "scores", f"{name}_steps{steps}.json") for steps in SAMPLE_STEPS)]
    grid_path = os.path.join(out, "grids", f"{name}.png")
    if not all(os.path.exists(p) for p in [*paths, grid_path]):
        return None
    info = cached(paths[0], None)
    info["scores"] = {str(steps): cached(path, None) for steps, path in zip(SAMPLE_STEPS, paths[1:])}
    info["grid"] = os.path.relpath(grid_path, out)
    return info


def objective_study(args, argv, context) -> int:
    """Every OBJECTIVE_KINDS kind per seed (the study's steps, batch and learning rate), scored at SAMPLE_STEPS;
    with ``--report_only``, the tables of the runs already recorded in OUT (nothing trained or sampled)."""
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "sample_steps": list(SAMPLE_STEPS), "runs": {}}
    missing = []
    for name, settings in OBJECTIVE_KINDS.items():
        runs = []
        for seed in args.seeds:
            if args.report_only:
                info = recorded_run(args.out, f"{name}_s{seed}")
                if info is None:
                    missing.append(f"{name}_s{seed}")
                    continue
            else:
                info = train(args.out, f"{name}_s{seed}", {**ATTENTION.settings(), **settings}, args.steps, seed, args)
                info["scores"] = {str(steps): score_at_steps(info["folder"], args.out, args, context, steps)
                                  for steps in SAMPLE_STEPS}
                info["grid"] = os.path.relpath(grid(info["folder"], args.out), args.out)
            runs.append(info)
        if runs:
            results["runs"][name] = runs
    if missing:
        print(f"nala-study: not yet trained and scored in {args.out}: {', '.join(missing)}", file=sys.stderr)
    if not results["runs"]:
        raise ValueError(f"no finished objective runs in {args.out}: run without --report_only to train them")
    return write_results(args.out, results, tables)
