"""nala-fid: FID, KID, Inception Score, precision/recall and sFID with clean-fid's networks, reference
statistics apart from sampling (as NVlabs/edm).

    nala-fid sample  --model DIR --num_samples 50000 --out samples_dir        # images only
    nala-fid ref     --images REAL_DIR|batch.npz --out ref.npz --metrics fid is pr   # or --name NAME (clean-fid)
    nala-fid compare DIR1 DIR2 --metrics fid kid is pr                        # two folders
    nala-fid calc    --model DIR --num_samples 50000 --out samples_dir --ref REAL_DIR|ref.npz|batch.npz|NAME

Sampling scales out with accelerate (``accelerate launch eval/fid.py sample ...``): image i has the
seed ``seed + i`` and is the same on any number of processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from accelerate import PartialState

from nala_diffusion.eval.sample_sets import generate_samples
from nala_diffusion.metrics.feature_constants import METRICS, MODES, TORCHSCRIPT_WEIGHTS
from nala_diffusion.metrics.samples import (
    LABEL_DRAWS,
    SAMPLE_DIR,
    balanced_labels,
    guard_samples,
    iter_sample_paths,
    pack_npz,
    uniform_labels,
)
from nala_diffusion.pipelines.request import SamplingRequest
from nala_diffusion.pipelines.sampler_flags import add_request_args
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error, positive_int
from nala_diffusion.utils.distributed import use_cpu_processes
from nala_diffusion.utils.files import write_json_atomically
from nala_diffusion.utils.locks import output_lock
from nala_diffusion.utils.run_guard import pipeline_fingerprint

METRIC_HELP = ("metrics to compute: fid, kid (need reference features), is (Inception Score of the samples, 10 "
               "splits), pr (precision and recall, k = 3; need reference features), sfid (Frechet distance of "
               "Inception's mixed_6/conv spatial features, --mode clean and the Inception network only: the "
               "domain classifier has no such features)")


def add_feature_args(p: argparse.ArgumentParser, metrics_default=("fid", "kid")) -> None:
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(metrics_default), help=METRIC_HELP)
    p.add_argument("--mode", choices=MODES, default="clean", help="clean-fid feature mode")
    p.add_argument("--inception_weights", default=None, help=f"local copy of {TORCHSCRIPT_WEIGHTS}")
    p.add_argument("--feature_extractor", default=None, help="DomainClassifier folder (safetensors) instead of Inception")
    p.add_argument("--feature_batch_size", type=positive_int, default=32, help='images per feature-extractor batch')


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pipeline folder")
    p.add_argument("--num_samples", type=positive_int, required=True, help='images to sample (image i has seed + i)')
    p.add_argument("--out", required=True, help="folder; images go to OUT/samples/{i:06d}.png")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="cycled; default: every class in turn")
    p.add_argument("--label_draw", choices=LABEL_DRAWS, default=None,
                   help="without --labels: 'balanced' (image i has class i mod num_classes; the default) or 'uniform' "
                        "(drawn at random per image, as DiT's sample_ddp.py; the default of --protocol dit)")
    add_request_args(p, {
        "steps": "default: the pipeline's sampling_defaults, else 50",
        "guidance": "default: the pipeline's sampling_defaults, else 4.0",
        "scheduler": "sampler (default: the pipeline's scheduler)",
        "height": "image height (default: the model's training size)",
        "width": "image width (default: the model's training size)",
        "highres_mode": "above the training size: 'direct' or 'progressive'",
        "position_embedding": "positions above the training size (default: the model's config, normally interpolate)",
        "attention_sharpness": "'auto', 'off' (default) or a factor: resolution-aware attention sharpness above the "
                               "training size",
        "memory_check": "sample even where a batch's activations are estimated not to fit in free memory",
    })
    p.add_argument("--protocol", choices=["dit"], default=None,
                   help="DiT's evaluation in one flag: 250 DDPM steps, the learned variance (where the model has "
                        "it), guidance 1.5 on the first 3 channels; conflicting flags are refused")
    p.add_argument("--batch_size", type=positive_int, default=16, help='images per pipeline call')
    p.add_argument("--npz", action="store_true", help="also pack the samples as OUT/samples.npz (ADM evaluator)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace samples in OUT made with other settings (default: refuse, naming what differs)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-fid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_sampling_args(sub.add_parser("sample", formatter_class=HelpFormatter, help="write samples only"))
    ref = sub.add_parser("ref", formatter_class=HelpFormatter, help="reference statistics of an image folder")
    ref.add_argument("--images", required=True,
                     help="folder of reference images, a guided-diffusion evaluator batch (.npz, images under arr_0), "
                          "or builtin:<name>[:<split>] (a built-in dataset, e.g. builtin:photos:test)")
    target = ref.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="stats file (.npz) to write")
    target.add_argument("--name", help="register as a clean-fid custom-stats name (Inception only)")
    ref.add_argument("--keep_features", action="store_true",
                     help="store the features too, for KID and precision/recall (as --metrics kid or pr does)")
    add_feature_args(ref, metrics_default=("fid",))
    compare = sub.add_parser("compare", formatter_class=HelpFormatter,
                             help="metrics of the first image folder against the second (the reference)")
    compare.add_argument("folders", nargs=2, help="the two image folders")
    compare.add_argument("--json", default=None, help='write the result as JSON here')
    add_feature_args(compare)
    calc = sub.add_parser("calc", formatter_class=HelpFormatter,
                          help="sample (skipping what exists), then the --metrics against --ref")
    add_sampling_args(calc)
    calc.add_argument("--ref", required=True,
                      help="image folder, stats .npz of nala-fid ref, guided-diffusion evaluator batch .npz (images "
                           "under arr_0, or its statistics: FID only), builtin:<name>[:<split>] (a built-in dataset "
                           "at the samples' size; split train by default), or clean-fid custom-stats name")
    calc.add_argument("--json", default=None, help="result file (default OUT/fid.json)")
    add_feature_args(calc)
    return parser.parse_args(argv)


def config_hash(pipe) -> str:
    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_when_set(request: SamplingRequest) -> dict:
    """The choices a sample folder's fingerprint records only where they differ from the defaults (so that
    folders sampled before they existed stay valid): the guidance schedule, as the pipelines take it, and the
    protocol."""
    return {**request.guidance_kwargs(), "protocol": request.protocol}


def sampling_request(args, pipe) -> SamplingRequest:
    """The request of ``nala-fid``'s flags for ``pipe``: ``--protocol dit`` applied, the sampler set on the
    pipeline, and the pipeline's choices filled in and checked."""
    from nala_diffusion.diffusion.objectives import objective_of
    from nala_diffusion.pipelines.schedulers import apply_request_sampler

    request = SamplingRequest.from_flags(args)
    if request.protocol == "dit":
        config = pipe.transformer.config
        if objective_of(config) != "ddpm":
            raise ValueError(f"--protocol dit is DiT's DDPM evaluation (250 DDPM steps, its learned variance); {args.model!r} "
                             f"is a {objective_of(config)!r} model. Drop --protocol and sample it with its own scheduler "
                             "(the one saved with it, or --scheduler flow_euler / flow_heun) and --steps")
        request = request.with_dit_protocol(learned_variance=pipe.transformer.out_channels == 2 * config.in_channels)
    apply_request_sampler(pipe, request)
    return request.resolved(pipe)


