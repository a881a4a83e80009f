"""nala-study: the quality study in miniature, rerun from scratch with one command.

    nala-study --out study                      # every stage; a rerun skips what is finished
    nala-study --out study --steps 500 --seeds 0 1 --num_samples 200   # the defaults, spelled out

On ``builtin:photos`` (32 px, pixel space), with the demo's architecture (4 layers, hidden 128,
2 heads, patch 4, LePE) and the same steps, batch, learning rate, EMA and data for every run:

1. **Five attentions**: softmax, relu_linear, elu_linear, nala (relu_split), nala (cosine), one run
   per seed. Each is scored on class-balanced samples (fixed seeds, DDIM, fixed steps and guidance)
   with the shipped domain classifier: class accuracy, domain FID and KID against the held-out test
   crops, the held-out denoising loss (epsilon MSE on the test crops at fixed noise and timesteps),
   and the training time per step.
2. **Conversion**: NaLa initialised from the first softmax run and fine-tuned for
   ``--conversion_fraction`` of the steps, without and with distillation from that softmax model.
3. **High resolution**: the first softmax and NaLa runs sampled at 2x and 4x the training side, direct
   and progressive; domain FID of random training-size crops against the test crops, seconds per
   image and peak tensor memory of one image.
4. **Attention entropy** per layer of the first run of every kind (``nala-entropy --model``).

Writes ``OUT/results.json`` and ``OUT/results.md`` (the tables).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

import numpy as np
import PIL.Image
import torch

from nala_diffusion.assets import demo_classifier_path, demo_pipeline_path
from nala_diffusion.eval import retrieval
from nala_diffusion.metrics.samples import (
    SAMPLE_DIR,
    balanced_labels,
    export_reference,
    generate_samples,
    save_png_atomically,
)
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error
from nala_diffusion.utils.files import save_grid_atomically, write_json_atomically
from nala_diffusion.utils.locks import output_lock
from nala_diffusion.utils.run_guard import check_fingerprint, code_version, pipeline_weights_hash

ARCHITECTURE = {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 64, "patch_size": 4,
                "norm_num_groups": 32, "use_lepe": True}
VARIANTS: Dict[str, List[str]] = {
    "softmax": ["--attention", "softmax"],
    "relu_linear": ["--attention", "relu_linear"],
    "elu_linear": ["--attention", "elu_linear"],
    "nala_relu_split": ["--attention", "nala", "--inhibit", "relu_split"],
    "nala_cosine": ["--attention", "nala", "--inhibit", "cosine"],
}
# The norm-awareness study (--study norm): NaLa's query-norm scale sigma against the anchors.
NORM_VARIANTS: Dict[str, List[str]] = {
    "softmax": ["--attention", "softmax"],
    "relu_linear": ["--attention", "relu_linear"],
    "nala_sigma1": ["--attention", "nala", "--norm_scale_mode", "fixed", "--norm_scale", "1"],
    "nala_calibrated": ["--attention", "nala", "--norm_scale_mode", "calibrated"],
    "nala_learnable": ["--attention", "nala", "--norm_scale_mode", "learnable"],
}
NORM_TIMESTEPS = (250, 500, 750)
# The retrieval study (--study retrieval): builtin:pairs at patch 4, 64 tokens per image (a training
# step at patch 2, 256 tokens, costs about four times as much: 2.3 s at batch 32 on the 2-core
# development machine, too slow for five models at a useful step count; see docs/results.md).
RETRIEVAL_ARCHITECTURE = {**ARCHITECTURE, "patch_size": 4}
TRAINING = {"steps": 500, "batch_size": 32, "learning_rate": 5e-4}
# the calibrated budget and task (docs/results.md, "Calibration"): timesteps where a token can be recognised
RETRIEVAL_TRAINING = {"steps": 10000, "batch_size": 32, "learning_rate": 1e-3, "timestep_range": [0, 500],
                      "retrieval_timesteps": list(retrieval.TIMESTEPS)}
NALA = ["--attention", "nala", "--norm_scale_mode", "calibrated"]  # relu_split inhibit, power scale 3
RETRIEVAL_VARIANTS: Dict[str, List[str]] = {
    "softmax": ["--attention", "softmax"],
    "relu_linear": ["--attention", "relu_linear"],
    "elu_linear": ["--attention", "elu_linear"],
    "nala_calibrated": NALA,
    "nala_cosine": [*NALA, "--inhibit", "cosine"],
    "nala_rope": [*NALA, "--use_rope"],
    "nala_gate": [*NALA, "--use_gate"],
    "nala_learnable_power": [*NALA, "--learnable_power"],
    # the larger power scale on the relu_split kernel: cosine inhibit retrieved no better (docs/results.md)
    "nala_power6": [*NALA, "--power_scale", "6"],
    "hybrid_nala": [*NALA, "--softmax_layers", "-1"],
    # the control that separates the hybrid layout's effect from NaLa's
    "hybrid_relu_linear": ["--attention", "relu_linear", "--softmax_layers", "-1"],
    "nala_sigma1": ["--attention", "nala", "--norm_scale_mode", "fixed", "--norm_scale", "1"],
    # round two: the cosine inhibit where its angle is not saturated (at 20 it is relu_split's ±pi/4)
    "nala_cosine_sharp2": [*NALA, "--inhibit", "cosine", "--angle_sharpness", "2"],
    "nala_cosine_sharp5": [*NALA, "--inhibit", "cosine", "--angle_sharpness", "5"],
    # NaLaFormer's released layout ratio: the last two of four blocks softmax
    "hybrid_nala_last2": [*NALA, "--softmax_layers", "-2", "-1"],
    "hybrid_relu_linear_last2": ["--attention", "relu_linear", "--softmax_layers", "-2", "-1"],
}
ANCHORS = ("softmax", "relu_linear")  # the two ends of the gap every other kind is placed in
# what --study retrieval trains without --kinds (nala_sigma1 belongs to the first version of the study)
RETRIEVAL_DEFAULT_KINDS = [kind for kind in RETRIEVAL_VARIANTS if kind != "nala_sigma1"]
ENTROPY_KIND = {"softmax": "softmax", "relu_linear": "relu_linear", "elu_linear": "elu_linear",
                "nala_relu_split": "nala", "nala_cosine": "nala", "nala_sigma1": "nala", "nala_calibrated": "nala",
                "nala_learnable": "nala"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help='study folder: runs, samples, results.json/csv and plots')
    p.add_argument("--study", choices=["quality", "norm", "highres", "retrieval"], default="quality",
                   help="'quality': the five attentions, conversion, high resolution, entropy; 'norm': NaLa's query-norm "
                        "scale (sigma = 1, calibrated, learnable) against softmax and ReLU linear, with per-layer "
                        "norm-awareness measures; 'highres': trained pipelines (--highres_models) at 1x, 2x and 4x the "
                        "training side, direct and progressive, attention sharpness off and auto; 'retrieval': the "
                        "retrieval-denoising task builtin:pairs (patch 4, 64 tokens, unless --model_config), retrieval gain and mass of "
                        "softmax, ReLU and 1+ELU linear, NaLa sigma = 1 and NaLa calibrated")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every scratch run (default: 500; --study retrieval: 10000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help='training seeds per variant')
    p.add_argument("--batch_size", type=int, default=None, help="training batch size (default: 32, also for --study retrieval)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="training learning rate (default: 5e-4; --study retrieval: 1e-3)")
    p.add_argument("--conversion_fraction", type=float, default=0.2, help='share of the budget the converted variants train after conversion')
    p.add_argument("--num_samples", type=int, default=200, help="samples per model for accuracy/FID/KID")
    p.add_argument("--sample_steps", type=int, default=25, help='sampling steps of the evaluation')
    p.add_argument("--guidance", type=float, default=2.0, help='classifier-free guidance of the evaluation')
    p.add_argument("--highres_samples", type=int, default=10, help="images per high-resolution setting")
    p.add_argument("--kinds", nargs="+", default=None, choices=list(RETRIEVAL_VARIANTS), metavar="KIND",
                   help="--study retrieval: train and score only these kinds, in this order (default: "
                        + ", ".join(RETRIEVAL_DEFAULT_KINDS) + "; also nala_sigma1)")
    p.add_argument("--tiebreak_seed", action=argparse.BooleanOptionalAction, default=True,
                   help="--study retrieval: where a kind's seeds disagree on its order against relu_linear, train it "
                        "and both anchors (softmax, relu_linear) on one more seed (max(--seeds) + 1)")
    p.add_argument("--report_only", action="store_true",
                   help="--study retrieval: train nothing; build the tables and plot from the runs already finished in "
                        "OUT and name the ones still to train")
    p.add_argument("--timestep_range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="training timesteps LOW <= t < HIGH (default: all; --study retrieval: 0 500, the half in "
                        "which a partner token can be recognised)")
    p.add_argument("--retrieval_timesteps", type=int, nargs="+", default=None, metavar="T",
                   help="--study retrieval: timesteps of the retrieval gain and mass (default: "
                        + " ".join(map(str, retrieval.TIMESTEPS)) + ")")
    p.add_argument("--pairs_layout", choices=sorted(retrieval.DATASETS), default="tiles",
                   help="--study retrieval: the task, 'tiles' (builtin:pairs, tile mosaics) or 'crops' "
                        "(builtin:pairs_crops, one photograph crop per half)")
    p.add_argument("--retrieval_images", type=int, default=300,
                   help="--study retrieval: held-out images of each set (paired, unpaired) for the retrieval gain")
    p.add_argument("--crops_per_image", type=int, default=16, help='crops per built-in photograph in the training data')
    p.add_argument("--classifier", default=None, help="DomainClassifier folder (default: the shipped one)")
    p.add_argument("--model_config", default=None, help="JSON file of model options replacing the demo architecture")
    p.add_argument("--overwrite", action="store_true",
                   help="remove a study made with other settings in OUT and start again (default: refuse, naming them)")
    p.add_argument("--highres_models", nargs="+", default=None, metavar="NAME=FOLDER",
                   help="--study highres: the pipelines to compare (default: nala=<the shipped demo>)")
    args = p.parse_args(argv)
    # the retrieval study's defaults are the budget at which its task separates softmax from ReLU
    # linear attention (docs/results.md, "Retrieval")
    defaults = RETRIEVAL_TRAINING if args.study == "retrieval" else TRAINING
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def cached(path: str, compute):
    """``compute()``'s JSON-able result, kept in ``path`` (written atomically): a rerun reads it back."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    result = compute()
    write_json_atomically(path, result, sort_keys=False)
    return result


