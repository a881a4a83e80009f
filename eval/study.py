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
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from nala_diffusion.assets import demo_classifier_path
from nala_diffusion.eval import retrieval
from nala_diffusion.eval.studies.common import ARCHITECTURE, STUDY_OUTPUTS, TRAINING, train
from nala_diffusion.eval.studies.highres import highres_study
from nala_diffusion.eval.studies.norm import norm_study
from nala_diffusion.eval.studies.objective import OBJECTIVE_TRAINING, objective_study
from nala_diffusion.eval.studies.quality import quality_study, score
from nala_diffusion.eval.studies.retrieval import (
    RETRIEVAL_ARCHITECTURE,
    RETRIEVAL_DEFAULT_KINDS,
    RETRIEVAL_TRAINING,
    RETRIEVAL_VARIANTS,
    run_retrieval_study,
)
from nala_diffusion.metrics.samples import export_reference
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error
from nala_diffusion.utils.locks import output_lock
from nala_diffusion.utils.run_guard import check_fingerprint, code_version

STUDIES = {"quality": quality_study, "norm": norm_study, "highres": highres_study, "retrieval": run_retrieval_study,
           "objective": objective_study}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help='study folder: runs, samples, results.json/csv and plots')
    p.add_argument("--study", choices=list(STUDIES), default="quality",
                   help="'quality': the five attentions, conversion, high resolution, entropy; 'norm': NaLa's query-norm "
                        "scale (sigma = 1, calibrated, learnable) against softmax and ReLU linear, with per-layer "
                        "norm-awareness measures; 'highres': trained pipelines (--highres_models) at 1x, 2x and 4x the "
                        "training side, direct and progressive, attention sharpness off and auto; 'retrieval': the "
                        "retrieval-denoising task builtin:pairs (patch 4, 64 tokens, unless --model_config), retrieval gain and mass of "
                        "softmax, ReLU and 1+ELU linear, NaLa sigma = 1 and NaLa calibrated; 'objective': DDPM against "
                        "flow matching (uniform, logit-normal) on the demo's model, each with its own sampler at 10, "
                        "25 and 50 steps")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every scratch run (default: 500; --study retrieval: 10000; --study "
                        "objective: 2000, the quickstart's)")
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
                   help="--study retrieval and objective: train nothing; build the tables (and plot) from the runs "
                        "already finished in OUT and name the ones still to train")
    p.add_argument("--timestep_range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="training timesteps LOW <= t < HIGH (default: all; --study retrieval: 0 500, the half in "
                        "which a partner token can be recognised)")
    p.add_argument("--retrieval_timesteps", type=int, nargs="+", default=None, metavar="T",
                   help="--study retrieval: timesteps of the retrieval gain and mass (default: "
                        + " ".join(map(str, retrieval.TIMESTEPS)) + ")")
    p.add_argument("--pairs_layout", choices=sorted(retrieval.DATASETS), default="tiles",
                   help="--study retrieval: the task, 'tiles' (builtin:pairs, tile mosaics) or 'crops' "
                        "(builtin:pairs_crops, one photograph crop per half)")
    p.add_argument("--track_every", type=int, default=0, metavar="STEPS",
                   help="--study retrieval: train every scratch kind in chunks of STEPS steps (resumed exactly) and measure "
                        "its partner mass after each chunk (default 0: only at the end; kinds that track already keep "
                        "their own interval)")
    p.add_argument("--cost_tokens", type=int, default=None, metavar="TOKENS",
                   help="--study retrieval: the token count of the forward-cost timing (default 16384)")
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
    defaults = {"retrieval": RETRIEVAL_TRAINING, "objective": OBJECTIVE_TRAINING}.get(args.study, TRAINING)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


@dataclass
class ScoringContext:
    """The held-out reference every scored study measures samples against (built once per study)."""

    args: Any
    test: Any
    classifier: Any
    extractor: Any
    real_feats: Any
    real_stats: Any

    def run_and_score(self, name: str, settings, steps: int, seed: int) -> dict:
        """Train OUT/runs/NAME with these RunConfig settings (resumed, cached) and score it (cached)."""
        info = train(self.args.out, name, settings, steps, seed, self.args)
        return {**info, **score(info["folder"], self.args.out, self.args, self.real_feats, self.real_stats,
                                self.extractor, self.classifier, self.test)}


def scoring_context(args) -> ScoringContext:
    from nala_diffusion import DomainClassifier
    from nala_diffusion.data.datasets import load_dataset
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib
    classifier_path = args.classifier or demo_classifier_path()
    real = export_reference("builtin:photos", 32, os.path.join(args.out, "real"), args.overwrite)
    extractor = features.classifier_extractor(classifier_path, torch.device("cpu"))
    real_feats = features.folder_features(real, extractor, "cpu", verbose=False)
    return ScoringContext(args, load_dataset("builtin:photos", 32, split="test"),
                          DomainClassifier.from_pretrained(classifier_path).eval(), extractor, real_feats,
                          metrics_lib.statistics(real_feats))


def run_study(args, argv) -> int:
    study: Callable[..., int] = STUDIES[args.study]
    without_scoring = args.study == "retrieval" or (args.study == "objective" and args.report_only)
    return study(args, argv, None if without_scoring else scoring_context(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.architecture = dict(RETRIEVAL_ARCHITECTURE if args.study == "retrieval" else ARCHITECTURE)
    if args.model_config:
        with open(args.model_config, encoding="utf-8") as handle:
            args.architecture = json.load(handle)
    # which kinds (and, in the retrieval study, which seeds) run is not part of the fingerprint: every
    # run has its own folder named by kind and seed, so a study can be extended by more of them; nor is
    # where --model_config was read from: its content is, as "architecture"
    selection = {"retrieval": ("kinds", "seeds", "tiebreak_seed", "report_only"),
                 "objective": ("seeds", "report_only")}.get(args.study, ("kinds",))
    # --track_every only adds measurements (the chunks resume exactly) and --cost_tokens names its own timing file
    unrecorded = ("out", "overwrite", "model_config", "track_every", "cost_tokens", *selection)
    fingerprint = {**{k: v for k, v in vars(args).items() if k not in unrecorded},
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


if __name__ == "__main__":
    sys.exit(main())
