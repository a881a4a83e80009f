"""Train a class-conditional NaLa DiT with accelerate: from scratch, or converted from a DiT and distilled.

    python train/train_nala_dit.py --train_data_dir DATA --resolution 32 --model_config S/2 \\
        --max_train_steps 10000 --output_dir runs/s2
    accelerate launch --multi_gpu --num_processes 8 train/train_nala_dit.py ...   # DDP (FSDP/DeepSpeed refused)
    accelerate launch --multi_gpu --num_processes 2 train/train_nala_dit.py ...   # no GPU: 2 CPU processes (gloo)
    nala-train --init_from facebook/DiT-XL-2-256 --teacher facebook/DiT-XL-2-256 --vae VAE_DIR ...

The output folder becomes a pipeline folder (EMA weights) that ``NaLaDiTPipeline.from_pretrained``
loads, with ``args.json``, ``log.csv``, sample grids in ``samples/`` and ``checkpoint-<step>`` folders.
Noise, timesteps, label drops and flips come from a generator seeded by (seed, batch index,
process), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import nala_diffusion.diffusion.learned_variance as learned_variance
from nala_diffusion.diffusion.learned_variance import VARIANCE_LOSSES
from nala_diffusion.diffusion.objectives import OBJECTIVES, WEIGHTING_SCHEMES
from nala_diffusion.models.options import ATTENTION_TYPES, FIELDS, add_option_flags, config_key, layer_attention_types
from nala_diffusion.train.run_log import CsvLog
from nala_diffusion.train.run_setup import (
    LazyLogger,
    inherited_vae,
    layers_to_calibrate,
    resolve_classes,
    sampling_defaults,
)
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error, positive_int
from nala_diffusion.utils.distributed import use_cpu_processes
from nala_diffusion.utils.files import save_grid_atomically
from nala_diffusion.utils.locks import output_lock

if TYPE_CHECKING:
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

# imported on first use, so that --help answers at once


logger = LazyLogger(__name__)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-train", description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--train_data_dir", default=None, help="ImageFolder: one subfolder per class")
    data.add_argument("--dataset", default=None, help="builtin:<name>, a built-in offline dataset")
    data.add_argument("--resolution", type=positive_int, default=32, help="images are resized and center-cropped to this")
    data.add_argument("--no_random_flip", dest="random_flip", action="store_false", help="disable horizontal flips")
    data.add_argument("--vae", default=None,
                      help="AutoencoderKL folder or Hub id, or a pipeline (its vae/): train in its latent space "
                           "(default: the VAE of the --init_from pipeline, if it has one)")
    data.add_argument("--cache_latents", action="store_true", help="encode the data once (both flips) and reuse it")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help='worker processes of the data loader')
    model = p.add_argument_group("model")
    model.add_argument("--model_config", default="S/2", help="preset (S/2, B/2, L/2, XL/2, ...) or a JSON config file")
    model.add_argument("--init_from", default=None,
                       help="DiT or NaLa DiT to inherit weights from: a pipeline or transformer folder, or a Hub id "
                            "(facebook/DiT-XL-2-256); a pipeline also gives its VAE and class names. Also a SiT "
                            "checkpoint file (SiT-XL-2-256.pt, .safetensors): a flow model in SiT's conventions")
    model.add_argument("--class_embedding", choices=["source", "new"], default="source",
                       help="with --init_from: 'source' maps the data's class folders onto the model's classes (ImageNet "
                            "synsets such as n01440764, or the pipeline's label names); 'new' trains a new class "
                            "embedding sized to the data, keeping every other weight")
    model.add_argument("--attention_type", "--attention", dest="attention_type", choices=ATTENTION_TYPES, default=None,
                       help="override the attention type (the model config's attention_type)")
    layout = model.add_mutually_exclusive_group()
    layout.add_argument("--softmax_layers", type=int, nargs="+", default=None, metavar="INDEX",
                        help="hybrid layout: these blocks (negative counts from the end: -1 is the last) run softmax "
                             "attention, the others the attention type (default: the model's layout)")
    layout.add_argument("--attention_types", choices=ATTENTION_TYPES, nargs="+", default=None, metavar="KIND",
                        help=f"hybrid layout: one attention type per block, of {', '.join(ATTENTION_TYPES)} "
                             "(default: the model's layout)")
    add_option_flags(model, defaults={
        "norm_scale_mode": "the model's; new NaLa models: calibrated, the median query norm per head on one training batch",
    })
    model.add_argument("--use_cpe", action=argparse.BooleanOptionalAction, default=None,
                       help="NaLaFormer's convolutional positional encodings: a depthwise 3x3 convolution of the tokens "
                            "before each block's attention and FFN (trunc-normal init; zero with --init_from, so the "
                            "converted model starts unchanged) (default: the model's, else off)")
    model.add_argument("--recalibrate_norm_scale", action="store_true",
                       help="with --init_from: calibrate sigma again even in layers whose sigma the model brings "
                            "(default: kept, as every other weight)")
    model.add_argument("--norm_scale_quantile", type=float, default=0.5,
                       help="calibration sets sigma to this quantile of each head's query norms")
    objective = p.add_argument_group("objective")
    objective.add_argument("--objective", choices=OBJECTIVES, default=None,
                           help="'ddpm' (noise or v on DiT's linear schedule) or 'flow' (flow matching: velocity noise - x0 "
                                "on the path (1 - sigma) x0 + sigma noise, sampled with FlowMatchEulerDiscreteScheduler) "
                                "(default: the --init_from model's, else ddpm); saved in the model's config")
    objective.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="uniform",
                           help="flow: the density of training sigmas (diffusers' compute_density_for_timestep_sampling): "
                                "uniform (SiT), logit_normal (SD3, SANA) or mode")
    objective.add_argument("--logit_mean", type=float, default=0.0, help="flow, logit_normal: mean of the logit of sigma")
    objective.add_argument("--logit_std", type=float, default=1.0, help="flow, logit_normal: its standard deviation")
    objective.add_argument("--mode_scale", type=float, default=1.29, help="flow, mode: the scale of the mode density")
    objective.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon",
                           help="ddpm: what the model predicts, the noise or v (a flow model predicts the velocity)")
    objective.add_argument("--timestep_range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                           help="train on timesteps LOW <= t < HIGH only (default: all of the scheduler's); "
                                "e.g. 0 500 for a denoiser of the less noisy half")
    objective.add_argument("--class_dropout_prob", type=float, default=0.1, help="labels dropped to the null class")
    objective.add_argument("--teacher", default=None,
                           help="frozen softmax DiT to distill from: folder or Hub id, or a SiT checkpoint file")
    objective.add_argument("--distill_weight", type=float, default=1.0, help='weight of the distillation term (with --teacher)')
    objective.add_argument("--attention_distillation_weight", type=float, default=0.0,
                           help="weight of attention-output distillation: the MSE between each block's attention output "
                                "and the --teacher's (or, with --init_from alone, its own projections under softmax) "
                                "on the same hidden states, averaged over blocks; softmax blocks are skipped "
                                "(LinFusion and CLEAR weigh it 0.5; default 0: off)")
    objective.add_argument("--variance_loss", choices=VARIANCE_LOSSES, default=None,
                           help="for a model with learned variance (out_channels = 2 x in_channels): 'vlb' trains the "
                                "variance channels with improved DDPM's L_vlb (the mean's gradient stopped), 'none' "
                                "leaves them as they are (default: vlb for such models)")
    objective.add_argument("--vlb_weight", type=float, default=1.0,
                           help="weight of L_vlb (1.0, improved DDPM's and DiT's hybrid loss)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--max_train_steps", type=positive_int, required=True, help='optimiser steps in all (a resumed run continues to this count)')
    optim.add_argument("--train_batch_size", type=positive_int, default=32, help="per process")
    optim.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help='batches summed per optimiser step')
    optim.add_argument("--learning_rate", type=float, default=1e-4, help='AdamW learning rate')
    optim.add_argument("--lr_scheduler", default=None,
                       help="any diffusers.optimization scheduler name (default: constant, or constant_with_warmup "
                            "when --lr_warmup_steps is given)")
    optim.add_argument("--lr_warmup_steps", type=int, default=0,
                       help="linear warm-up steps of the schedule (runs recorded before it acted trained without warm-up; "
                            "docs/usage.md)")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help='AdamW beta1')
    optim.add_argument("--adam_beta2", type=float, default=0.999, help='AdamW beta2')
    optim.add_argument("--adam_weight_decay", type=float, default=0.0, help='AdamW weight decay')
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help='AdamW epsilon')
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help='gradients are clipped to this norm')
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="autocast dtype (default: accelerate's configuration)")
    optim.add_argument("--gradient_checkpointing", action="store_true", help='recompute each block in backward (less memory, more time)')
    optim.add_argument("--use_ema", action="store_true", help='keep an EMA of the weights (EMAModel) and save it as the output')
    optim.add_argument("--ema_decay", type=float, default=0.9999, help='EMA decay')
    optim.add_argument("--seed", type=int, default=0, help='seed of the initialisation, noise, label drops and data order')
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", required=True, help='run folder: checkpoints, logs and, at the end, the pipeline')
    out.add_argument("--checkpointing_steps", type=positive_int, default=500, help='write a checkpoint every N steps')
    out.add_argument("--checkpoints_total_limit", type=positive_int, default=None, help='keep only the newest N checkpoints (default: all)')
    out.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    out.add_argument("--overwrite", action="store_true",
                     help="remove an earlier run in output_dir and train from step 0 (default: refuse)")
    out.add_argument("--logging_steps", type=positive_int, default=10, help='log.csv row every N steps')
    out.add_argument("--validation_steps", type=positive_int, default=None, help="write a sample grid every N steps")
    out.add_argument("--validation_labels", type=int, nargs="+", default=None, help='labels of the validation grid (default: the first 8 classes)')
    out.add_argument("--validation_inference_steps", type=positive_int, default=25,
                     help="sampling steps of the validation grid; saved as the pipeline's default steps")
    out.add_argument("--validation_guidance_scale", type=float, default=4.0,
                     help="guidance of the validation grid; saved as the pipeline's default guidance")
    out.add_argument("--report_to", default="auto", help="'auto' (tensorboard when installed), 'tensorboard' or 'none'")
    args = p.parse_args(argv)
    if (args.train_data_dir is None) == (args.dataset is None):
        p.error("give exactly one of --train_data_dir and --dataset")
    if args.cache_latents and not (args.vae or args.init_from):
        p.error("--cache_latents needs a VAE: --vae, or an --init_from pipeline that has one")
    if args.attention_distillation_weight < 0 or not math.isfinite(args.attention_distillation_weight):
        p.error(f"--attention_distillation_weight must be a finite number >= 0, got {args.attention_distillation_weight}")
    if args.attention_distillation_weight and not (args.teacher or args.init_from):
        p.error("--attention_distillation_weight needs a teacher: --teacher, or --init_from (its own softmax attention)")
    if args.class_embedding == "new" and not args.init_from:
        p.error("--class_embedding new needs --init_from (a model built from scratch has the data's classes already)")
    if not (args.validation_guidance_scale >= 0 and math.isfinite(args.validation_guidance_scale)):
        p.error(f"--validation_guidance_scale must be a finite number >= 0, got {args.validation_guidance_scale}")
    if not 0 <= args.class_dropout_prob < 1:
        p.error("--class_dropout_prob must be in [0, 1)")
    if args.objective == "flow" and args.prediction_type != "epsilon":
        p.error("--prediction_type is DDPM's choice; a flow model predicts the velocity (leave it out with --objective flow)")
    if args.objective == "flow" and args.variance_loss == "vlb":
        p.error("--variance_loss vlb is DDPM's variational bound; a flow model has no learned variance to train "
                "(use --variance_loss none, or --objective ddpm)")
    if not args.logit_std > 0:
        p.error(f"--logit_std must be positive, got {args.logit_std}")
    if args.lr_warmup_steps < 0:
        p.error(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.lr_scheduler is None:
        args.lr_scheduler = "constant_with_warmup" if args.lr_warmup_steps else "constant"
    elif args.lr_scheduler == "constant" and args.lr_warmup_steps:
        p.error(f"--lr_scheduler constant has no warm-up, so --lr_warmup_steps {args.lr_warmup_steps} would do nothing: "
                "use constant_with_warmup (the default when --lr_warmup_steps is given) or drop --lr_warmup_steps")
    if args.timestep_range and not 0 <= args.timestep_range[0] < args.timestep_range[1] <= NUM_TRAIN_TIMESTEPS:
        p.error(f"--timestep_range LOW HIGH needs 0 <= LOW < HIGH <= {NUM_TRAIN_TIMESTEPS}, got {args.timestep_range}")
    return args


def model_config_file(name: str) -> str:
    """The JSON file ``--model_config`` names: the path itself, else (outside a checkout) the copy of the
    repository's ``train/configs/<file>`` installed with the package; anything else is a ``ValueError``
    saying whether it was taken for a file or a preset."""
    from nala_diffusion.models.transformer import DIT_PRESETS

    if os.path.isfile(name):
        return name
    parts = os.path.normpath(name).split(os.sep)
    if len(parts) >= 2 and parts[-2:-1] == ["configs"]:
        installed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", parts[-1])
        if os.path.isfile(installed):
            print(f"--model_config {name}: not in {os.getcwd()}; using the installed copy {installed}", file=sys.stderr)
            return installed
    if name.endswith(".json") or name.count("/") > 1 or name.startswith((".", os.sep)):
        raise ValueError(f"--model_config {name!r}: no such file (from {os.getcwd()}); give a JSON config file or a "
                         f"preset ({', '.join(sorted(DIT_PRESETS))})")
    raise ValueError(f"--model_config {name!r} is neither a preset ({', '.join(sorted(DIT_PRESETS))}) nor a file")


def attention_overrides(args) -> Dict[str, Any]:
    overrides = {config_key(k): getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
    if args.attention_type:
        overrides["attention_type"] = args.attention_type
    if args.use_cpe is not None:
        overrides["use_cpe"] = args.use_cpe
    if args.objective is not None:
        overrides["objective"] = args.objective
    return overrides


def layout_overrides(args) -> Dict[str, Any]:
    """The hybrid layout flags, as keyword arguments of ``convert_dit_to_nala`` / ``preset_config``."""
    if args.softmax_layers is not None:
        return {"softmax_layers": args.softmax_layers}
    if args.attention_types is not None:
        return {"attention_types": args.attention_types}
    return {}


def build_model(args, in_channels: int, sample_size: int, num_classes: int):
    """The model to train and the model whose queries calibrate its sigma (the pretrained source
    for ``--init_from``, else the model itself)."""
    from nala_diffusion.models.conversion import convert_dit_to_nala
    from nala_diffusion.models.sit import load_sit, looks_like_checkpoint_file
    from nala_diffusion.models.sources import load_transformer
    from nala_diffusion.models.transformer import DIT_PRESETS, NaLaDiTTransformer2DModel, preset_config
    expected = {"in_channels": in_channels, "sample_size": sample_size}
    if not args.init_from:  # a pretrained model's classes are mapped onto the data's (resolve_classes)
        expected["num_classes"] = num_classes
    overrides = attention_overrides(args)
    layout = layout_overrides(args)
    if args.init_from:
        foreign = looks_like_checkpoint_file(args.init_from)  # a SiT checkpoint: converted to NaLa, as a DiT is
        source = load_sit(args.init_from) if foreign else load_transformer(args.init_from)
        model = source
        if foreign or not isinstance(source, NaLaDiTTransformer2DModel) or overrides or layout:
            # calibrated below on real data from the source's own queries
            model = convert_dit_to_nala(source, **{"attention_type": "nala", **overrides}, **layout, calibrate=False)
        config = dict(model.config)
    elif args.model_config in DIT_PRESETS:
        config = preset_config(args.model_config)
    else:
        with open(model_config_file(args.model_config), encoding="utf-8") as handle:
            config = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    for key, value in expected.items():
        if config.get(key, value) != value and not (key == "num_classes" and config.get(key) is None):
            raise ValueError(f"the model has {key}={config[key]} but the data needs {key}={value}")
    if args.init_from:
        return model, source
    config = {**config, **expected, **overrides}
    if layout:
        config["attention_types"] = layer_attention_types(config["num_layers"], config.get("attention_type", "nala"),
                                                          **layout)
    model = NaLaDiTTransformer2DModel(**config)
    return model, model


def probe_batch(args, dataset, vae, objective, device):
    """A fixed batch of noised training data (seeded by --seed), for sigma's calibration and the
    saturation check at validation: (noisy x, timesteps, labels)."""
    generator = torch.Generator().manual_seed(args.seed)
    count = min(len(dataset), max(args.train_batch_size, 16))
    indices = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    batch = torch.stack([dataset[i][0] for i in indices]).to(device)
    labels = torch.tensor([int(dataset[i][1]) for i in indices], device=device)
    flip = torch.zeros(count, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x0 = clean_latents(batch, vae, args.cache_latents, flip, generator)
    times = objective.draw(count, generator, device)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    noisy, timesteps = objective.noised(x0, noise, times)
    return noisy, timesteps, labels


def run_objective(args, config, clip_sample: bool):
    """The run's :class:`~nala_diffusion.diffusion.objectives.Objective` for a model ``config``."""
    from nala_diffusion.diffusion.objectives import training_objective

    return training_objective(config, prediction_type=args.prediction_type, timestep_range=args.timestep_range,
                              clip_sample=clip_sample, weighting_scheme=args.weighting_scheme,
                              logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
                              num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def step_generator(seed: int, batch_index: int, process_index: int, device) -> torch.Generator:
    """The random source of one batch: depends on nothing but the run's seed and the batch's position."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch_index) * 1009 + process_index)


def clean_latents(batch, vae, cached: bool, flip: torch.Tensor, generator) -> torch.Tensor:
    """x0 for the diffusion loss: pixels in [-1, 1], or VAE latents x scaling_factor."""
    if cached:  # (B, 2, 2C, h, w): moments of the image and of its mirror
        moments = batch[torch.arange(len(batch)), flip.long()]
        mean, logvar = moments.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * vae.config.scaling_factor
    pixels = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if vae is None:
        return pixels
    with torch.no_grad():
        return vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator).float() * vae.config.scaling_factor


def save_pipeline_atomically(pipeline: NaLaDiTPipeline, output_dir: str) -> None:
    """Write the pipeline aside, then move its entries into ``output_dir`` (model_index.json last)."""
    temporary = os.path.join(output_dir, ".tmp-pipeline")
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary)
    names = sorted(os.listdir(temporary), key=lambda n: n == "model_index.json")
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(temporary, name), target)
    shutil.rmtree(temporary, ignore_errors=True)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, accelerator) -> bool:
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        return bool(flag.item())


# the training noise schedule's length (DiT's linear schedule)
NUM_TRAIN_TIMESTEPS = 1000
# learning-rate schedules that do not depend on --max_train_steps, so a resumed run may change it
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# arguments that do not change what a resumed run computes; every other one must match the checkpoint's
RESUME_FREE_ARGS = {"max_train_steps", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
                    "resume_from_checkpoint", "logging_steps", "validation_steps", "validation_labels",
                    "validation_inference_steps", "validation_guidance_scale", "report_to", "dataloader_num_workers", "overwrite",
                    "train_data_dir", "dataset", "init_from", "teacher", "vae", "model_config",
                    # the layout flags: the model config compares the layout they give, whatever its spelling
                    "softmax_layers", "attention_types"}


def main(args) -> int:
    check_output_dir(args)
    # the run installs its own SIGTERM/SIGINT handlers (StopRequest); a caller in the same process
    # (nala-study) gets its own back afterwards
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # other processes of a distributed run: the main one holds the lock
        with output_lock(args.output_dir, "the training run", hold=int(os.environ.get("RANK", "0")) == 0):
            return train(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: what a training run writes in output_dir (with checkpoint-<step> folders): all --overwrite removes
RUN_OUTPUTS = ("args.json", "log.csv", "logs", "samples", "latent_cache", "model_index.json", "transformer",
               "scheduler", "vae", ".tmp-pipeline")


def clear_run(folder: str) -> List[str]:
    """Remove a training run's outputs (for --overwrite): checkpoints, the pipeline, logs, samples and
    caches; any other file in the folder (the user's own) stays. Returns what was removed."""
    from nala_diffusion.train import checkpoints
    removed = []
    for name in sorted(os.listdir(folder)):
        if name in RUN_OUTPUTS or name.startswith((checkpoints.PREFIX, checkpoints.TEMPORARY_PREFIX)):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


#: accelerate distributed types whose sharded parameters validation and EMA cannot read
SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def weights_id(path: Optional[str]) -> Optional[str]:
    """The sha256 of the weights a local folder loads (pipeline components, or every safetensors file),
    or the Hub id as given; None for no path."""
    if not path:
        return None
    if os.path.isdir(path):
        from nala_diffusion.utils.run_guard import pipeline_weights_hash

        return pipeline_weights_hash(path)
    if os.path.isfile(path):  # a checkpoint file (SiT)
        from nala_diffusion.utils.run_guard import files_hash

        return files_hash(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)])
    return path


