"""The sampling flags the command-line tools share (light: nothing heavy is imported). What they mean
lives with the pipelines: :mod:`~nala_diffusion.pipelines.request` (the request they build) and
:mod:`~nala_diffusion.pipelines.schedulers` (the samplers by name)."""

import argparse
from typing import Union

from nala_diffusion.models.options import POSITION_EMBEDDINGS
from nala_diffusion.pipelines.request import HIGHRES_MODES
from nala_diffusion.pipelines.schedulers import SCHEDULERS
from nala_diffusion.utils.cli_args import positive_int

GUIDANCE_CHANNEL_CHOICES = ("all", "3")


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


def add_guidance_args(parser) -> None:
    """The guidance-schedule and learned-variance flags, each under both spellings (``--guidance_interval``,
    as every tool spells its flags, and ``--guidance-interval``)."""

    def names(flag):
        return f"--{flag}", f"--{flag.replace('_', '-')}"

    parser.add_argument(*names("guidance_interval"), dest="guidance_interval", type=float, nargs=2, default=None,
                        metavar=("LOW", "HIGH"),
                        help="guide only at steps whose timestep (or sigma, --guidance_interval_unit) is in [LOW, HIGH]; "
                             "elsewhere the conditional branch runs alone (default: every step)")
    parser.add_argument(*names("guidance_interval_unit"), dest="guidance_interval_unit", choices=("timestep", "sigma"),
                        default="timestep", help="unit of --guidance_interval")
    parser.add_argument(*names("guidance_channels"), dest="guidance_channels", choices=GUIDANCE_CHANNEL_CHOICES,
                        default=None, help="'all' mean channels (diffusers' DiTPipeline; the default) or '3' (DiT's own "
                                           "sampler)")
    parser.add_argument(*names("learned_variance"), dest="learned_variance", action="store_true",
                        help="sample with the model's learned variance (DDPM, variance_type learned_range; models with "
                             "out_channels = 2 x in_channels)")


def add_request_args(parser, sample_help: dict = None) -> None:
    """The flags of a :class:`~nala_diffusion.pipelines.request.SamplingRequest` both ``nala-sample`` and
    ``nala-fid`` take (same names, so one :meth:`~SamplingRequest.from_flags` reads either); ``sample_help``
    replaces a flag's help text by name."""
    helps = {
        "height": "pixels (default: the training size)", "width": "pixels (default: the training size)",
        "steps": "denoising steps (default: the pipeline's sampling_defaults, else 50)",
        "guidance": "classifier-free guidance scale, 1 = off (default: the pipeline's sampling_defaults, else 4.0)",
        "seed": "image i uses seed + i",
        "scheduler": "sampler (default: the one saved with the pipeline); flow_euler and flow_heun for flow-matching "
                     "models (--objective flow, SiT), the others for DDPM models",
        "highres_mode": "above the training size: 'direct' (one pass) or 'progressive' (sample at the training size, "
                        "then refine upsampled stages)",
        "position_embedding": "positions above the training size: 'interpolate' into the training range, or 'extend' "
                              "beyond it (models trained at several sizes); default: the model's config",
        "attention_sharpness": "'auto': keep each layer's attention entropy at its training level above the training "
                               "size (softmax: logits x sqrt(log N / log n); NaLa: power calibrated on the model); 'off' "
                               "(default), or a factor for every layer",
        "memory_check": "sample even where the activations are estimated not to fit in free memory",
        **(sample_help or {}),
    }
    parser.add_argument("--height", type=positive_int, default=None, help=helps["height"])
    parser.add_argument("--width", type=positive_int, default=None, help=helps["width"])
    parser.add_argument("--steps", type=positive_int, default=None, help=helps["steps"])
    parser.add_argument("--guidance", type=float, default=None, help=helps["guidance"])
    parser.add_argument("--seed", type=int, default=0, help=helps["seed"])
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help=helps["scheduler"])
    parser.add_argument("--highres_mode", "--highres-mode", choices=HIGHRES_MODES, default="direct",
                        help=helps["highres_mode"])
    parser.add_argument("--position_embedding", "--position-embedding", choices=POSITION_EMBEDDINGS, default=None,
                        help=helps["position_embedding"])
    parser.add_argument("--attention_sharpness", "--attention-sharpness", type=parse_sharpness, default=None,
                        help=helps["attention_sharpness"])
    add_guidance_args(parser)
    parser.add_argument("--no_memory_check", "--no-memory-check", dest="memory_check", action="store_false",
                        help=helps["memory_check"])