def train(out: str, name: str, extra: List[str], steps: int, seed: int, args, dataset: str = "builtin:photos") -> dict:
    """One training run in OUT/runs/NAME (resumed if interrupted); returns its time per step."""
    folder = os.path.join(out, "runs", name)
    return cached(os.path.join(folder, "study_run.json"), lambda: _train(folder, out, extra, steps, seed, args, dataset))


def _train(folder: str, out: str, extra: List[str], steps: int, seed: int, args, dataset: str) -> dict:
    from nala_diffusion.train import train_nala_dit
    config = os.path.join(out, "model_config.json")
    with open(config, "w", encoding="utf-8") as handle:
        json.dump(args.architecture, handle)
    code = train_nala_dit.cli([
        "--dataset", dataset, "--resolution", "32", "--model_config", config,
        "--max_train_steps", str(steps), "--train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate), "--lr_warmup_steps", str(min(100, steps // 10)),
        "--use_ema", "--ema_decay", "0.995", "--checkpointing_steps", str(max(steps // 2, 1)),
        "--checkpoints_total_limit", "1", "--seed", str(seed), "--report_to", "none",
        "--output_dir", folder, "--resume_from_checkpoint", "latest", *extra,
        *(["--timestep_range", *map(str, args.timestep_range)] if args.timestep_range else []),
    ])
    if code != 0:
        raise RuntimeError(f"nala-study: training {os.path.basename(folder)} failed (exit code {code}); see the messages above")
    with open(os.path.join(folder, "log.csv"), newline="", encoding="utf-8") as handle:
        speeds = [float(r["images_per_second"]) for r in csv.DictReader(handle) if r.get("images_per_second")]
    return {"folder": folder, "steps": steps, "seed": seed, "arguments": extra,
            "seconds_per_step": args.batch_size / float(np.median(speeds)) if speeds else None}


@torch.no_grad()
def heldout_loss(pipe: NaLaDiTPipeline, test, seed: int = 0) -> float:
    """Epsilon MSE on the test crops, one fixed timestep and noise per crop (the same for every model)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    images, labels = test.images, test.labels
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    model = pipe.transformer.eval()
    total = 0.0
    for part in torch.arange(len(images)).split(250):
        noisy = scheduler.add_noise(images[part], noise[part], timesteps[part])
        prediction = model(noisy, timestep=timesteps[part], class_labels=labels[part]).sample[:, :3]
        total += float((prediction - noise[part]).square().mean(dim=(1, 2, 3)).sum())
    return total / len(images)


def score(run: str, out: str, args, real_feats, real_stats, extractor, classifier, test) -> dict:
    """Accuracy, FID, KID of samples and held-out loss of one run (cached in OUT/scores/NAME.json)."""
    name = os.path.basename(run)
    return cached(os.path.join(out, "scores", f"{name}.json"),
                  lambda: _score(run, os.path.join(out, "samples", name), args, real_feats, real_stats, extractor,
                                 classifier, test))


def _score(run: str, folder: str, args, real_feats, real_stats, extractor, classifier, test) -> dict:
    from nala_diffusion import NaLaDiTPipeline
    from nala_diffusion.eval.quality import class_accuracy
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib
    pipe = NaLaDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    labels = balanced_labels(args.num_samples, pipe.num_classes)
    generate_samples(pipe, folder, args.num_samples, labels=labels, seed=0, batch_size=100,
                     num_inference_steps=args.sample_steps, guidance_scale=args.guidance)
    feats = features.folder_features(os.path.join(folder, SAMPLE_DIR), extractor, "cpu", verbose=False)
    return {"class_accuracy": class_accuracy(classifier, folder, labels, pipe.num_classes)["accuracy"],
            "fid": metrics_lib.frechet_distance(*metrics_lib.statistics(feats), *real_stats),
            "kid": metrics_lib.kernel_inception_distance(feats, real_feats),
            **metrics_lib.suite(feats, real_feats, extractor.logits),
            "heldout_loss": heldout_loss(pipe, test)}


def highres(run: str, out: str, args, real_stats, extractor, classifier=None, sharpness=("off",),
            name: Optional[str] = None, real_feats=None) -> List[dict]:
    """Sampling at 2x and 4x the training side, direct and progressive (and each ``sharpness``
    setting), scored on random training-size crops. Cached under ``name`` (default: the folder's
    name) and the hash of the pipeline's weights, so that two models in folders named alike, or new
    weights in the same folder, never share results."""
    key = f"{name or os.path.basename(run.rstrip('/'))}_{pipeline_weights_hash(run)[:12]}"
    suffix = "" if tuple(sharpness) == ("off",) else "_" + "_".join(sharpness)
    return cached(os.path.join(out, "scores", f"{key}_highres{suffix}.json"),
                  lambda: _highres(run, os.path.join(out, "highres", key), args, real_stats, extractor, classifier,
                                   sharpness, real_feats))


def crop_accuracy(classifier, crops: torch.Tensor, labels: torch.Tensor) -> float:
    """The classifier's accuracy on training-size crops (N, 3, s, s) in [0, 1], labelled by their image."""
    with torch.no_grad():
        predictions = torch.cat([classifier(chunk).argmax(-1) for chunk in crops.split(256)])
    return float((predictions == labels).float().mean())


def _highres(run: str, crop_root: str, args, real_stats, extractor, classifier, sharpness, real_feats=None
             ) -> List[dict]:
    from nala_diffusion import NaLaDiTHighResPipeline
    from nala_diffusion.eval import benchmark
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib
    pipe = NaLaDiTHighResPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.default_sample_size
    labels = balanced_labels(args.highres_samples, pipe.num_classes)
    rows = []
    settings = [(1, "direct", "off")] if classifier is not None else []  # the training size, for reference
    settings += [(f, m, s) for f in (2, 4) for m in ("direct", "progressive") for s in sharpness]
    for factor, mode, setting in settings:
        # at the training size every image is one crop: as many images as there are crops above it
        batch = labels if factor > 1 else balanced_labels(args.highres_samples * args.crops_per_image, pipe.num_classes)
        call = dict(height=factor * side, width=factor * side, highres_mode=mode, output_type="np",
                    num_inference_steps=args.sample_steps, guidance_scale=args.guidance, attention_sharpness=setting)
        start = time.perf_counter()
        out = pipe(batch, generator=[torch.Generator().manual_seed(i) for i in range(len(batch))], **call)
        seconds = (time.perf_counter() - start) / len(batch)
        images = out.images
        probe = benchmark.PeakBytes()
        with probe:
            pipe(batch[:1], generator=torch.Generator().manual_seed(0), **call)
        folder = f"{factor}x_{mode}" + ("" if setting == "off" else f"_{setting}")
        crops_dir = os.path.join(crop_root, folder)
        os.makedirs(crops_dir, exist_ok=True)
        grid = torch.from_numpy(images[: min(len(images), 10)]).permute(0, 3, 1, 2)
        save_grid_atomically(grid, os.path.join(crop_root, f"{folder}.png"), nrow=min(len(grid), 5))
        rng = np.random.RandomState(0)
        crops, crop_labels = [], []
        for i, image in enumerate(images):
            for j in range(args.crops_per_image if factor > 1 else 1):
                y, x = rng.randint(0, image.shape[0] - side + 1, size=2)
                pixels = (image[y:y + side, x:x + side] * 255).round().astype(np.uint8)
                save_png_atomically(PIL.Image.fromarray(pixels), os.path.join(crops_dir, f"{i:04d}_{j:02d}.png"))
                crops.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
                crop_labels.append(batch[i])
        feats = features.folder_features(crops_dir, extractor, "cpu", verbose=False)
        row = {"factor": factor, "mode": mode, "sharpness": setting, "side": factor * side, "seconds_per_image": seconds,
               "peak_mib_one_image": probe.peak / 2**20, "crop_fid": metrics_lib.frechet_distance(*metrics_lib.statistics(feats), *real_stats),
               "crops": len(crops)}
        if real_feats is not None:  # the rest of the suite on the crops, as the scores beside FID
            suite = metrics_lib.suite(feats, real_feats, extractor.logits)
            row.update({"crop_is": suite["is_mean"], "crop_precision": suite["precision"], "crop_recall": suite["recall"]})
        if classifier is not None:
            row["crop_accuracy"] = crop_accuracy(classifier, torch.stack(crops), torch.tensor(crop_labels))
        report = out.stages[-1].get("attention_report")
        if report:
            row["attention_sharpness"] = {layer: v["sharpness"] for layer, v in report["layers"].items()}
        rows.append(row)
    return rows


def highres_tables(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             "| model | side | mode | sharpness | crop accuracy | crop FID | crop IS | crop precision | crop recall | "
             "s/image | peak MiB (one image) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in results["highres"].items():
        for r in rows:
            suite = " | ".join(mean_std([r.get(k)]) for k in ("crop_is", "crop_precision", "crop_recall"))
            lines.append(f"| {name} | {r['side']} | {r['mode']} | {r['sharpness']} | {r.get('crop_accuracy', float('nan')):.3f} | "
                         f"{r['crop_fid']:.4g} | {suite} | {r['seconds_per_image']:.3g} | {r['peak_mib_one_image']:.1f} |")
    lines += ["", "| model | side | mode | sharpness per layer (auto) |", "| --- | --- | --- | --- |"]
    for name, rows in results["highres"].items():
        for r in rows:
            if r.get("attention_sharpness"):
                values = ", ".join(f"{v:.3g}" for v in r["attention_sharpness"].values())
                lines.append(f"| {name} | {r['side']} | {r['mode']} | {values} |")
    return "\n".join(lines) + "\n"


def entropy(run: str, out: str, kind: str, timesteps: Sequence[int] = (500,), images: int = 4) -> Dict[str, dict]:
    """Per layer: the entropy statistics of the run's own kernel, with the NaLa saturation report
    (norm and power quantiles, responding fraction) where the layer runs NaLa."""
    from nala_diffusion.eval import attention_entropy
    path = os.path.join(out, "scores", f"{os.path.basename(run)}_entropy.json")
    if not os.path.exists(path):
        attention_entropy.main(["--model", run, "--data", "builtin:photos", "--json", path, "--images", str(images),
                                "--timestep", *map(str, timesteps)])
    with open(path, encoding="utf-8") as handle:
        result = json.load(handle)
    saturation = result.get("saturation", {})
    return {layer: {**stats[ENTROPY_KIND[kind]], **({"saturation": saturation[layer]} if layer in saturation else {})}
            for layer, stats in result["layers"].items()}


def mean_std(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


def tables(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             "| attention | seeds | class accuracy | domain FID | KID | IS | precision | recall | held-out loss | s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results["scratch"].items():
        cells = [mean_std([r.get(key) for r in runs]) for key in ("class_accuracy", "fid", "kid", "is_mean", "precision",
                                                                  "recall", "heldout_loss", "seconds_per_step")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "| conversion | steps | class accuracy | domain FID | KID | IS | precision | recall | held-out loss | s/step |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["conversion"].items():
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(mean_std([r.get(k)]) for k in (
            "class_accuracy", "fid", "kid", "is_mean", "precision", "recall", "heldout_loss", "seconds_per_step")) + " |")
    lines += ["", "| model | side | mode | crop FID | crop precision | crop recall | s/image | peak MiB (one image) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rows in results["highres"].items():
        for r in rows:
            suite = " | ".join(mean_std([r.get(k)]) for k in ("crop_precision", "crop_recall"))
            lines.append(f"| {name} | {r['side']} | {r['mode']} | {r['crop_fid']:.4g} | {suite} | {r['seconds_per_image']:.3g} | "
                         f"{r['peak_mib_one_image']:.1f} |")
    lines += ["", "| model | layer | Spearman(entropy, ‖q‖) | mean entropy |", "| --- | --- | --- | --- |"]
    for name, layers in results["entropy"].items():
        for layer, s in layers.items():
            lines.append(f"| {name} | {layer} | {s['spearman']:+.3f} | {s['mean_entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def norm_tables(results: dict) -> str:
    """The norm-awareness study's tables: per-kind scores, then per-layer measures (mean ± sd over seeds)."""
    lines = [f"Command: `{results['command']}`", "",
             "| attention | seeds | held-out loss | class accuracy | domain FID | KID | IS | precision | recall | s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results["scratch"].items():
        cells = [mean_std([r.get(key) for r in runs]) for key in ("heldout_loss", "class_accuracy", "fid", "kid", "is_mean",
                                                                  "precision", "recall", "seconds_per_step")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "| attention | layer | ρ(entropy, ‖q‖) | dH/dlog‖q‖ | mean entropy | power p5–p95 | responding |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, per_seed in results["entropy"].items():
        for layer in per_seed[0]:
            stats = [seed[layer] for seed in per_seed]
            sat = [s["saturation"] for s in stats if "saturation" in s]
            power = (f"{np.mean([s['power']['p5'] for s in sat]):.2f}–{np.mean([s['power']['p95'] for s in sat]):.2f}"
                     if sat else "–")
            responding = mean_std([s["responding_fraction"] for s in sat]) if sat else "–"
            lines.append(f"| {name} | {layer.replace('transformer_blocks.', 'block ').replace('.attn1', '')} | "
                         f"{mean_std([s['spearman'] for s in stats])} | {mean_std([s['norm_effect'] for s in stats])} | "
                         f"{mean_std([s['mean_entropy'] for s in stats])} | {power} | {responding} |")
    return "\n".join(lines) + "\n"


# the token count at which each kind's forward time is measured (a 512 x 512 image at patch 4)
COST_TOKENS = 16384


def kind_model(out: str, extra: List[str]):
    """The study's model (OUT/model_config.json) with one kind's attention flags, as nala-train builds
    it, randomly initialised: for timing."""
    from nala_diffusion.data.builtin_pairs import SIZE
    from nala_diffusion.data.builtin_photos import PHOTOS
    from nala_diffusion.train import train_nala_dit

    flags = train_nala_dit.parse_args(["--dataset", "builtin:pairs", "--output_dir", out, "--max_train_steps", "1",
                                       "--model_config", os.path.join(out, "model_config.json"), *extra])
    model, _ = train_nala_dit.build_model(flags, 3, SIZE, len(PHOTOS))  # RGB builtin:pairs images, one class a photo
    return model.eval()


def forward_costs(out: str, kinds: Sequence[str], tokens: int = COST_TOKENS, repeats: int = 3) -> Dict[str, float]:
    """Seconds of one forward pass (batch 1, ``tokens`` tokens) of every kind's model, timed in one
    interleaved run (medians; :func:`nala_diffusion.eval.benchmark.interleaved_medians`), so their
    ratios are fair. Cached in OUT/scores/forward_cost_<tokens>.json; a later call for a subset of the
    kinds timed there reuses it, one with a kind not timed there times all its kinds again."""
    from nala_diffusion.eval import benchmark

    def measure():
        with open(os.path.join(out, "model_config.json"), encoding="utf-8") as handle:
            side = math.isqrt(tokens) * json.load(handle)["patch_size"]
        x, t, y = torch.randn(1, 3, side, side), torch.tensor([100]), torch.tensor([0])
        calls = {}
        for kind in kinds:
            model = kind_model(out, RETRIEVAL_VARIANTS[kind])
            calls[kind] = lambda model=model: model(x, timestep=t, class_labels=y)
        with torch.no_grad():
            seconds = benchmark.interleaved_medians(calls, torch.device("cpu"), repeats)
        return {"tokens": tokens, "threads": torch.get_num_threads(), "seconds": seconds}

    path = os.path.join(out, "scores", f"forward_cost_{tokens}.json")
    cost = cached(path, measure)
    if not set(kinds) <= set(cost["seconds"]):  # more kinds since: all again, in one run
        os.remove(path)
        cost = cached(path, measure)
    # a run that timed more kinds serves any subset of them (ratios from one interleaved run)
    return {**cost, "seconds": {kind: cost["seconds"][kind] for kind in kinds}}


def retrieval_study(args, argv) -> dict:
    """Train every RETRIEVAL_VARIANTS kind per seed on builtin:pairs_mixed (half the images paired, so
    that the control is not out of distribution), then measure retrieval gain and mass
    (:mod:`nala_diffusion.eval.retrieval`) on the held-out split."""
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "layout": args.pairs_layout,
               "timesteps": list(args.retrieval_timesteps), "timestep_range": args.timestep_range, "runs": {}}
    dataset = f"{retrieval.DATASETS[args.pairs_layout]}_mixed"
    missing = []

    def run(kind: str, seed: int) -> Optional[dict]:
        name = f"retrieval_{kind}_s{seed}"
        if args.report_only and not os.path.exists(os.path.join(args.out, "runs", name, "study_run.json")):
            if name not in missing:
                missing.append(name)
            return None
        info = train(args.out, name, RETRIEVAL_VARIANTS[kind], args.steps, seed, args, dataset=dataset)
        path = os.path.join(args.out, "scores", f"{name}.json")
        return {**info, **cached(path, lambda: retrieval.measure(info["folder"], args.retrieval_timesteps,
                                                                 gain_images=args.retrieval_images, mass_images=8,
                                                                 layout=args.pairs_layout))}

    for kind in args.kinds or RETRIEVAL_DEFAULT_KINDS:
        finished = [r for r in (run(kind, seed) for seed in args.seeds) if r is not None]
        if finished:
            results["runs"][kind] = finished
    if args.tiebreak_seed:
        # a kind above ReLU linear on one seed and not on another gets one more seed, with the anchors
        # trained on it too so that its gap share has its own denominator
        extra = max(args.seeds) + 1
        for kind in [k for k in results["runs"] if order_disagrees(results, k)]:
            print(f"nala-study: {kind}'s seeds disagree on its order against relu_linear; "
                  f"{'it needs' if args.report_only else 'training'} seed {extra}",
                  file=sys.stderr)
            for name in (*ANCHORS, kind):
                if all(r["seed"] != extra for r in results["runs"][name]) and (finished := run(name, extra)):
                    results["runs"][name].append(finished)
    results["missing"] = missing
    if not results["runs"]:
        raise ValueError(f"no finished retrieval runs in {args.out}: run without --report_only to train them")
    results["forward_cost"] = forward_costs(args.out, list(results["runs"]))
    plot_retrieval(results, os.path.join(args.out, "retrieval_gain.png"))
    return results


def gap_closed(results: dict, kind: str) -> List[float]:
    """Per seed of ``kind`` that both anchors were trained on: (gain(kind) - gain(ReLU linear)) /
    (gain(softmax) - gain(ReLU linear)), mean gains over timesteps, each anchor on the same seed."""
    runs = results["runs"]
    if not set(ANCHORS) <= set(runs):
        return []
    soft, relu = ({r["seed"]: r["gain"]["mean_gain"] for r in runs[anchor]} for anchor in ANCHORS)
    out = []
    for run in runs[kind]:
        seed = run["seed"]
        if seed in soft and seed in relu:
            gap = soft[seed] - relu[seed]
            out.append((run["gain"]["mean_gain"] - relu[seed]) / gap if gap else float("nan"))
    return out


def order_disagrees(results: dict, kind: str) -> bool:
    """Whether ``kind`` (not an anchor) retrieves better than ReLU linear on some seeds and not on others."""
    return kind not in ANCHORS and len({share > 0 for share in gap_closed(results, kind)}) > 1


def last_layer(run: dict) -> dict:
    return list(run["mass"].values())[-1]


def retrieval_tables(results: dict) -> str:
    """The retrieval study's tables: quality and cost per kind; gain per timestep; mass, rho and the
    norm effect per layer."""
    timesteps = [str(t) for t in results["timesteps"]]
    runs_by_kind = results["runs"]
    cost = results.get("forward_cost", {})
    seconds = cost.get("seconds", {})
    lines = [f"Command: `{results['command']}`", "",
             "Quality and cost per kind (mean ± sd over seeds; the gap share per seed in brackets; last layer = the "
             f"last self-attention; forward = one {cost.get('tokens', COST_TOKENS):,}-token forward pass, batch 1, "
             f"{cost.get('threads', '?')} threads, all kinds timed in one interleaved run):", "",
             "| attention | seeds | mean gain | share of the ReLU → softmax gap | last-layer partner mass (baseline) "
             "| last-layer dH/dlog‖q‖ | held-out loss | s/step | forward (s) | forward / softmax |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if results.get("missing"):
        lines[1:1] = ["", "Not yet trained (tables from the finished runs only): " + ", ".join(results["missing"])]
    for kind, runs in runs_by_kind.items():
        shares = gap_closed(results, kind)
        share = "–" if kind in ANCHORS or not shares else (
            f"{mean_std(shares)} [{', '.join(f'{v:.3f}' for v in shares)}]")
        loss = mean_std([(sum(r["gain"]["paired"].values()) + sum(r["gain"]["unpaired"].values())) / (2 * len(timesteps))
                         for r in runs])
        last = [last_layer(r) for r in runs]
        effect = mean_std([m["norm_effect"] for m in last]) if all("norm_effect" in m for m in last) else "–"
        forward = seconds.get(kind)
        ratio = f"{forward / seconds['softmax']:.3f}" if forward and seconds.get("softmax") else "–"
        lines.append(f"| {kind} | {len(runs)} | {mean_std([r['gain']['mean_gain'] for r in runs])} | {share} | "
                     f"{mean_std([m['mass'] for m in last])} ({mean_std([m['baseline'] for m in last])}) | {effect} | "
                     f"{loss} | {mean_std([r['seconds_per_step'] for r in runs])} | "
                     f"{f'{forward:.3f}' if forward else '–'} | {ratio} |")
    lines += ["", "Retrieval gain per timestep (unpaired − paired ε-MSE) and relative to the control's loss:", "",
              "| attention | " + " | ".join(f"gain t={t}" for t in timesteps) + " | relative gain (mean) |",
              "| --- | " + " | ".join("---" for _ in timesteps) + " | --- |"]
    for kind, runs in runs_by_kind.items():
        gains = [mean_std([r["gain"]["gain"][t] for r in runs]) for t in timesteps]
        relative = mean_std([sum(r["gain"]["relative_gain"].values()) / len(timesteps) for r in runs])
        lines.append(f"| {kind} | " + " | ".join(gains) + f" | {relative} |")
    first = next(iter(runs_by_kind.values()))[0]
    uniform = next(iter(first["mass"].values()))["uniform"]
    window = retrieval.WINDOWS[results.get("layout", "crops")]
    target = "the partner token" if window == 0 else f"the partner ± {window} column"
    lines += ["", f"Retrieval mass per layer ({target}; baseline: the same at a wrong offset; "
              f"uniform attention: {uniform:.3f}), rho(entropy, |q|), the norm effect dH/dlog|q| and the mean entropy:",
              "", "| attention | layer | kernel | mass | baseline | rho | dH/dlog‖q‖ | mean entropy |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, runs in runs_by_kind.items():
        for layer in runs[0]["mass"]:
            values = [r["mass"][layer] for r in runs]
            effect = mean_std([v["norm_effect"] for v in values]) if all("norm_effect" in v for v in values) else "–"
            lines.append(f"| {kind} | {layer.split('.')[1]} | {values[0]['kind']} | {mean_std([v['mass'] for v in values])} | "
                         f"{mean_std([v['baseline'] for v in values])} | {mean_std([v['rho'] for v in values])} | "
                         f"{effect} | {mean_std([v['entropy'] for v in values])} |")
    return "\n".join(lines) + "\n"


def plot_retrieval(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["runs"])
    # one colour and marker per kind, the same in both panels (the default cycle repeats after ten)
    colour = {kind: plt.get_cmap("tab20")(i % 20) for i, kind in enumerate(kinds)}
    marker = {kind: "osD^v<>"[i % 7] for i, kind in enumerate(kinds)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, kind in enumerate(kinds):
        gains = [r["gain"]["mean_gain"] for r in results["runs"][kind]]
        axes[0].bar(i, sum(gains) / len(gains), color="C0", alpha=0.6)
        axes[0].plot([i] * len(gains), gains, "ko", ms=4)
        masses = [[layer["mass"] for layer in r["mass"].values()] for r in results["runs"][kind]]
        layers = range(len(masses[0]))
        axes[1].plot(layers, [sum(m[j] for m in masses) / len(masses) for j in layers], "-",
                     marker=marker[kind], color=colour[kind], label=kind)
    axes[0].set_xticks(range(len(kinds)), kinds, rotation=40, ha="right", rotation_mode="anchor")
    axes[0].set(ylabel="unpaired - paired eps-MSE", title="retrieval gain (mean over t; dots: seeds)")
    uniform = next(iter(results["runs"][kinds[0]][0]["mass"].values()))["uniform"]
    axes[1].axhline(uniform, color="grey", ls="--", label="uniform")
    window = retrieval.WINDOWS[results.get("layout", "crops")]
    axes[1].set_xticks(list(range(len(masses[0]))))
    axes[1].set(xlabel="layer", ylabel="attention mass on the partner" + (f" ± {window}" if window else ""),
                title="retrieval mass (mean over seeds)")
    axes[1].legend(fontsize=8)
    seconds = results.get("forward_cost", {}).get("seconds", {})
    for kind in kinds:
        shares = gap_closed(results, kind)
        if kind in seconds and shares:
            axes[2].errorbar(seconds[kind], float(np.mean(shares)), yerr=float(np.std(shares)), fmt=marker[kind], capsize=3,
                             color=colour[kind], label=kind)  # a legend, not labels: kinds of one cost overlap
    tokens = results.get("forward_cost", {}).get("tokens", COST_TOKENS)
    axes[2].set_xscale("log")
    axes[2].set(xlabel=f"forward seconds at {tokens:,} tokens (log)", ylabel="share of the ReLU -> softmax gap",
                title="quality against cost (bars: sd over seeds)")
    if axes[2].get_legend_handles_labels()[1]:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def norm_study(args, argv, run_and_score) -> dict:
    """Train and score every NORM_VARIANTS kind per seed; per-layer measures on the test crops noised at
    NORM_TIMESTEPS (every seed)."""
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "timesteps": list(NORM_TIMESTEPS), "scratch": {}, "entropy": {}}
    for kind, extra in NORM_VARIANTS.items():
        results["scratch"][kind] = [run_and_score(f"{kind}_s{seed}", extra, args.steps, seed) for seed in args.seeds]
        results["entropy"][kind] = [entropy(run["folder"], args.out, kind, NORM_TIMESTEPS, images=20)
                                    for run in results["scratch"][kind]]
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.architecture = dict(RETRIEVAL_ARCHITECTURE if args.study == "retrieval" else ARCHITECTURE)
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as handle:
            args.architecture = json.load(handle)
    # which kinds (and, in the retrieval study, which seeds) run is not part of the fingerprint: every
    # run has its own folder named by kind and seed, so a study can be extended by more of them
    selection = ("kinds", "seeds", "tiebreak_seed", "report_only") if args.study == "retrieval" else ("kinds",)
    fingerprint = {**{k: v for k, v in vars(args).items() if k not in ("out", "overwrite", *selection)},
                   "code_version": code_version()}
    try:
        with output_lock(args.out, "the study folder"):
            check_fingerprint(args.out, fingerprint, overwrite=args.overwrite, what="study results",
                              has_outputs=lambda: any(os.path.exists(os.path.join(args.out, d)) for d in STUDY_OUTPUTS),
                              clear=lambda: [shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)
                                             for d in STUDY_OUTPUTS])
            return run_study(args, argv)
    except ValueError as error:
        return exit_on_input_error("nala-study", error)


# what a study writes and a rerun reuses (under OUT)
STUDY_OUTPUTS = ("runs", "scores", "samples", "highres", "real", "results.json", "results.md", "model_config.json",
                 "retrieval_gain.png")


def run_study(args, argv) -> int:
    from nala_diffusion import DomainClassifier
    from nala_diffusion.data.datasets import load_dataset
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib
    if args.study == "retrieval":
        return write_results(args.out, retrieval_study(args, argv), retrieval_tables)
    classifier_path = args.classifier or demo_classifier_path()
    test = load_dataset("builtin:photos", 32, split="test")
    real = export_reference("builtin:photos", 32, os.path.join(args.out, "real"), args.overwrite)
    extractor = features.classifier_extractor(classifier_path, torch.device("cpu"))
    classifier = DomainClassifier.from_pretrained(classifier_path).eval()
    real_feats = features.folder_features(real, extractor, "cpu", verbose=False)
    real_stats = metrics_lib.statistics(real_feats)
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "scratch": {}, "conversion": {}, "highres": {}, "entropy": {}}

    def run_and_score(name, extra, steps, seed):
        info = train(args.out, name, extra, steps, seed, args)
        return {**info, **score(info["folder"], args.out, args, real_feats, real_stats, extractor, classifier, test)}

    if args.study == "highres":
        models = dict(item.split("=", 1) for item in (args.highres_models or [f"nala={demo_pipeline_path()}"]))
        results = {"command": results["command"], "highres": {}}
        for name, folder in models.items():
            results["highres"][name] = highres(folder, args.out, args, real_stats, extractor, classifier, ("off", "auto"),
                                               name=name, real_feats=real_feats)
        return write_results(args.out, results, highres_tables)
    if args.study == "norm":
        return write_results(args.out, norm_study(args, argv, run_and_score), norm_tables)
    for kind, extra in VARIANTS.items():
        results["scratch"][kind] = [run_and_score(f"{kind}_s{seed}", extra, args.steps, seed) for seed in args.seeds]
    teacher = results["scratch"]["softmax"][0]["folder"]
    short = max(1, round(args.conversion_fraction * args.steps))
    convert = ["--init_from", teacher, "--attention", "nala", "--inhibit", "relu_split"]
    results["conversion"]["nala_from_softmax"] = run_and_score("convert_nala", convert, short, args.seeds[0])
    results["conversion"]["nala_from_softmax_distilled"] = run_and_score(
        "convert_nala_distilled", convert + ["--teacher", teacher], short, args.seeds[0])
    for kind in ("softmax", "nala_relu_split"):
        run = results["scratch"][kind][0]["folder"]
        results["highres"][kind] = highres(run, args.out, args, real_stats, extractor, real_feats=real_feats)
    for kind, runs in results["scratch"].items():
        results["entropy"][kind] = entropy(runs[0]["folder"], args.out, kind)
    return write_results(args.out, results, tables)


def write_results(out: str, results: dict, make_tables) -> int:
    """OUT/results.json and OUT/results.md (the tables, also printed)."""
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(make_tables(results))
    print(make_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