def check_distributed(accelerator) -> None:
    """Refuse sharded training: validation sampling and the EMA read the full parameters of the unwrapped
    model on one process, which FSDP and DeepSpeed shard across processes. DDP (and one process) work."""
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in SHARDED_TYPES:
        raise ValueError(f"accelerate is configured for {kind}, which shards the parameters; nala-train's validation "
                         "and EMA need them whole. Launch with DDP (accelerate launch --multi_gpu) or one process")


def check_output_dir(args) -> None:
    """Refuse an output_dir that holds the training data: --overwrite or a checkpoint could touch it."""
    if args.train_data_dir:
        out, data = os.path.realpath(args.output_dir), os.path.realpath(args.train_data_dir)
        if os.path.commonpath([out, data]) == out:
            raise ValueError(f"output_dir {args.output_dir!r} contains the training data {args.train_data_dir!r}; "
                             "choose an output_dir outside it (nothing was written or removed)")


def train(args) -> int:
    # 0. Checks that need no accelerator: the output folder and the data
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from nala_diffusion.data.classes import MappedLabels
    from nala_diffusion.data.datasets import (
        build_latent_cache,
        dataset_fingerprint,
        load_dataset,
        load_latent_cache,
    )
    from nala_diffusion.diffusion.objectives import objective_of
    from nala_diffusion.models.norm_awareness import calibrate_norm_scale
    from nala_diffusion.models.sit import load_sit, looks_like_checkpoint_file
    from nala_diffusion.models.sources import load_transformer, load_vae
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline
    from nala_diffusion.train import checkpoints
    finished = os.path.exists(os.path.join(args.output_dir, "model_index.json"))
    has_run = bool(checkpoints.list_checkpoints(args.output_dir)) or finished
    if has_run and args.overwrite:
        if int(os.environ.get("RANK", "0")) == 0:  # one process removes; the others start fresh with it
            removed = clear_run(args.output_dir)
            logger_warning(f"--overwrite: removed the earlier run in {args.output_dir} ({', '.join(removed)})")
        has_run = finished = False
    resume_path = None if args.overwrite else checkpoints.resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if has_run and args.resume_from_checkpoint is None:
        raise ValueError(
            f"output_dir {args.output_dir!r} already holds a training run; pass --resume_from_checkpoint latest "
            "to continue it, --overwrite to train it again from step 0, or choose another output_dir "
            "(nothing was overwritten)"
        )
    if finished and args.resume_from_checkpoint and resume_path is None:
        raise ValueError(
            f"output_dir {args.output_dir!r} holds a finished training run but no checkpoint to resume from, so "
            "there is nothing to continue; its weights, log.csv and args.json were left as they are. Pass "
            "--overwrite to train it again from step 0, or choose another output_dir"
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dataset = load_dataset(args.dataset or args.train_data_dir, args.resolution)
    data_fingerprint = dataset_fingerprint(dataset, args.resolution, name=args.dataset)
    if len(dataset) == 0:
        raise ValueError("the dataset holds no images")
    classes = [str(c) for c in dataset.classes]
    bad_labels = [label for label in args.validation_labels or [] if not 0 <= label < len(classes)]
    if bad_labels:
        raise ValueError(f"--validation_labels {bad_labels} are not classes of the data (0..{len(classes) - 1})")
    vae_source = args.vae or inherited_vae(args.init_from)
    if args.cache_latents and not vae_source:
        raise ValueError(f"--cache_latents needs a VAE, and --init_from {args.init_from!r} has none; pass --vae")

    report_to = args.report_to
    if report_to == "auto":
        report_to = "tensorboard" if _has_tensorboard() else None
    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if report_to in (None, "none") else report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    check_distributed(accelerator)
    if accelerator.mixed_precision in ("fp16", "bf16") and not accelerator.native_amp:
        raise ValueError(f"mixed precision {accelerator.mixed_precision} (--mixed_precision or accelerate's configuration) "
                         f"does not run on {accelerator.device}: accelerate would train in float32 and the run would "
                         "record fp16. On a CPU use bf16 or no; nothing was written")
    set_seed(args.seed)
    stop = StopRequest()
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        removed = checkpoints.remove_partial_checkpoints(args.output_dir)
        if removed:
            logger.warning(f"removed partially written checkpoints {removed}", main_process_only=True)

    # 1. Data and VAE; the weights that go into the run, by hash, for resume checks
    input_weights = {key: weights_id(getattr(args, key)) for key in ("teacher", "init_from")}
    input_weights["vae"] = weights_id(vae_source)
    saved = checkpoints.read_state(resume_path) if resume_path else None
    if saved is not None:
        checkpoints.check_inputs(saved, {"data_fingerprint": data_fingerprint, "input_weights": input_weights},
                                 resume_path)
    vae = load_vae(vae_source).to(accelerator.device).eval() if vae_source else None
    if vae is not None:
        vae.requires_grad_(False)
        logger.info(f"latent space: the VAE of {vae_source}", main_process_only=True)
    if args.cache_latents:
        # named by the data and the VAE's weights: a VAE replaced at the same path gets its own latents
        vae_id = f"{vae_source}|{input_weights['vae']}"
        cache = os.path.join(args.output_dir, "latent_cache",
                             f"{dataset_fingerprint(dataset, args.resolution, vae_id, name=args.dataset)}.safetensors")
        if accelerator.is_main_process and not os.path.exists(cache):
            build_latent_cache(dataset, vae, cache)
        accelerator.wait_for_everyone()
        dataset = load_latent_cache(cache, dataset.classes)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if args.resolution % vae_factor:
        raise ValueError(f"resolution {args.resolution} must be a multiple of the VAE factor {vae_factor}")
    in_channels = vae.config.latent_channels if vae is not None else 3

    # 2. Models
    model, calibration_source = build_model(args, in_channels, args.resolution // vae_factor, len(classes))
    calibrate_layers = layers_to_calibrate(args, model, calibration_source)
    model, id2label, class_ids = resolve_classes(args, model, classes)
    if args.class_embedding == "new":
        calibration_source = model  # the source's labels mean other classes
    dataset = MappedLabels(dataset, class_ids)
    null_label = model.null_class_label
    learned = model.out_channels == 2 * in_channels
    objective = run_objective(args, model.config, clip_sample=vae is None)
    if objective.name == "flow" and args.prediction_type != "epsilon":
        raise ValueError(f"the model is a flow model ({args.init_from or args.model_config}); --prediction_type is DDPM's choice")
    if args.variance_loss is None:
        args.variance_loss = "vlb" if learned and objective.name == "ddpm" else "none"
    elif args.variance_loss == "vlb" and objective.name == "flow":
        raise ValueError("--variance_loss vlb is DDPM's variational bound; this is a flow model "
                         f"({args.init_from or args.model_config}), whose learned-variance channels are not sampled")
    elif args.variance_loss == "vlb" and not learned:
        raise ValueError(f"--variance_loss vlb needs a model with learned variance (out_channels = 2 x {in_channels}); "
                         f"this one has out_channels {model.out_channels}")
    logger.info(f"objective: {objective.name}", main_process_only=True)
    probe = probe_batch(args, dataset, vae, objective, accelerator.device)
    if calibrate_layers and not resume_path:
        # sigma from the queries the layers see on real noised data (a resumed run loads its own)
        model.to(accelerator.device)
        calibration_source.to(accelerator.device)
        sigmas = calibrate_norm_scale(model, probe[0], timestep=probe[1], class_labels=probe[2],
                                      source=calibration_source, quantile=args.norm_scale_quantile,
                                      layers=calibrate_layers)
        logger.info(f"calibrated NaLa's norm_scale per layer and head: {sigmas}", main_process_only=True)
    del calibration_source
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    teacher = None  # (model, its Objective)
    if args.teacher:
        teacher = load_sit(args.teacher) if looks_like_checkpoint_file(args.teacher) else load_transformer(args.teacher)
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        if teacher.config.in_channels != in_channels or teacher.config.num_embeds_ada_norm != model.config.num_classes:
            raise ValueError(f"the teacher {args.teacher!r} has {teacher.config.in_channels} channels and "
                             f"{teacher.config.num_embeds_ada_norm} classes; the student has {in_channels} and "
                             f"{model.config.num_classes}")
        if objective_of(teacher.config) != objective.name:
            raise ValueError(f"the teacher {args.teacher!r} was trained with the {objective_of(teacher.config)!r} objective "
                             f"and the student trains with {objective.name!r}; distillation needs both to predict the same "
                             "thing (pass --objective to match, or another --teacher)")
        teacher = (teacher, run_objective(args, teacher.config, clip_sample=vae is None))  # with its own conventions
    ema = checkpoints.ema_model(model, args.ema_decay) if args.use_ema else None
    # 3. Optimisation
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                         num_workers=args.dataloader_num_workers)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    distiller = None
    if args.attention_distillation_weight:
        from nala_diffusion.train.attention_distillation import AttentionDistillation

        distiller = AttentionDistillation(accelerator.unwrap_model(model), teacher[0] if teacher else None)
        logger.info(f"attention distillation on blocks {distiller.layer_indices}", main_process_only=True)
    if ema is not None:
        ema.to(accelerator.device)
        checkpoints.register_ema_hooks(accelerator, ema)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)

    # 4. Resume
    unwrapped = accelerator.unwrap_model(model)
    run_state = {
        "model_config": {k: v for k, v in dict(unwrapped.config).items() if not k.startswith("_")},
        "dataset_size": len(dataset), "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes, "latent_space": vae is not None, "args": vars(args),
        "class_names": classes, "class_ids": class_ids,
        "data_fingerprint": data_fingerprint, "input_weights": input_weights,
        "result_args": {k: v for k, v in vars(args).items() if k not in RESUME_FREE_ARGS},
    }
    global_step = batch_index = 0
    if resume_path:
        checkpoints.check_compatible(saved, run_state, resume_path, type(unwrapped))
        saved_steps = saved.get("args", {}).get("max_train_steps", args.max_train_steps)
        if saved_steps != args.max_train_steps and args.lr_scheduler not in STEP_FREE_SCHEDULES:
            raise ValueError(
                f"cannot resume from {resume_path} with --max_train_steps {args.max_train_steps}: the run was started "
                f"with {saved_steps} and its --lr_scheduler {args.lr_scheduler} decays over that count, so the "
                "learning rate would jump. Resume with the original --max_train_steps, or use a constant schedule "
                "(constant, constant_with_warmup), whose run may be extended")
        accelerator.load_state(resume_path)  # with the EMA, through register_ema_hooks
        global_step, batch_index = saved["global_step"], saved["batch_index"]
        logger.info(f"resumed from {resume_path} at step {global_step}", main_process_only=True)
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint to resume from; starting a new run", main_process_only=True)
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "args.json"), "w", encoding="utf-8") as handle:
            json.dump(vars(args), handle, indent=2)
    extra_columns = ["loss_attention", *(f"loss_attention_{i}" for i in distiller.layer_indices)] if distiller else []
    log = CsvLog(os.path.join(args.output_dir, "log.csv"), keep_until_step=global_step,
                 extra_columns=extra_columns) if accelerator.is_main_process else None
    if report_to not in (None, "none"):
        accelerator.init_trackers("nala_dit", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    def checkpoint():
        state = {**run_state, "global_step": global_step, "batch_index": batch_index}
        checkpoints.save_checkpoint(accelerator, args.output_dir, global_step, state, args.checkpoints_total_limit)

    # 5. Train
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process)
    window_start, window_images, window_batches, sums = time.perf_counter(), 0, 0, {}
    model.train()
    while global_step < args.max_train_steps:
        epoch = global_step // steps_per_epoch
        loader.set_epoch(epoch)
        skip = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch, labels in epoch_loader:
            generator = step_generator(args.seed, batch_index, accelerator.process_index, accelerator.device)
            batch_index += 1
            with accelerator.accumulate(model):
                losses = training_losses(args, model, teacher, vae, objective, batch, labels, null_label,
                                         in_channels, generator, distiller)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + accelerator.reduce(value.detach(), "mean").item()
            window_images += len(labels) * accelerator.num_processes
            window_batches += 1
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unwrapped.parameters())
            global_step += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": global_step, "lr": lr_scheduler.get_last_lr()[0], "images_per_second": window_images / elapsed,
                       **{k: v / window_batches for k, v in sums.items()}}
                progress.set_postfix(loss=f"{row['loss']:.4f}")
                if log is not None:
                    log.write(row)
                accelerator.log(row, step=global_step)
                window_start, window_images, window_batches, sums = time.perf_counter(), 0, 0, {}
            if global_step % args.checkpointing_steps == 0:
                checkpoint()
            if args.validation_steps and global_step % args.validation_steps == 0:
                responding = validate(args, accelerator, unwrapped, ema, objective, vae, id2label, class_ids,
                                      global_step, probe)
                if responding is not None:
                    if log is not None:
                        log.write({"step": global_step, "responding_fraction": responding})
                    accelerator.log({"responding_fraction": responding}, step=global_step)
            if stop.agreed(accelerator):
                if global_step % args.checkpointing_steps:
                    checkpoint()
                logger.warning(f"stopped by signal at step {global_step}; resume with --resume_from_checkpoint latest",
                               main_process_only=True)
                accelerator.end_training()
                return 128 + (stop.signal or signal.SIGTERM)
            if global_step >= args.max_train_steps:
                break
    progress.close()

    # 6. Save the EMA weights as a pipeline
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        pipeline = NaLaDiTPipeline(transformer=unwrapped.float().eval(), vae=vae, id2label=id2label,
                                   scheduler=objective.sampling_scheduler(),
                                   sampling_defaults=sampling_defaults(args))
        save_pipeline_atomically(pipeline, args.output_dir)
        logger.info(f"saved the pipeline to {args.output_dir}")
    accelerator.end_training()
    return 0


