"""nala-sample: write a PNG grid of class-conditional samples from a pipeline folder.

    nala-sample --model DIR --labels 0 1 cat --steps 50 --guidance 4 --out grid.png
    nala-sample --model DIR --height 512 --width 512 --highres-mode progressive --out big.png

Image i of the grid uses its own generator seeded ``seed + i``, so an image does not depend on
the batch it was drawn in.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence

import torch

from nala_diffusion.pipelines.request import SamplingRequest
from nala_diffusion.pipelines.sampler_flags import add_request_args, parse_label, parse_sharpness  # noqa: F401 (public)
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error, positive_int
from nala_diffusion.utils.files import save_grid_atomically

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="pipeline folder (save_pretrained output, a nala-train run) or Hub id; a diffusers DiT pipeline "
                             "(facebook/DiT-XL-2-256) runs unchanged (default: the shipped demo pipeline)")
    parser.add_argument("--labels", nargs="+", type=parse_label, default=None,
                        help="class ids or names (default: every class of a model of up to 16 classes; else 8: DiT's "
                             "sample.py classes 207 360 387 974 88 979 417 279 for 1,000-class models, else 8 spread "
                             "over the ids)")
    parser.add_argument("--images_per_label", "--images-per-label", type=positive_int, default=1, help='images drawn for each label')
    add_request_args(parser)
    parser.add_argument("--strength", type=float, default=0.6, help="progressive mode: re-noise level per stage")
    parser.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: per label)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help='weights and compute dtype of the pipeline')
    parser.add_argument("--fused_attention", "--fused-attention", action="store_true",
                        help="NaLa layers run the torch.compile-fused kernel (compiles on first use; pays off at many tokens)")
    parser.add_argument("--out", default="grid.png", help="PNG file to write")
    return parser.parse_args(argv)


#: the classes sampled without --labels where a model has more than MAX_DEFAULT_LABELS: DiT's sample.py's eight
#: ImageNet classes for 1,000-class models, else eight spread evenly over the ids
DIT_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
MAX_DEFAULT_LABELS = 16


def default_labels(num_classes: int) -> List[int]:
    """Every class of a model of at most MAX_DEFAULT_LABELS classes, else eight (DIT_SAMPLE_CLASSES for 1,000)."""
    if num_classes <= MAX_DEFAULT_LABELS:
        return list(range(num_classes))
    if num_classes == 1000:
        return list(DIT_SAMPLE_CLASSES)
    return sorted({round(i * (num_classes - 1) / 7) for i in range(8)})


def check_args(args) -> Optional[str]:
    """What is wrong with the arguments before anything loads, or None."""
    if os.path.isdir(args.out) or args.out.endswith(os.sep):
        return f"--out {args.out!r} is a folder; give the PNG file to write, e.g. {os.path.join(args.out, 'grid.png')}"
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as error:
        return f"--device {args.device!r}: {error}"
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device}: this machine has no CUDA device; use --device cpu"
    looks_local = args.model is not None and (os.path.isabs(args.model) or args.model.startswith(".")
                                              or args.model.count("/") != 1)
    if looks_local and not os.path.isdir(args.model):
        return f"--model {args.model!r}: no such folder (give a pipeline folder written by save_pretrained, or a Hub id)"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"nala-sample: error: {problem}", file=sys.stderr)
        return 2
    try:
        request = SamplingRequest.from_flags(args)
    except ValueError as error:
        return exit_on_input_error("nala-sample", error)
    from nala_diffusion.models.swap import set_fused_attention
    from nala_diffusion.pipelines.conversion import load_pipeline
    from nala_diffusion.pipelines.pipeline_nala_dit_highres import NaLaDiTHighResPipeline
    from nala_diffusion.pipelines.schedulers import apply_request_sampler

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model is None:
        from nala_diffusion.assets import demo_pipeline_path

        args.model = demo_pipeline_path()
    try:
        pipe = load_pipeline(args.model, NaLaDiTHighResPipeline, dtype=DTYPES[request.dtype])
    except (OSError, ValueError) as error:
        print(f"nala-sample: cannot load a pipeline from {args.model!r}: {error}", file=sys.stderr)
        return 2
    pipe.to(device)
    if args.fused_attention:
        set_fused_attention(pipe.transformer)
    try:
        apply_request_sampler(pipe, request)
        if request.labels is None:
            request = request.but(labels=default_labels(pipe.num_classes))
            if len(request.labels) < pipe.num_classes:
                print(f"--labels not given: sampling {len(request.labels)} of the model's {pipe.num_classes} classes "
                      f"(ids {' '.join(map(str, request.labels))}); pass --labels for others")
        request = request.resolved(pipe)
        count = len(request.labels) * request.images_per_label
        generators = [torch.Generator(device).manual_seed(request.seed + i) for i in range(count)]
        output = pipe(list(request.labels), generator=generators, output_type="pt", **request.pipeline_kwargs())
    except ValueError as error:
        return exit_on_input_error("nala-sample", error)
    nrow = args.nrow or (request.images_per_label if request.images_per_label > 1 else min(len(request.labels), 8))
    save_grid_atomically(output.images.float().cpu(), args.out, nrow)
    report_stages(output.stages)
    print(f"wrote {args.out} ({count} images of {request.height}x{request.width}, {request.steps} steps, "
          f"guidance {request.guidance})")
    return 0


def report_stages(stages) -> None:
    """One line per stage: size, steps (and model evaluations where they differ), seconds, sharpness."""
    for stage in stages:
        evaluations = stage.get("model_evaluations", stage["steps"])
        calls = f" ({evaluations} model evaluations)" if evaluations != stage["steps"] else ""
        print(f"stage {stage['height']}x{stage['width']}: {stage['steps']} steps{calls}, {stage['seconds']:.2f} s")
        report = stage.get("attention_report")
        if report and report.get("layers"):
            values = ", ".join(f"{v['sharpness']:.3g}" for v in report["layers"].values())
            print(f"  attention sharpness per layer (grid {report['grid']}, training grid {report['training_grid']}): {values}")


if __name__ == "__main__":
    sys.exit(main())
