"""nala-sample: write a PNG grid of class-conditional samples from a pipeline folder.

    nala-sample --model DIR --labels 0 1 cat --steps 50 --guidance 4 --out grid.png
    nala-sample --model DIR --height 512 --width 512 --highres-mode progressive --out big.png

Image i of the grid uses its own generator seeded ``seed + i``, so an image does not depend on
the batch it was drawn in.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence, Union

import torch

from nala_diffusion.pipelines.sampler_flags import (
    HIGHRES_MODES,
    SCHEDULERS,
    add_guidance_args,
    guidance_kwargs,
    set_sampler,
)
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error, positive_int
from nala_diffusion.utils.files import save_grid_atomically

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_label(text: str) -> Union[int, str]:
    return int(text) if text.lstrip("-").isdigit() else text


def parse_sharpness(text: str) -> Union[str, float]:
    if text in ("off", "auto"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'off', 'auto' or a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


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
    parser.add_argument("--height", type=positive_int, default=None, help="pixels (default: the training size)")
    parser.add_argument("--width", type=positive_int, default=None, help="pixels (default: the training size)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps (default: the pipeline's sampling_defaults, else 50)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, 1 = off (default: the pipeline's sampling_defaults, else 4.0)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="sampler (default: the one saved with the pipeline); flow_euler and flow_heun for flow-matching "
                             "models (--objective flow, SiT), the others for DDPM models")
    parser.add_argument("--highres_mode", "--highres-mode", choices=HIGHRES_MODES, default="direct", help="above the training size: 'direct' (one pass) or 'progressive' (sample at the training size, then refine upsampled stages)")
    parser.add_argument("--strength", type=float, default=0.6, help="progressive mode: re-noise level per stage")
    parser.add_argument("--position_embedding", "--position-embedding", choices=["extend", "interpolate"], default=None,
                        help="positions above the training size: 'interpolate' into the training range, or 'extend' "
                             "beyond it (models trained at several sizes); default: the model's config")
    parser.add_argument("--attention_sharpness", "--attention-sharpness", type=parse_sharpness, default=None,
                        help="'auto': keep each layer's attention entropy at its training level above the training size "
                             "(softmax: logits x sqrt(log N / log n); NaLa: power calibrated on the model); 'off' (default), "
                             "or a factor for every layer")
    add_guidance_args(parser)
    parser.add_argument("--no_memory_check", "--no-memory-check", dest="memory_check", action="store_false",
                        help="sample even where the activations are estimated not to fit in free memory")
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
    from nala_diffusion.models.swap import set_fused_attention
    from nala_diffusion.pipelines.conversion import load_pipeline
    from nala_diffusion.pipelines.pipeline_nala_dit_highres import NaLaDiTHighResPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model is None:
        from nala_diffusion.assets import demo_pipeline_path

        args.model = demo_pipeline_path()
    try:
        pipe = load_pipeline(args.model, NaLaDiTHighResPipeline, dtype=DTYPES[args.dtype])
    except (OSError, ValueError) as error:
        print(f"nala-sample: cannot load a pipeline from {args.model!r}: {error}", file=sys.stderr)
        return 2
    pipe.to(device)
    if args.fused_attention:
        set_fused_attention(pipe.transformer)
    try:
        set_sampler(pipe, args.scheduler, args.learned_variance)
    except ValueError as error:
        return exit_on_input_error("nala-sample", error)
    labels: List[Union[int, str]] = args.labels if args.labels is not None else default_labels(pipe.num_classes)
    if args.labels is None and len(labels) < pipe.num_classes:
        print(f"--labels not given: sampling {len(labels)} of the model's {pipe.num_classes} classes (ids "
              f"{' '.join(map(str, labels))}); pass --labels for others")
    height = args.height or pipe.default_sample_size
    width = args.width or pipe.default_sample_size
    count = len(labels) * args.images_per_label
    generators = [torch.Generator(device).manual_seed(args.seed + i) for i in range(count)]
    try:
        output = pipe(
            labels,
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_label=args.images_per_label,
            generator=generators,
            output_type="pt",
            highres_mode=args.highres_mode,
            strength=args.strength,
            position_embedding=args.position_embedding,
            attention_sharpness=args.attention_sharpness,
            check_memory=args.memory_check,
            **guidance_kwargs(args),
        )
    except ValueError as error:
        return exit_on_input_error("nala-sample", error)
    nrow = args.nrow or (args.images_per_label if args.images_per_label > 1 else min(len(labels), 8))
    save_grid_atomically(output.images.float().cpu(), args.out, nrow)
    for stage in output.stages:
        evaluations = stage.get("model_evaluations", stage["steps"])
        calls = f" ({evaluations} model evaluations)" if evaluations != stage["steps"] else ""
        print(f"stage {stage['height']}x{stage['width']}: {stage['steps']} steps{calls}, {stage['seconds']:.2f} s")
        report = stage.get("attention_report")
        if report and report.get("layers"):
            values = ", ".join(f"{v['sharpness']:.3g}" for v in report["layers"].values())
            print(f"  attention sharpness per layer (grid {report['grid']}, training grid {report['training_grid']}): {values}")
    settings = pipe.sampling_settings(args.steps, args.guidance)
    print(f"wrote {args.out} ({count} images of {height}x{width}, {settings['num_inference_steps']} steps, "
          f"guidance {settings['guidance_scale']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