def training_losses(args, model, teacher, vae, objective, batch, labels, null_label, channels, generator,
                    distiller=None):
    """MSE to the target (+ distill_weight x MSE to the teacher's mean and, for learned variance, its
    variance channels; + vlb_weight x L_vlb for learned variance; + attention_distillation_weight x the
    attention-output MSE); draws in a fixed order from ``generator``."""
    device = batch.device
    count = len(labels)
    flip = torch.rand(count, generator=generator, device=device) < 0.5 if args.random_flip else torch.zeros(count, dtype=torch.bool, device=device)
    x0 = clean_latents(batch, vae, args.cache_latents, flip, generator)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    times = objective.draw(count, generator, device)  # timesteps (DDPM) or sigmas (flow)
    drop = torch.rand(count, generator=generator, device=device) < args.class_dropout_prob
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    noisy, timesteps = objective.noised(x0, noise, times)
    target = objective.target(x0, noise, times)
    with distiller.capture() if distiller is not None else contextlib.nullcontext():
        output = model(noisy, timestep=timesteps, class_labels=labels).sample  # (B, C or 2C, h, w)
    if distiller is not None:
        losses_attention = distiller.losses()
    prediction, variance = output[:, :channels], output[:, channels:]  # the mean; v of a learned variance
    losses = {"loss_target": F.mse_loss(prediction.float(), target.float())}
    if args.variance_loss == "vlb" and variance.shape[1]:
        epsilon = learned_variance.epsilon_from_prediction(objective.scheduler, prediction.detach(), noisy, timesteps,
                                                           args.prediction_type)
        losses["loss_vlb"] = learned_variance.vlb_terms(objective.scheduler, x0, noisy, timesteps, epsilon, variance).mean()
    if teacher is not None:
        teacher_model, teacher_objective = teacher
        with torch.no_grad():  # the same noisy input, at the time the teacher reads (its own convention)
            _, teacher_timesteps = teacher_objective.noised(x0, noise, times)
            teacher_output = teacher_model(noisy.to(teacher_model.dtype), timestep=teacher_timesteps, class_labels=labels).sample
        teacher_mean = teacher_objective.to_common(teacher_output[:, :channels])
        losses["loss_distill"] = F.mse_loss(objective.to_common(prediction).float(), teacher_mean.float())
        if variance.shape[1] and teacher_output.shape[1] == output.shape[1] and objective.name == "ddpm":  # LiT: its variance too
            losses["loss_distill_variance"] = F.mse_loss(variance.float(), teacher_output[:, channels:].float())
    distill = losses.get("loss_distill", 0.0) + losses.get("loss_distill_variance", 0.0)
    if distiller is not None:
        losses.update(losses_attention)
    losses["loss"] = (losses["loss_target"] + args.distill_weight * distill + args.vlb_weight * losses.get("loss_vlb", 0.0)
                      + args.attention_distillation_weight * losses.get("loss_attention", 0.0))
    return losses


