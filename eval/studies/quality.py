"""The quality study (``nala-study``, the default): five attentions trained from scratch and scored, the
conversion of the softmax run to NaLa (with and without distillation), its high resolution and each
run's attention entropy."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Dict, Sequence

import torch

from nala_diffusion.eval.sample_sets import generate_samples
from nala_diffusion.eval.studies.common import Kind, cached, markdown_table, mean_std, write_results
from nala_diffusion.eval.studies.highres import highres
from nala_diffusion.metrics.samples import SAMPLE_DIR, balanced_labels
from nala_diffusion.pipelines.request import SamplingRequest
from nala_diffusion.utils.files import write_json_atomically

if TYPE_CHECKING:
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

VARIANTS: Dict[str, Kind] = {
    "softmax": Kind("softmax"),
    "relu_linear": Kind("relu_linear"),
    "elu_linear": Kind("elu_linear"),
    "nala_relu_split": Kind("nala", {"inhibit": "relu_split"}),
    "nala_cosine": Kind("nala", {"inhibit": "cosine"}),
}
# the entropy statistics of a kind's own kernel
ENTROPY_KIND = {"softmax": "softmax", "relu_linear": "relu_linear", "elu_linear": "elu_linear",
                "nala_relu_split": "nala", "nala_cosine": "nala", "nala_sigma1": "nala", "nala_calibrated": "nala",
                "nala_learnable": "nala"}


@torch.no_grad()
def heldout_loss(pipe: NaLaDiTPipeline, test, seed: int = 0) -> float:
    """MSE of the model's prediction on the test crops, one fixed timestep and noise per crop (the same for
    every model): the target of the model's prediction type for DDPM models (epsilon, v), the velocity for
    flow models (whose loss is on another scale)."""
    from nala_diffusion.diffusion.noising import noised_at
    from nala_diffusion.diffusion.objectives import denoising_target, noise_schedule_for

    model = pipe.transformer.eval()
    scheduler = noise_schedule_for(model.config, pipe.scheduler)
    generator = torch.Generator().manual_seed(seed)
    images, labels = test.images, test.labels
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    total = 0.0
    for part in torch.arange(len(images)).split(250):
        noisy, steps = noised_at(scheduler, images[part], noise[part], timesteps[part], model.config)
        prediction = model(noisy, timestep=steps, class_labels=labels[part]).sample[:, :3]
        target = denoising_target(model.config, images[part], noise[part], scheduler, timesteps[part])
        total += float((prediction - target).square().mean(dim=(1, 2, 3)).sum())
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
    generate_samples(pipe, folder, args.num_samples, labels=labels, batch_size=100,
                     request=SamplingRequest(steps=args.sample_steps, guidance=args.guidance, seed=0))
    feats = features.folder_features(os.path.join(folder, SAMPLE_DIR), extractor, "cpu", verbose=False)
    return {"class_accuracy": class_accuracy(classifier, folder, labels, pipe.num_classes)["accuracy"],
            "fid": metrics_lib.frechet_distance(*metrics_lib.statistics(feats), *real_stats),
            "kid": metrics_lib.kernel_inception_distance(feats, real_feats),
            **metrics_lib.suite(feats, real_feats, extractor.logits),
            "heldout_loss": heldout_loss(pipe, test)}


def entropy(run: str, out: str, kind: str, timesteps: Sequence[int] = (500,), images: int = 4) -> Dict[str, dict]:
    """Per layer: the entropy statistics of the run's own kernel, with the NaLa saturation report
    (norm and power quantiles, responding fraction) where the layer runs NaLa."""
    from nala_diffusion.eval import attention_entropy
    path = os.path.join(out, "scores", f"{os.path.basename(run)}_entropy.json")
    if not os.path.exists(path):
        result, _ = attention_entropy.model_entropy(run, "builtin:photos", list(timesteps), images)
        write_json_atomically(path, result, sort_keys=False)
    with open(path, encoding="utf-8") as handle:
        result = json.load(handle)
    saturation = result.get("saturation", {})
    return {layer: {**stats[ENTROPY_KIND[kind]], **({"saturation": saturation[layer]} if layer in saturation else {})}
            for layer, stats in result["layers"].items()}


def tables(results: dict) -> str:
    scores = ("class_accuracy", "fid", "kid", "is_mean", "precision", "recall", "heldout_loss", "seconds_per_step")
    score_names = ["class accuracy", "domain FID", "KID", "IS", "precision", "recall", "held-out loss", "s/step"]
    lines = [f"Command: `{results['command']}`", ""]
    lines += markdown_table(["attention", "seeds", *score_names], (
        [name, len(runs), *(mean_std([r.get(key) for r in runs]) for key in scores)]
        for name, runs in results["scratch"].items()))
    lines += [""] + markdown_table(["conversion", "steps", *score_names], (
        [name, r["steps"], *(mean_std([r.get(key)]) for key in scores)] for name, r in results["conversion"].items()))
    lines += [""] + markdown_table(
        ["model", "side", "mode", "crop FID", "crop precision", "crop recall", "s/image", "peak MiB (one image)"],
        ([name, r["side"], r["mode"], f"{r['crop_fid']:.4g}", mean_std([r.get("crop_precision")]),
          mean_std([r.get("crop_recall")]), f"{r['seconds_per_image']:.3g}", f"{r['peak_mib_one_image']:.1f}"]
         for name, rows in results["highres"].items() for r in rows))
    lines += [""] + markdown_table(["model", "layer", "Spearman(entropy, ‖q‖)", "mean entropy"], (
        [name, layer, f"{s['spearman']:+.3f}", f"{s['mean_entropy']:.3f}"]
        for name, layers in results["entropy"].items() for layer, s in layers.items()))
    return "\n".join(lines) + "\n"


def quality_study(args, argv, context) -> int:
    """Every VARIANTS kind per seed, the conversion runs, high resolution of the first softmax and NaLa
    runs, and the entropy of each kind's first run. ``context``: the scored reference (see ``nala-study``)."""
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "scratch": {}, "conversion": {}, "highres": {}, "entropy": {}}
    for name, kind in VARIANTS.items():
        results["scratch"][name] = [context.run_and_score(f"{name}_s{seed}", kind.settings(), args.steps, seed)
                                    for seed in args.seeds]
    teacher = results["scratch"]["softmax"][0]["folder"]
    short = max(1, round(args.conversion_fraction * args.steps))
    convert = {"init_from": teacher, **VARIANTS["nala_relu_split"].settings()}
    results["conversion"]["nala_from_softmax"] = context.run_and_score("convert_nala", convert, short, args.seeds[0])
    results["conversion"]["nala_from_softmax_distilled"] = context.run_and_score(
        "convert_nala_distilled", {**convert, "teacher": teacher}, short, args.seeds[0])
    for name in ("softmax", "nala_relu_split"):
        run = results["scratch"][name][0]["folder"]
        results["highres"][name] = highres(run, args.out, args, context.real_stats, context.extractor,
                                           real_feats=context.real_feats)
    for name, runs in results["scratch"].items():
        results["entropy"][name] = entropy(runs[0]["folder"], args.out, name)
    return write_results(args.out, results, tables)
