"""nala-fid: FID and KID with clean-fid, reference statistics apart from sampling (as NVlabs/edm).

    nala-fid sample  --model DIR --num_samples 50000 --out samples_dir        # images only
    nala-fid ref     --images REAL_DIR --out ref.npz                          # or --name NAME (clean-fid custom stats)
    nala-fid compare DIR1 DIR2                                                # FID and KID of two folders
    nala-fid calc    --model DIR --num_samples 50000 --out samples_dir --ref REAL_DIR|ref.npz|NAME

Sampling scales out with accelerate (``accelerate launch eval/fid.py sample ...``): image i has the
seed ``seed + i`` and is the same on any number of processes.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import torch
from nala_diffusion.lazy import lazy
PartialState = lazy("accelerate", "PartialState")

from nala_diffusion.cli_args import HelpFormatter, positive_int
from nala_diffusion.eval.feature_constants import MODES, TORCHSCRIPT_WEIGHTS
from nala_diffusion.distributed import use_cpu_processes
F = lazy("nala_diffusion.eval.features")
from nala_diffusion.eval.sampling import SAMPLE_DIR, balanced_labels, generate_samples, guard_samples, iter_sample_paths, pack_npz
from nala_diffusion.run_guard import OutputLock, pipeline_fingerprint
NaLaDiTHighResPipeline = lazy("nala_diffusion.pipelines.pipeline_nala_dit_highres", "NaLaDiTHighResPipeline")
from nala_diffusion.pipelines.sample import parse_sharpness
from nala_diffusion.pipelines.schedulers import HIGHRES_MODES, SCHEDULERS, scheduler_from_name


def add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="clean", help="clean-fid feature mode")
    p.add_argument("--inception_weights", default=None, help=f"local copy of {TORCHSCRIPT_WEIGHTS}")
    p.add_argument("--feature_extractor", default=None, help="DomainClassifier folder (safetensors) instead of Inception")
    p.add_argument("--feature_batch_size", type=positive_int, default=32, help='images per feature-extractor batch')


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pipeline folder")
    p.add_argument("--num_samples", type=positive_int, required=True, help='images to sample (image i has seed + i)')
    p.add_argument("--out", required=True, help="folder; images go to OUT/samples/{i:06d}.png")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=positive_int, default=None, help="default: the pipeline's sampling_defaults, else 50")
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's sampling_defaults, else 4.0")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the pipeline's scheduler)")
    p.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's training size)")
    p.add_argument("--width", type=positive_int, default=None, help="image width (default: the model's training size)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="cycled; default: every class in turn")
    p.add_argument("--highres_mode", choices=HIGHRES_MODES, default="direct", help="above the training size: 'direct' or 'progressive'")
    p.add_argument("--position_embedding", choices=["interpolate", "extend"], default=None,
                   help="positions above the training size (default: the model's config, normally interpolate)")
    p.add_argument("--attention_sharpness", type=parse_sharpness, default=None,
                   help="'auto', 'off' (default) or a factor: resolution-aware attention sharpness above the training size")
    p.add_argument("--batch_size", type=positive_int, default=16, help='images per pipeline call')
    p.add_argument("--npz", action="store_true", help="also pack the samples as OUT/samples.npz (ADM evaluator)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace samples in OUT made with other settings (default: refuse, naming what differs)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-fid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_sampling_args(sub.add_parser("sample", formatter_class=HelpFormatter, help="write samples only"))
    ref = sub.add_parser("ref", formatter_class=HelpFormatter, help="reference statistics of an image folder")
    ref.add_argument("--images", required=True, help='folder of reference images')
    target = ref.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="stats file (.npz) to write")
    target.add_argument("--name", help="register as a clean-fid custom-stats name (Inception only)")
    ref.add_argument("--keep_features", action="store_true", help="store the features too, for KID")
    add_feature_args(ref)
    compare = sub.add_parser("compare", formatter_class=HelpFormatter, help="FID and KID between two image folders")
    compare.add_argument("folders", nargs=2, help="the two image folders")
    compare.add_argument("--json", default=None, help='write the result as JSON here')
    add_feature_args(compare)
    calc = sub.add_parser("calc", formatter_class=HelpFormatter, help="sample (skipping what exists), then FID and KID against --ref")
    add_sampling_args(calc)
    calc.add_argument("--ref", required=True, help="image folder, stats .npz, or clean-fid custom-stats name")
    calc.add_argument("--json", default=None, help="result file (default OUT/fid.json)")
    add_feature_args(calc)
    return parser.parse_args(argv)


def config_hash(pipe) -> str:
    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_sampling(args, state: PartialState) -> dict:
    try:
        pipe = NaLaDiTHighResPipeline.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a pipeline from {args.model!r}: {error}") from None
    pipe.to(state.device)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    labels = balanced_labels(args.num_samples, pipe.num_classes, args.labels)
    settings = pipe.sampling_settings(args.steps, args.guidance)
    args.steps, args.guidance = settings["num_inference_steps"], settings["guidance_scale"]
    fingerprint = {
        **pipeline_fingerprint(args.model, pipe), "steps": args.steps, "guidance": args.guidance,
        "height": args.height or pipe.default_sample_size, "width": args.width or pipe.default_sample_size,
        "labels": args.labels or f"balanced over {pipe.num_classes} classes", "seed": args.seed,
        "highres_mode": args.highres_mode,
        "position_embedding": args.position_embedding or pipe.transformer.config.position_embedding,
        "attention_sharpness": args.attention_sharpness or "off",
    }
    start = time.perf_counter()
    lock = OutputLock(args.out, "the samples folder")
    if state.is_main_process:
        lock.acquire()
    try:
        guard_samples(args.out, fingerprint, args.overwrite, write=state.is_main_process)
        state.wait_for_everyone()
        if not state.is_main_process:
            guard_samples(args.out, fingerprint, args.overwrite, write=False)
        written = generate_samples(
            pipe, args.out, args.num_samples, labels=labels, seed=args.seed, batch_size=args.batch_size,
            rank=state.process_index, world_size=state.num_processes, height=args.height, width=args.width,
            show_progress=state.is_local_main_process, num_inference_steps=args.steps, guidance_scale=args.guidance,
            highres_mode=args.highres_mode, position_embedding=args.position_embedding,
            attention_sharpness=args.attention_sharpness,
        )
        state.wait_for_everyone()
    finally:
        lock.release()
    if args.npz and state.is_main_process:
        pack_npz(args.out, args.num_samples, os.path.join(args.out, "samples.npz"))
    return {
        "model": os.path.abspath(args.model), "model_config_hash": config_hash(pipe),
        "attention_type": pipe.transformer.config.attention_type,
        "attention_types": pipe.transformer.config.get("attention_types"), "scheduler": type(pipe.scheduler).__name__,
        "steps": args.steps, "guidance": args.guidance, "num_samples": args.num_samples,
        "seeds": [args.seed, args.seed + args.num_samples - 1], "labels": args.labels or "balanced",
        "height": args.height or pipe.default_sample_size, "width": args.width or pipe.default_sample_size,
        "highres_mode": args.highres_mode, "position_embedding": args.position_embedding or
        pipe.transformer.config.position_embedding, "attention_sharpness": args.attention_sharpness or "off",
        "written_by_process_0": written,
        "sampling_seconds": time.perf_counter() - start, "num_processes": state.num_processes,
    }


def reference(args, extractor, device):
    """(mu, sigma, features or None) of --ref: a folder, a stats file, or a clean-fid custom-stats name."""
    if os.path.isdir(args.ref):
        feats = F.folder_features(args.ref, extractor, device, args.feature_batch_size)
        return (*F.statistics(feats), feats)
    if os.path.isfile(args.ref):
        return F.load_stats(args.ref, extractor)
    if args.feature_extractor:
        raise ValueError(f"--ref {args.ref!r} is neither a folder nor a stats file (custom-stats names are Inception only)")
    from cleanfid.features import get_reference_statistics

    try:
        mu, sigma = get_reference_statistics(args.ref, None, mode=args.mode, split="custom")
    except Exception as error:
        raise ValueError(f"--ref {args.ref!r} is not a folder, a stats file or a clean-fid custom-stats name: {error}") from None
    return mu, sigma, None


def metrics(feats, mu_ref, sigma_ref, feats_ref, extractor) -> dict:
    if extractor.feature_dim and len(feats) < extractor.feature_dim:
        warnings.warn(f"{len(feats)} samples is fewer than the feature dimension {extractor.feature_dim}: "
                      "the covariance is singular and FID is biased upwards", stacklevel=2)
    mu, sigma = F.statistics(feats)
    kid = F.kernel_inception_distance(feats, feats_ref) if feats_ref is not None else None
    return {"fid": F.frechet_distance(mu, sigma, mu_ref, sigma_ref), "kid": kid}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=str)
    os.replace(temporary, path)


def summary(result: dict) -> str:
    kid = "n/a" if result.get("kid") is None else f"{result['kid']:.6f}"
    return f"FID {result['fid']:.4f}  KID {kid}  ({result.get('num_samples', '?')} samples, {result['feature_extractor']['name']})"


def main(args) -> int:
    state = PartialState(cpu=use_cpu_processes())
    device = state.device
    if args.command == "sample":
        info = run_sampling(args, state)
        if state.is_main_process:
            print(f"wrote {args.num_samples} samples to {os.path.join(args.out, SAMPLE_DIR)} "
                  f"in {info['sampling_seconds']:.1f} s")
        return 0
    if args.command in ("calc",):
        info = run_sampling(args, state)
        if not state.is_main_process:
            return 0
    extractor = F.build_extractor(args.mode, device, args.inception_weights, args.feature_extractor)
    start = time.perf_counter()
    if args.command == "ref":
        feats = F.folder_features(args.images, extractor, device, args.feature_batch_size)
        if args.name:
            from cleanfid import fid as cleanfid_fid

            if args.feature_extractor:
                raise ValueError("--name registers clean-fid custom stats, which are Inception only; use --out")
            cleanfid_fid.make_custom_stats(args.name, args.images, mode=args.mode, device=device, num_workers=0)
            print(f"registered clean-fid custom statistics {args.name!r} ({len(feats)} images)")
        else:
            F.save_stats(args.out, feats, extractor, args.keep_features)
            print(f"wrote {args.out} ({len(feats)} images, {extractor.name}, mode {extractor.mode})")
        return 0
    if args.command == "compare":
        first, second = (F.folder_features(f, extractor, device, args.feature_batch_size) for f in args.folders)
        result = {**metrics(first, *F.statistics(second), second, extractor), "folders": args.folders,
                  "num_samples": len(first), "num_reference": len(second)}
    else:  # calc
        # exactly images 0 .. num_samples - 1, whatever else the folder holds
        feats = F.folder_features(os.path.join(args.out, SAMPLE_DIR), extractor, device, args.feature_batch_size,
                                  files=list(iter_sample_paths(args.out, args.num_samples)))
        mu_ref, sigma_ref, feats_ref = reference(args, extractor, device)
        result = {**metrics(feats, mu_ref, sigma_ref, feats_ref, extractor), **info, "reference": args.ref}
    result["feature_extractor"] = extractor.describe()
    result["feature_seconds"] = time.perf_counter() - start
    print(summary(result))
    json_path = args.json or (os.path.join(args.out, "fid.json") if args.command == "calc" else None)
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return main(args)
    except (ValueError, F.MissingWeightsError) as error:
        print(f"nala-fid: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