@torch.no_grad()
def validate(args, accelerator, model, ema, objective, vae, id2label, class_ids, step, probe) -> Optional[float]:
    """Sample a grid with the (EMA) weights on the main process; others wait. For NaLa models, also
    returns the share of the probe batch's queries whose power still responds to their norm
    (averaged over layers; a warning names saturated layers)."""
    from nala_diffusion.models.norm_awareness import mean_responding_fraction, nala_processors, saturation_report
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline
    responding = None
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        pipeline = NaLaDiTPipeline(model, objective.sampling_scheduler(), vae=vae, id2label=id2label)
        pipeline.set_progress_bar_config(disable=True)
        labels = [class_ids[i] for i in args.validation_labels or range(min(len(class_ids), 8))]  # data -> model ids
        generators = [torch.Generator(accelerator.device).manual_seed(args.seed + i) for i in range(len(labels))]
        images = pipeline(labels, generator=generators, output_type="pt", **sampling_defaults(args)).images
        save_grid_atomically(images.float().cpu(), os.path.join(args.output_dir, "samples", f"step-{step:06d}.png"), nrow=len(labels))
        if nala_processors(model):
            report = saturation_report(model, probe[0], timestep=probe[1], class_labels=probe[2])
            responding = mean_responding_fraction(report)
            logger.info(f"step {step}: {responding:.1%} of NaLa's queries have a power that responds to their norm")
        model.train()
        if ema is not None:
            ema.restore(model.parameters())
    accelerator.wait_for_everyone()
    return responding


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def logger_warning(message: str) -> None:
    print(f"nala-train: warning: {message}", file=sys.stderr)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return main(parse_args(argv))
    except ValueError as error:
        return exit_on_input_error("nala-train", error)


if __name__ == "__main__":
    sys.exit(cli())