def request_fields(args, pipe, request: SamplingRequest, label_draw: str) -> dict:
    """What both the sample folder's fingerprint and fid.json record of a request: its size, steps, guidance,
    labels and high-resolution choices, with the pipeline's defaults filled in."""
    return {"steps": request.steps, "guidance": request.guidance, "height": request.height, "width": request.width,
            "labels": args.labels or label_draw, "highres_mode": request.highres_mode,
            "position_embedding": request.position_embedding or pipe.transformer.config.position_embedding,
            "attention_sharpness": request.attention_sharpness or "off"}


def sample_fingerprint(args, pipe, request: SamplingRequest, label_draw: str) -> dict:
    """What a sample folder's images depend on: the pipeline's weights and sampler, the request (its guidance
    schedule where it differs from the default), the seed and the batch size."""
    defaults = recorded_when_set(SamplingRequest())
    return {
        **pipeline_fingerprint(args.model, pipe), **request_fields(args, pipe, request, label_draw),
        "batch_size": args.batch_size,  # batched numerics move pixels by a level: another batch size, other images
        "labels": args.labels or f"{label_draw} over {pipe.num_classes} classes", "seed": request.seed,
        **{k: v for k, v in recorded_when_set(request).items() if v != defaults[k]},
    }


def run_sampling(args, state: PartialState) -> dict:
    from nala_diffusion.diffusion.objectives import objective_of
    from nala_diffusion.pipelines.conversion import load_pipeline
    from nala_diffusion.pipelines.pipeline_nala_dit_highres import NaLaDiTHighResPipeline
    try:
        pipe = load_pipeline(args.model, NaLaDiTHighResPipeline,
                             announce=lambda text: print(text) if state.is_main_process else None)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a pipeline from {args.model!r}: {error}") from None
    pipe.to(state.device)
    request = sampling_request(args, pipe)
    if args.labels and args.label_draw:
        raise ValueError("--labels and --label_draw exclude each other: --labels fixes every label")
    label_draw = args.label_draw or ("uniform" if request.protocol == "dit" and not args.labels else "balanced")
    labels = uniform_labels(args.num_samples, pipe.num_classes, request.seed) if label_draw == "uniform" \
        else balanced_labels(args.num_samples, pipe.num_classes, args.labels)
    fingerprint = sample_fingerprint(args, pipe, request, label_draw)
    if request.attention_sharpness == "auto":
        request = request.but(attention_sharpness=calibrate_sharpness_once(request, pipe, labels))
        fingerprint["attention_sharpness"] = request.attention_sharpness
    start = time.perf_counter()
    if request.check_memory:  # before anything is written: a size that cannot fit is refused here
        pipe.check_memory(request.height, request.width, min(args.batch_size, args.num_samples), request.guidance != 1.0)
    guard_samples(args.out, fingerprint, args.overwrite, write=state.is_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        guard_samples(args.out, fingerprint, args.overwrite, write=False)
    written = generate_samples(pipe, args.out, args.num_samples, labels=labels, request=request,
                               batch_size=args.batch_size, rank=state.process_index, world_size=state.num_processes,
                               show_progress=state.is_local_main_process)
    state.wait_for_everyone()
    if args.npz and state.is_main_process:
        pack_npz(args.out, args.num_samples, os.path.join(args.out, "samples.npz"))
    config = pipe.transformer.config
    return {
        "model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
        "model_config_hash": config_hash(pipe), "attention_type": config.attention_type,
        "attention_types": config.get("attention_types"), "scheduler": type(pipe.scheduler).__name__,
        "objective": objective_of(config), **request_fields(args, pipe, request, label_draw),
        "num_samples": args.num_samples, "seeds": [request.seed, request.seed + args.num_samples - 1],
        **request.guidance_kwargs(), "protocol": request.protocol, "written_by_process_0": written,
        "sampling_seconds": time.perf_counter() - start, "num_processes": state.num_processes,
    }


def calibrate_sharpness_once(request: SamplingRequest, pipe, labels) -> dict:
    """``--attention_sharpness auto`` for a whole sample set: the pipeline would calibrate on each batch's
    own labels, and one FID set would mix factors; the factors are calibrated once, on the run's first
    two labels, then every batch uses (and the fingerprint and fid.json record) them."""
    import torch

    if request.highres_mode != "direct":
        raise ValueError("--attention_sharpness auto with --highres_mode progressive would calibrate every batch's "
                         "stages on its own labels; use --highres_mode direct, or a fixed factor")
    ids = torch.tensor(labels[:2], device=pipe._execution_device)
    from nala_diffusion.models.sharpness import set_attention_sharpness

    try:
        report = pipe.set_resolution_sharpness("auto", request.height, request.width, ids, request.steps,
                                               request.position_embedding)
    finally:
        set_attention_sharpness(pipe.transformer, 1.0)  # each batch sets the factors itself
    return {name: float(layer["sharpness"]) for name, layer in report["layers"].items()}


def reference(source: str, args, extractor, device, spatial: bool):
    """The :class:`~nala_diffusion.metrics.features.Reference` of ``source``: an image folder, a ``.npz``
    (our stats file or the guided-diffusion evaluator's batch), or a clean-fid custom-stats name."""
    from nala_diffusion.metrics import features
    if source.startswith(features.BUILTIN_PREFIX):  # the dataset's images at the samples' size, in memory
        images = features.builtin_reference_images(source, getattr(args, "ref_resolution", None))
        feats = features.array_features(images, extractor, device, args.feature_batch_size, spatial=spatial,
                                        description=f"features {source}")
        return features.Reference.from_features(*(feats if spatial else (feats,)), kind="built-in dataset")
    if os.path.isdir(source):
        feats = features.folder_features(source, extractor, device, args.feature_batch_size, spatial=spatial)
        return features.Reference.from_features(*(feats if spatial else (feats,)))
    if os.path.isfile(source):
        return features.load_reference(source, extractor, device, args.feature_batch_size, spatial=spatial)
    if args.feature_extractor:
        raise ValueError(f"--ref {source!r} is neither a folder nor a stats file (custom-stats names are Inception only)")
    from cleanfid.features import get_reference_statistics

    try:
        mu, sigma = get_reference_statistics(source, None, mode=args.mode, split="custom")
    except Exception as error:
        raise ValueError(f"--ref {source!r} is not a folder, a stats file or a clean-fid custom-stats name: {error}") from None
    return features.Reference(mu, sigma, kind="clean-fid custom statistics")


def chosen_metrics(feats, ref, extractor, chosen, spatial=None) -> dict:
    """The ``chosen`` metrics of sample features ``feats`` (and ``spatial`` for sFID) against ``ref``,
    each with the number of images behind it."""
    from nala_diffusion.metrics import scores as metrics_lib
    result = {"metrics": list(chosen), "num_samples": len(feats), "num_reference": ref.num_images,
              "reference_kind": ref.kind}
    if "fid" in chosen or "sfid" in chosen:
        if extractor.feature_dim and len(feats) < extractor.feature_dim:
            warnings.warn(f"{len(feats)} samples is fewer than the feature dimension {extractor.feature_dim}: "
                          "the covariance is singular and FID is biased upwards", stacklevel=2)
    if "fid" in chosen:
        result["fid"] = metrics_lib.frechet_distance(*metrics_lib.statistics(feats), ref.mu, ref.sigma)
    if "kid" in chosen:
        result["kid"] = metrics_lib.kernel_inception_distance(feats, ref.features)
    if "is" in chosen:
        result["is_mean"], result["is_std"] = metrics_lib.inception_score(extractor.logits(feats))
        result["is_num_samples"], result["is_splits"] = len(feats), metrics_lib.IS_SPLITS
    if "pr" in chosen:
        result["precision"], result["recall"] = metrics_lib.precision_recall(feats, ref.features)
        result["pr_neighbours"] = metrics_lib.PR_NEIGHBOURS
    if "sfid" in chosen:
        result["sfid"] = metrics_lib.frechet_distance(*metrics_lib.statistics(spatial), ref.mu_s, ref.sigma_s)
    return result


def check_out_outside_ref(out: str, ref: str) -> None:
    """Refuse an ``--out`` inside the ``--ref`` folder: its samples would join the reference images."""
    if os.path.isdir(ref):
        out_path, ref_path = os.path.realpath(out), os.path.realpath(ref)
        if os.path.commonpath([out_path, ref_path]) == ref_path:
            raise ValueError(f"--out {out!r} lies inside the --ref folder {ref!r}, so the samples would be counted as "
                             "reference images; choose an --out outside it (nothing was sampled)")


def check_reference(chosen, source: str, extractor, num_samples: int):
    """Refuse, before any sampling or feature extraction, a reference that cannot give the chosen metrics
    and counts too small for them; returns the file's signature, which the load compares."""
    from nala_diffusion.metrics import features
    kind, allows, count = features.peek_reference(source, extractor)
    features.check_reference_metrics(chosen, allows, source, kind)
    check_counts(chosen, num_samples, count)
    return features.reference_signature(source)


def check_counts(chosen, num_samples: int, num_reference: Optional[int]) -> None:
    """Refuse counts too small for the chosen metrics."""
    from nala_diffusion.metrics import scores as metrics_lib
    needs = {"fid": 2, "sfid": 2, "kid": 2, "is": metrics_lib.IS_MIN_SAMPLES, "pr": metrics_lib.PR_NEIGHBOURS + 1}
    for metric in chosen:
        if num_samples < needs[metric]:
            raise ValueError(f"--metrics {metric} needs at least {needs[metric]} samples, got {num_samples}")
        if num_reference is not None and metric in ("fid", "sfid", "kid", "pr") and num_reference < needs[metric]:
            raise ValueError(f"--metrics {metric} needs at least {needs[metric]} reference images, the reference "
                             f"holds {num_reference}")


def summary(result: dict) -> str:
    """One line with every metric of ``result``, as the JSON holds it."""
    cells = []
    for key, label, digits in (("fid", "FID", 4), ("kid", "KID", 6), ("sfid", "sFID", 4), ("precision", "precision", 4),
                               ("recall", "recall", 4)):
        if key in result:
            cells.append(f"{label} {result[key]:.{digits}f}")
    if "is_mean" in result:
        cells.append(f"IS {result['is_mean']:.4f} ± {result['is_std']:.4f}")
    reference = f", {result['num_reference']} reference" if result.get("num_reference") else ""
    line = (f"{'  '.join(cells)}  ({result.get('num_samples', '?')} samples{reference}, "
            f"{result['feature_extractor']['name']})")
    if result.get("kid", 0) < 0:  # the unbiased estimate's noise around 0
        line += "\n(KID is an unbiased estimate, negative when the two sets cannot be told apart at this size: read it as 0)"
    return line


def main(args) -> int:
    from accelerate import PartialState
    state = PartialState(cpu=use_cpu_processes())
    if args.command not in ("sample", "calc"):
        return run(args, state)
    # one lock over the whole command: sampling, features and fid.json
    with output_lock(args.out, "the samples folder", hold=state.is_main_process):
        return run(args, state)


def run(args, state) -> int:
    from nala_diffusion.metrics import features
    device = state.device
    if args.command == "sample":
        info = run_sampling(args, state)
        if state.is_main_process:
            print(f"wrote {args.num_samples} samples to {os.path.join(args.out, SAMPLE_DIR)} "
                  f"in {info['sampling_seconds']:.1f} s")
        return 0
    chosen = list(dict.fromkeys(args.metrics))
    spatial = "sfid" in chosen
    if args.command in ("compare", "calc") and not args.feature_extractor:
        recorded = features.recorded_classifier(args.folders[1] if args.command == "compare" else args.ref)
        if recorded:
            print(f"--ref was made with the domain classifier {recorded}; using it (--feature_extractor)")
            args.feature_extractor = recorded
    extractor = features.build_extractor(args.mode, device, args.inception_weights, args.feature_extractor)
    extractor.check_metrics(chosen)
    start = time.perf_counter()
    if args.command == "ref":
        keep = args.keep_features or bool({"kid", "pr"} & set(chosen))
        if args.name:
            from cleanfid import fid as cleanfid_fid

            if args.feature_extractor or set(chosen) - {"fid", "is"}:
                raise ValueError("--name registers clean-fid custom stats, which hold Inception mu/sigma only "
                                 "(FID); use --out for other metrics or the domain classifier")
            cleanfid_fid.make_custom_stats(args.name, args.images, mode=args.mode, device=device, num_workers=0)
            print(f"registered clean-fid custom statistics {args.name!r}")
            return 0
        ref = reference(args.images, args, extractor, device, spatial)
        if ref.features is None and keep:
            raise ValueError(f"{args.images!r} holds statistics only; features need the images")
        features.save_stats(args.out, ref, extractor, keep)
        print(f"wrote {args.out} ({ref.num_images} images, {extractor.name}, mode {extractor.mode}; allows "
              f"--metrics {' '.join(m for m in ref.allows() if keep or m not in ('kid', 'pr'))})")
        return 0
    if args.command == "compare":
        if not os.path.isdir(args.folders[0]) or not features.image_files(args.folders[0]):
            raise ValueError(f"image folder {args.folders[0]!r} does not exist or holds no images")
        check_reference(chosen, args.folders[1], extractor, len(features.image_files(args.folders[0])))
        ref = reference(args.folders[1], args, extractor, device, spatial)
        feats = features.folder_features(args.folders[0], extractor, device, args.feature_batch_size, spatial=spatial)
        feats, spatial_feats = feats if spatial else (feats, None)
        result = {**chosen_metrics(feats, ref, extractor, chosen, spatial_feats), "folders": args.folders}
    else:  # calc: the reference and the counts are checked before sampling (extractor built above)
        check_out_outside_ref(args.out, args.ref)
        signature = check_reference(chosen, args.ref, extractor, args.num_samples)
        info = run_sampling(args, state)
        if not state.is_main_process:
            return 0
        # exactly images 0 .. num_samples - 1, whatever else the folder holds
        feats = features.folder_features(os.path.join(args.out, SAMPLE_DIR), extractor, device, args.feature_batch_size,
                                  files=list(iter_sample_paths(args.out, args.num_samples)), spatial=spatial)
        feats, spatial_feats = feats if spatial else (feats, None)
        args.ref_resolution = info["height"] if info["height"] == info["width"] else None
        if features.reference_signature(args.ref) != signature:  # rewritten (nala-fid ref) while sampling
            raise ValueError(f"--ref {args.ref!r} changed while the samples were made; run calc again (the samples "
                             "are kept and reused), so that the reference is checked and read as one file")
        check_reference(chosen, args.ref, extractor, args.num_samples)
        ref = reference(args.ref, args, extractor, device, spatial)
        result = {**chosen_metrics(feats, ref, extractor, chosen, spatial_feats), **info, "reference": args.ref}
    result["feature_extractor"] = extractor.describe()
    result["feature_seconds"] = time.perf_counter() - start
    print(summary(result))
    json_path = args.json or (os.path.join(args.out, "fid.json") if args.command == "calc" else None)
    if json_path:
        write_json_atomically(json_path, result, sort_keys=False)
        print(f"wrote {json_path}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    from nala_diffusion.metrics import features
    args = parse_args(argv)
    try:
        return main(args)
    except features.MissingWeightsError as error:
        print(f"nala-fid: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        return exit_on_input_error("nala-fid", error)


if __name__ == "__main__":
    sys.exit(cli())
