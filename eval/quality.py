"""nala-quality: class accuracy and domain FID of a class-conditional pipeline on a built-in dataset.

    nala-quality --model RUN --classifier CLASSIFIER --dataset builtin:photos --out quality_run
    nala-quality --out quality_demo        # the shipped demo pipeline and classifier

1. Exports the dataset's held-out (test) split as PNGs: the real reference.
2. Samples ``--num_samples`` class-balanced images (seed + i per image) from the model and from an
   untrained model of the same config (same seeds), with the same sampler.
3. Reports the classifier's accuracy on the model's samples (overall and per class) and the domain
   FID/KID of both against the real images, with their ratio. Writes ``quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from nala_diffusion.metrics.classifier import DomainClassifier

import numpy as np
import PIL.Image
import torch

from nala_diffusion.assets import demo_classifier_path, demo_pipeline_path
from nala_diffusion.eval.sample_sets import generate_samples
from nala_diffusion.metrics.samples import (
    balanced_labels,
    export_reference,
    guard_samples,
    sample_path,
)
from nala_diffusion.pipelines.request import SamplingRequest
from nala_diffusion.pipelines.schedulers import SCHEDULERS, set_sampler
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error, positive_int
from nala_diffusion.utils.locks import output_lock
from nala_diffusion.utils.run_guard import pipeline_fingerprint


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped demo pipeline)")
    p.add_argument("--classifier", default=None, help="DomainClassifier folder (default: the shipped photos classifier)")
    p.add_argument("--dataset", default="builtin:photos",
                   help="the real reference: a built-in dataset's test split, or a folder of held-out images "
                        "(one subfolder per class), used whole")
    p.add_argument("--num_samples", type=positive_int, default=1000, help='samples of the trained model (class-balanced)')
    p.add_argument("--steps", type=positive_int, default=None, help="default: the pipeline's sampling_defaults, else 50")
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's sampling_defaults, else 4.0")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="sampler for both models, built from the pipeline's scheduler config (default: the pipeline's "
                        "own scheduler); e.g. 'ddpm' for diffusers' stochastic DDPMScheduler")
    p.add_argument("--seed", type=int, default=0, help="image i has seed + i; also the untrained baseline's initialisation")
    p.add_argument("--untrained_samples", type=positive_int, default=None,
                   help="samples of the untrained baseline (default: --num_samples); the FID ratio uses equal counts")
    p.add_argument("--batch_size", type=positive_int, default=100, help='images per pipeline call')
    p.add_argument("--out", required=True, help="folder for the samples, the exported test images and quality.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace samples in OUT made with other settings (default: refuse, naming what differs)")
    return p.parse_args(argv)


def sample(pipe, folder, args, labels, count, weights: str):
    """Images 0 .. count - 1 in ``folder`` (reusing those a run with the same fingerprint made); their paths."""
    fingerprint = {**pipeline_fingerprint(weights, pipe), "steps": args.steps, "guidance": args.guidance,
                   "batch_size": args.batch_size,
                   "seed": args.seed, "labels": f"balanced over {pipe.num_classes} classes"}
    guard_samples(folder, fingerprint, args.overwrite)
    generate_samples(pipe, folder, count, labels=labels, batch_size=args.batch_size,
                     request=SamplingRequest(steps=args.steps, guidance=args.guidance, seed=args.seed))
    return [sample_path(folder, i) for i in range(count)]


@torch.no_grad()
def class_accuracy(classifier: DomainClassifier, folder: str, labels, num_classes: int) -> dict:
    images = np.stack([np.asarray(PIL.Image.open(sample_path(folder, i)).convert("RGB")) for i in range(len(labels))])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # as output_type="pt" gives them
    predictions = torch.cat([classifier(chunk).argmax(-1) for chunk in batch.split(256)])
    truth = torch.tensor(labels)
    per_class = {c: float((predictions[truth == c] == c).float().mean()) for c in range(num_classes)}
    return {"accuracy": float((predictions == truth).float().mean()), "per_class": per_class}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from nala_diffusion import NaLaDiTPipeline
    args = parse_args(argv)
    if args.model is None:
        args.model = demo_pipeline_path()
    if args.classifier is None:
        args.classifier = demo_classifier_path()
    pipe = NaLaDiTPipeline.from_pretrained(args.model)
    try:
        set_sampler(pipe, args.scheduler)
    except ValueError as error:  # a DDPM sampler on a flow model, or the reverse
        return exit_on_input_error("nala-quality", error)
    settings = pipe.sampling_settings(args.steps, args.guidance)
    args.steps, args.guidance = settings["num_inference_steps"], settings["guidance_scale"]
    try:
        with output_lock(args.out, "the quality folder"):
            return evaluate(args, pipe, settings)
    except ValueError as error:
        return exit_on_input_error("nala-quality", error)


def evaluate(args, pipe, settings) -> int:
    from nala_diffusion import DomainClassifier, NaLaDiTPipeline, NaLaDiTTransformer2DModel
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib
    real = export_reference(args.dataset, pipe.default_sample_size, os.path.join(args.out, "real"), args.overwrite)
    labels = balanced_labels(args.num_samples, pipe.num_classes)
    untrained_count = min(args.untrained_samples or args.num_samples, args.num_samples)
    trained_files = sample(pipe, os.path.join(args.out, "trained"), args, labels, args.num_samples, args.model)
    torch.manual_seed(args.seed)  # the untrained baseline is a fixed random initialisation
    untrained = NaLaDiTPipeline(NaLaDiTTransformer2DModel.from_config(pipe.transformer.config).eval(), pipe.scheduler,
                                vae=pipe.vae, id2label=pipe.id2label, sampling_defaults=settings)
    untrained_files = sample(untrained, os.path.join(args.out, "untrained"), args, labels, untrained_count,
                             f"untrained, initialised with torch seed {args.seed}")

    classifier = DomainClassifier.from_pretrained(args.classifier).eval()
    extractor = features.classifier_extractor(args.classifier, torch.device("cpu"))
    real_feats = features.folder_features(real, extractor, "cpu", verbose=False)
    result = {"model": os.path.abspath(args.model), "num_samples": args.num_samples, "steps": args.steps,
              "guidance": args.guidance, "scheduler": type(pipe.scheduler).__name__, "classes": pipe.id2label,
              "class_accuracy": class_accuracy(classifier, os.path.join(args.out, "trained"), labels, pipe.num_classes)}
    # exactly the images of this run's counts, whatever else the folders hold
    trained_feats = features.folder_features(os.path.dirname(trained_files[0]), extractor, "cpu", verbose=False,
                                      files=trained_files)
    untrained_feats = features.folder_features(os.path.dirname(untrained_files[0]), extractor, "cpu", verbose=False,
                                        files=untrained_files)
    real_stats = metrics_lib.statistics(real_feats)
    result["fid_trained"] = metrics_lib.frechet_distance(*metrics_lib.statistics(trained_feats), *real_stats)
    result["kid_trained"] = metrics_lib.kernel_inception_distance(trained_feats, real_feats)
    # the ratio compares equal numbers of samples (FID is biased by the sample count)
    result["untrained_samples"] = untrained_count
    result["fid_trained_same_count"] = metrics_lib.frechet_distance(*metrics_lib.statistics(trained_feats[:untrained_count]), *real_stats)
    result["fid_untrained"] = metrics_lib.frechet_distance(*metrics_lib.statistics(untrained_feats), *real_stats)
    result["kid_untrained"] = metrics_lib.kernel_inception_distance(untrained_feats, real_feats)
    result["fid_ratio_trained_to_untrained"] = result["fid_trained_same_count"] / result["fid_untrained"]
    # Inception Score (the classifier's logits) and precision/recall (k = 3) against the real images
    for name, feats in (("trained", trained_feats), ("untrained", untrained_feats)):
        for key, value in metrics_lib.suite(feats, real_feats, extractor.logits).items():
            result[f"{key}_{name}"] = value
    result["num_real"] = len(real_feats)
    with open(os.path.join(args.out, "quality.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"class accuracy {result['class_accuracy']['accuracy']:.3f}; domain FID trained {result['fid_trained']:.3f}, "
          f"untrained {result['fid_untrained']:.3f} on {untrained_count} samples "
          f"(ratio at equal counts {result['fid_ratio_trained_to_untrained']:.3f})")
    for name in ("trained", "untrained"):
        cells = [f"{label} {result[f'{key}_{name}']:.3f}" for key, label in
                 (("precision", "precision"), ("recall", "recall"), ("is_mean", "IS")) if result[f"{key}_{name}"] is not None]
        print(f"{name}: " + ", ".join(cells) + f" (against {len(real_feats)} real images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
