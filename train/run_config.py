"""A training run's settings, declared once: :class:`RunConfig`, whose fields are ``nala-train``'s flags.

Each field carries its flag's help text, group and argparse details; :func:`build_parser` makes the
command line from them and :meth:`RunConfig.from_flags` parses one. A config is checked when it is made,
from flags or from Python, and never changes afterwards::

    from nala_diffusion.train import RunConfig, train
    train(RunConfig(dataset="builtin:photos", max_train_steps=500, output_dir="runs/demo", use_ema=True))

:meth:`RunConfig.as_args` is the flat record a run writes (``args.json``, the checkpoints' ``args``), in the
names the flags' destinations have always had, so runs recorded before this class existed still resume.

This module imports nothing heavy, so ``nala-train --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nala_diffusion.diffusion.learned_variance import VARIANCE_LOSSES
from nala_diffusion.diffusion.objectives import NUM_TRAIN_TIMESTEPS, OBJECTIVES, WEIGHTING_SCHEMES
from nala_diffusion.models.options import ATTENTION_TYPES, FIELDS, add_option_flags
from nala_diffusion.utils.cli_args import HelpFormatter, positive_int

GROUPS = ("data", "model", "objective", "optimisation", "output")
#: help texts of the attention options' flags where the training default differs from the option's
OPTION_DEFAULTS = {
    "norm_scale_mode": "the model's; new NaLa models: calibrated, the median query norm per head on one training batch",
}


def setting(default, group: str, help: str, *flags: str, **argparse_kwargs):
    """A :class:`RunConfig` field: its default, flag group, help text, flag names (default ``--<name>``) and
    any other ``add_argument`` keyword (``type``, ``choices``, ``nargs``, ``metavar``, ``action``, ``required``).
    ``default=dataclasses.MISSING`` makes a required field (and a required flag)."""
    if group not in GROUPS:
        raise ValueError(f"unknown flag group {group!r}")
    metadata = {"group": group, "help": help, "flags": flags, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


REQUIRED = dataclasses.MISSING


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Every training setting but the attention options (which :class:`RunConfig` adds, one per
    :class:`~nala_diffusion.models.options.AttentionOptions` field)."""

    # -- data
    train_data_dir: Optional[str] = setting(None, "data", "ImageFolder: one subfolder per class")
    dataset: Optional[str] = setting(None, "data", "builtin:<name>, a built-in offline dataset")
    resolution: int = setting(32, "data", "images are resized and center-cropped to this", type=positive_int)
    random_flip: bool = setting(True, "data", "disable horizontal flips", "--no_random_flip", action="store_false")
    vae: Optional[str] = setting(None, "data", "AutoencoderKL folder or Hub id, or a pipeline (its vae/): train in its "
                                 "latent space (default: the VAE of the --init_from pipeline, if it has one)")
    cache_latents: bool = setting(False, "data", "encode the data once (both flips) and reuse it", action="store_true")
    dataloader_num_workers: int = setting(0, "data", "worker processes of the data loader", type=int)
    # -- model
    model_config: str = setting("S/2", "model", "preset (S/2, B/2, L/2, XL/2, ...) or a JSON config file")
    init_from: Optional[str] = setting(
        None, "model", "DiT or NaLa DiT to inherit weights from: a pipeline or transformer folder, or a Hub id "
        "(facebook/DiT-XL-2-256); a pipeline also gives its VAE and class names. Also a SiT checkpoint file "
        "(SiT-XL-2-256.pt, .safetensors): a flow model in SiT's conventions")
    class_embedding: str = setting(
        "source", "model", "with --init_from: 'source' maps the data's class folders onto the model's classes "
        "(ImageNet synsets such as n01440764, or the pipeline's label names); 'new' trains a new class embedding "
        "sized to the data, keeping every other weight", choices=["source", "new"])
    attention_type: Optional[str] = setting(None, "model", "override the attention type (the model config's "
                                            "attention_type)", "--attention_type", "--attention", choices=ATTENTION_TYPES)
    softmax_layers: Optional[List[int]] = setting(
        None, "model", "hybrid layout: these blocks (negative counts from the end: -1 is the last) run softmax "
        "attention, the others the attention type (default: the model's layout)", type=int, nargs="+", metavar="INDEX")
    attention_types: Optional[List[str]] = setting(
        None, "model", f"hybrid layout: one attention type per block, of {', '.join(ATTENTION_TYPES)} (default: the "
        "model's layout)", choices=ATTENTION_TYPES, nargs="+", metavar="KIND")
    use_cpe: Optional[bool] = setting(
        None, "model", "NaLaFormer's convolutional positional encodings: a depthwise 3x3 convolution of the tokens "
        "before each block's attention and FFN (trunc-normal init; zero with --init_from, so the converted model "
        "starts unchanged) (default: the model's, else off)", action=argparse.BooleanOptionalAction)
    recalibrate_norm_scale: bool = setting(False, "model", "with --init_from: calibrate sigma again even in layers whose "
                                           "sigma the model brings (default: kept, as every other weight)",
                                           action="store_true")
    norm_scale_quantile: float = setting(0.5, "model", "calibration sets sigma to this quantile of each head's query "
                                         "norms", type=float)
    # -- objective
    objective: Optional[str] = setting(
        None, "objective", "'ddpm' (noise or v on DiT's linear schedule) or 'flow' (flow matching: velocity noise - x0 "
        "on the path (1 - sigma) x0 + sigma noise, sampled with FlowMatchEulerDiscreteScheduler) (default: the "
        "--init_from model's, else ddpm); saved in the model's config", choices=OBJECTIVES)
    weighting_scheme: str = setting(
        "uniform", "objective", "flow: the density of training sigmas (diffusers' compute_density_for_timestep_sampling): "
        "uniform (SiT), logit_normal (SD3, SANA) or mode", choices=WEIGHTING_SCHEMES)
    logit_mean: float = setting(0.0, "objective", "flow, logit_normal: mean of the logit of sigma", type=float)
    logit_std: float = setting(1.0, "objective", "flow, logit_normal: its standard deviation", type=float)
    mode_scale: float = setting(1.29, "objective", "flow, mode: the scale of the mode density", type=float)
    prediction_type: str = setting("epsilon", "objective", "ddpm: what the model predicts, the noise or v (a flow model "
                                   "predicts the velocity)", choices=["epsilon", "v_prediction"])
    timestep_range: Optional[List[int]] = setting(
        None, "objective", "train on timesteps LOW <= t < HIGH only (default: all of the scheduler's); e.g. 0 500 for a "
        "denoiser of the less noisy half", type=int, nargs=2, metavar=("LOW", "HIGH"))
    class_dropout_prob: float = setting(0.1, "objective", "labels dropped to the null class", type=float)
    teacher: Optional[str] = setting(None, "objective", "frozen softmax DiT to distill from: folder or Hub id, or a SiT "
                                     "checkpoint file")
    distill_weight: float = setting(1.0, "objective", "weight of the distillation term (with --teacher)", type=float)
    attention_distillation_weight: float = setting(
        0.0, "objective", "weight of attention-output distillation: the MSE between each block's attention output and "
        "the --teacher's (or, with --init_from alone, its own projections under softmax) on the same hidden states, "
        "averaged over blocks; softmax blocks are skipped (LinFusion and CLEAR weigh it 0.5; default 0: off)", type=float)
    variance_loss: Optional[str] = setting(
        None, "objective", "for a model with learned variance (out_channels = 2 x in_channels): 'vlb' trains the "
        "variance channels with improved DDPM's L_vlb (the mean's gradient stopped), 'none' leaves them as they are "
        "(default: vlb for such models)", choices=VARIANCE_LOSSES)
    vlb_weight: float = setting(1.0, "objective", "weight of L_vlb (1.0, improved DDPM's and DiT's hybrid loss)",
                                type=float)
    # -- optimisation
    max_train_steps: int = setting(REQUIRED, "optimisation", "optimiser steps in all (a resumed run continues to this "
                                   "count)", type=positive_int, required=True)
    train_batch_size: int = setting(32, "optimisation", "per process", type=positive_int)
    gradient_accumulation_steps: int = setting(1, "optimisation", "batches summed per optimiser step", type=positive_int)
    learning_rate: float = setting(1e-4, "optimisation", "AdamW learning rate", type=float)
    lr_scheduler: Optional[str] = setting(None, "optimisation", "any diffusers.optimization scheduler name (default: "
                                          "constant, or constant_with_warmup when --lr_warmup_steps is given)")
    lr_warmup_steps: int = setting(0, "optimisation", "linear warm-up steps of the schedule (runs recorded before it "
                                   "acted trained without warm-up; docs/usage.md)", type=int)
    adam_beta1: float = setting(0.9, "optimisation", "AdamW beta1", type=float)
    adam_beta2: float = setting(0.999, "optimisation", "AdamW beta2", type=float)
    adam_weight_decay: float = setting(0.0, "optimisation", "AdamW weight decay", type=float)
    adam_epsilon: float = setting(1e-8, "optimisation", "AdamW epsilon", type=float)
    max_grad_norm: float = setting(1.0, "optimisation", "gradients are clipped to this norm", type=float)
    mixed_precision: Optional[str] = setting(None, "optimisation", "autocast dtype (default: accelerate's "
                                             "configuration)", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = setting(False, "optimisation", "recompute each block in backward (less memory, more "
                                           "time)", action="store_true")
    use_ema: bool = setting(False, "optimisation", "keep an EMA of the weights (EMAModel) and save it as the output",
                            action="store_true")
    ema_decay: float = setting(0.9999, "optimisation", "EMA decay", type=float)
    seed: int = setting(0, "optimisation", "seed of the initialisation, noise, label drops and data order", type=int)
    # -- output
    output_dir: str = setting(REQUIRED, "output", "run folder: checkpoints, logs and, at the end, the pipeline",
                              required=True)
    checkpointing_steps: int = setting(500, "output", "write a checkpoint every N steps", type=positive_int)
    checkpoints_total_limit: Optional[int] = setting(None, "output", "keep only the newest N checkpoints (default: all)",
                                                     type=positive_int)
    resume_from_checkpoint: Optional[str] = setting(None, "output", "'latest' or a checkpoint folder")
    overwrite: bool = setting(False, "output", "remove an earlier run in output_dir and train from step 0 (default: "
                              "refuse)", action="store_true")
    logging_steps: int = setting(10, "output", "log.csv row every N steps", type=positive_int)
    validation_steps: Optional[int] = setting(None, "output", "write a sample grid every N steps", type=positive_int)
    validation_labels: Optional[List[int]] = setting(None, "output", "labels of the validation grid (default: the first "
                                                     "8 classes)", type=int, nargs="+")
    validation_inference_steps: int = setting(25, "output", "sampling steps of the validation grid; saved as the "
                                              "pipeline's default steps", type=positive_int)
    validation_guidance_scale: float = setting(4.0, "output", "guidance of the validation grid; saved as the "
                                               "pipeline's default guidance", type=float)
    report_to: str = setting("auto", "output", "'auto' (tensorboard when installed), 'tensorboard' or 'none'")

    def __post_init__(self):
        for name in ("softmax_layers", "attention_types", "timestep_range", "validation_labels"):
            if getattr(self, name) is not None:  # lists, as argparse gives them (tuples from Python are welcome)
                object.__setattr__(self, name, list(getattr(self, name)))
        for f in dataclasses.fields(self):  # one type per setting, as the flags give it: 0 and 0.0 are one rate
            value = getattr(self, f.name)
            if f.metadata.get("argparse", {}).get("type") is float and isinstance(value, int) \
                    and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        for problem in self.problems():
            raise ValueError(problem)
        if self.lr_scheduler is None:
            object.__setattr__(self, "lr_scheduler", "constant_with_warmup" if self.lr_warmup_steps else "constant")

    def problems(self) -> List[str]:
        """What is wrong with these settings taken together (each flag's own type is argparse's to check)."""
        found = []
        for f in dataclasses.fields(self):  # what argparse's types check on the command line
            value = getattr(self, f.name)
            if f.metadata.get("argparse", {}).get("type") is positive_int and value is not None \
                    and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                found.append(f"--{f.name} must be a positive integer, got {value!r}")
        if (self.train_data_dir is None) == (self.dataset is None):
            found.append("give exactly one of --train_data_dir and --dataset")
        if self.cache_latents and not (self.vae or self.init_from):
            found.append("--cache_latents needs a VAE: --vae, or an --init_from pipeline that has one")
        if self.softmax_layers is not None and self.attention_types is not None:
            found.append("give --softmax_layers or --attention_types, not both")
        weight = self.attention_distillation_weight
        if weight < 0 or not math.isfinite(weight):
            found.append(f"--attention_distillation_weight must be a finite number >= 0, got {weight}")
        if weight and not (self.teacher or self.init_from):
            found.append("--attention_distillation_weight needs a teacher: --teacher, or --init_from (its own softmax "
                         "attention)")
        if self.class_embedding == "new" and not self.init_from:
            found.append("--class_embedding new needs --init_from (a model built from scratch has the data's classes "
                         "already)")
        if not (self.validation_guidance_scale >= 0 and math.isfinite(self.validation_guidance_scale)):
            found.append(f"--validation_guidance_scale must be a finite number >= 0, got {self.validation_guidance_scale}")
        if not 0 <= self.class_dropout_prob < 1:
            found.append("--class_dropout_prob must be in [0, 1)")
        found += self._objective_problems()
        return found

    def _objective_problems(self) -> List[str]:
        found = []
        if self.objective == "flow" and self.prediction_type != "epsilon":
            found.append("--prediction_type is DDPM's choice; a flow model predicts the velocity (leave it out with "
                         "--objective flow)")
        if self.objective == "flow" and self.variance_loss == "vlb":
            found.append("--variance_loss vlb is DDPM's variational bound; a flow model has no learned variance to "
                         "train (use --variance_loss none, or --objective ddpm)")
        if not self.logit_std > 0:
            found.append(f"--logit_std must be positive, got {self.logit_std}")
        if self.lr_warmup_steps < 0:
            found.append(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            found.append(f"--lr_scheduler constant has no warm-up, so --lr_warmup_steps {self.lr_warmup_steps} would do "
                         "nothing: use constant_with_warmup (the default when --lr_warmup_steps is given) or drop "
                         "--lr_warmup_steps")
        low_high = self.timestep_range
        if low_high and not (len(low_high) == 2 and 0 <= low_high[0] < low_high[1] <= NUM_TRAIN_TIMESTEPS):
            found.append(f"--timestep_range LOW HIGH needs 0 <= LOW < HIGH <= {NUM_TRAIN_TIMESTEPS}, got {low_high}")
        return found

    # -- the command line -------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, argv: Optional[Sequence[str]] = None, prog: str = "nala-train",
                   description: Optional[str] = None) -> "RunConfig":
        """The config of ``nala-train``'s flags (``sys.argv`` by default); a bad combination is a usage error
        (exit status 2), as a bad flag is."""
        parser = build_parser(prog, description)
        namespace = parser.parse_args(argv)
        try:
            return RunConfig(**vars(namespace))
        except ValueError as error:
            parser.error(str(error))

    def as_args(self) -> Dict[str, Any]:
        """The flat record of the run (``args.json``, the checkpoints' ``args``): every field by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def but(self, **changes) -> "RunConfig":
        """The same run with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @property
    def attention_overrides(self) -> Dict[str, Any]:
        """The model-config keys the flags set: attention options, type, CPE and objective (None: unset)."""
        from nala_diffusion.models.options import config_key

        overrides = {config_key(k): getattr(self, k) for k in FIELDS if getattr(self, k) is not None}
        for key in ("attention_type", "use_cpe", "objective"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        return overrides

    @property
    def layout_overrides(self) -> Dict[str, Any]:
        """The hybrid layout settings, as keyword arguments of ``convert_dit_to_nala`` / ``preset_config``."""
        if self.softmax_layers is not None:
            return {"softmax_layers": self.softmax_layers}
        if self.attention_types is not None:
            return {"attention_types": self.attention_types}
        return {}


def _option_field(name: str) -> Tuple[str, Any, Any]:
    # an attention option: None means "as the model or preset has it"; its flag comes from add_option_flags
    return name, Optional[FIELDS[name].type], field(default=None, metadata={"group": "model", "option": True})


RunConfig = dataclasses.make_dataclass(
    "RunConfig", [_option_field(name) for name in FIELDS], bases=(RunSettings,), frozen=True, kw_only=True,
    namespace={"__doc__": "A training run: every :class:`RunSettings` field and one per attention option "
                          "(``power_scale``, ``use_lepe``, ...; None keeps the model's). Checked when made.",
               "__module__": __name__})


def flags_of(settings: Dict[str, Any]) -> List[str]:
    """The ``nala-train`` flags that give ``settings`` (RunConfig field names and values, in their order):
    what a study records as a run's ``arguments``. Attention options take their model-config spelling
    (``eps`` is ``--attention_eps``), switches their on/off form, and ``attention_type`` its short flag
    ``--attention``."""
    from nala_diffusion.models.options import config_key

    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    flags: List[str] = []
    for name, value in settings.items():
        if name not in known:
            raise ValueError(f"unknown training setting {name!r}; RunConfig has {sorted(known)}")
        meta = known[name].metadata
        if meta.get("option"):
            flag, action = f"--{config_key(name)}", argparse.BooleanOptionalAction if isinstance(value, bool) else None
        else:
            flag, action = meta["flags"][-1] if meta["flags"] else f"--{name}", meta["argparse"].get("action")
        if action is argparse.BooleanOptionalAction:
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif action in ("store_true", "store_false"):
            flags += [flag] if bool(value) == (action == "store_true") else []
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def build_parser(prog: str = "nala-train", description: Optional[str] = None) -> argparse.ArgumentParser:
    """``nala-train``'s parser, generated from :class:`RunConfig`'s fields."""
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, prog=prog, description=description)
    groups = {name: parser.add_argument_group("optimisation" if name == "optimisation" else name) for name in GROUPS}
    layout = groups["model"].add_mutually_exclusive_group()
    for f in dataclasses.fields(RunSettings):
        meta = f.metadata
        container = layout if f.name in ("softmax_layers", "attention_types") else groups[meta["group"]]
        kwargs = dict(meta["argparse"])
        if f.default is not REQUIRED:
            kwargs["default"] = f.default
        elif f.default_factory is not REQUIRED:
            kwargs["default"] = f.default_factory()
        container.add_argument(*(meta["flags"] or (f"--{f.name}",)), dest=f.name, help=meta["help"], **kwargs)
        if f.name == "attention_types":  # the options follow the layout flags, as they always have
            add_option_flags(groups["model"], defaults=OPTION_DEFAULTS)
    return parser
