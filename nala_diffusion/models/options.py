"""Every option of the attention processors, declared once.

The kernels' own parameters and their defaults live below, in :mod:`nala_diffusion.ops.params`.
:class:`AttentionOptions` builds the processor-level list on top of them (adding sigma's mode, the
learnable power and the extras LePE, gate and RoPE): the processors' constructors, the model config
(:class:`~nala_diffusion.NaLaDiTTransformer2DModel`), conversion, swapping and ``nala-train``'s flags
all read it. Each field says which attention types take it (``kinds``), its help text, and the
model-config key where that differs from the field name.

This module imports nothing heavy (no diffusers), so command-line tools can build their flags from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from nala_diffusion.ops.params import INHIBIT_MODES, KERNEL_DEFAULTS, KERNEL_PARAMS, LinearParams, check_positive

NORM_SCALE_MODES = ("fixed", "learnable", "calibrated")
#: sigma's one default. A NaLa model is built with per-head sigma buffers at norm_scale (1): training,
#: conversion and calibrate_norm_scale set them from real query norms; a model sampled before that says
#: so (a warning at sampling, ``uncalibrated`` in the saturation report). Configs written before the
#: option existed had sigma = 1 everywhere and load as "fixed" (see LEGACY_CONFIG_DEFAULTS).
DEFAULT_NORM_SCALE_MODE = "calibrated"
#: what a model config that lacks a key was built with (the key did not exist yet)
LEGACY_CONFIG_DEFAULTS = {"norm_scale_mode": "fixed"}
#: the attention types, as the kernels declare them (:data:`~nala_diffusion.ops.params.KERNEL_PARAMS`)
ATTENTION_TYPES = tuple(KERNEL_PARAMS)
#: positions above the training size: squeezed into the training range, or extended beyond it
POSITION_EMBEDDINGS = ("extend", "interpolate")
#: initialisations of the depthwise convolutions (LePE, CPE): NaLaFormer's, or identity at the start
CONV_INITS = ("zero", "trunc_normal")

_ALL = ATTENTION_TYPES
_LINEAR = tuple(kind for kind, params in KERNEL_PARAMS.items() if issubclass(params, LinearParams))
_NALA = ("nala",)


def _option(default, help: str, kinds=_NALA, config_key: str = None, choices=None):
    return field(default=default, metadata={"help": help, "kinds": kinds, "config_key": config_key, "choices": choices})


@dataclass(frozen=True)
class AttentionOptions:
    """The options of an attention processor; :meth:`for_type` keeps those a type takes."""

    # -- NaLa's kernel: p(r) = lambda (tau + tanh(r / sigma)), phi_q = |u|^p split by sign or angle
    power_scale: float = _option(KERNEL_DEFAULTS.power_scale, "lambda, the scale of the norm-aware power p(r) = lambda (tau + tanh(r / sigma))")
    power_offset: float = _option(KERNEL_DEFAULTS.power_offset, "tau, the offset of the power")
    key_power: float = _option(KERNEL_DEFAULTS.key_power, "gamma, the power of the keys (odd keeps the sign)")
    inhibit: str = _option(KERNEL_DEFAULTS.inhibit, "how features keep the sign: 'relu_split' (released code) or 'cosine' "
                           "(the paper's angular form)", choices=INHIBIT_MODES)
    angle_sharpness: float = _option(KERNEL_DEFAULTS.angle_sharpness, "s in the cosine form's angle (pi/4) tanh(s x / |x|)")
    eps: float = _option(KERNEL_DEFAULTS.eps, "guards the query normalisation and the readout's denominator", kinds=_LINEAR,
                         config_key="attention_eps")
    learnable_power: bool = _option(False, "make lambda a per-head parameter, trained with the model")
    norm_scale: float = _option(KERNEL_DEFAULTS.norm_scale, "sigma, the query-norm scale of the power (1 is NaLaFormer's formula); the start "
                                "value when norm_scale_mode is not fixed")
    norm_scale_mode: str = _option(DEFAULT_NORM_SCALE_MODE, "sigma per head: 'calibrated' (set from the query norms on "
                                   "real inputs, kept fixed; norm_scale until then), 'learnable' (calibrated, then "
                                   "trained) or 'fixed' (norm_scale everywhere)", choices=NORM_SCALE_MODES)
    # -- extras of every kernel (NaLaFormer's model)
    use_lepe: bool = _option(False, "add LePE, a depthwise convolution of V over the token grid added to the output",
                             kinds=_ALL)
    lepe_kernel_size: int = _option(3, "odd kernel size of the LePE convolution (NaLaFormer: 5)", kinds=_ALL)
    lepe_init: str = _option("zero", "initialisation of the LePE convolution: 'zero' (the layer starts without it; "
                             "conversions always) or 'trunc_normal' (std 0.02, bias 0, as NaLaFormer)", kinds=_ALL,
                             choices=CONV_INITS)
    use_gate: bool = _option(False, "output gate LayerNorm(o) * SiLU(W_g x)", kinds=_ALL)
    use_rope: bool = _option(False, "axial 2D rotary embedding (linear kernels: on the numerator's features)",
                             kinds=_ALL)
    rope_base: float = _option(10000.0, "rotary frequency base", kinds=_ALL)

    def __post_init__(self):
        check_positive(**{name: getattr(self, name) for name in ("power_scale", "key_power", "eps", "norm_scale",
                                                                   "rope_base", "angle_sharpness")})
        if isinstance(self.power_offset, bool) or not isinstance(self.power_offset, (int, float)) \
                or not math.isfinite(self.power_offset):
            raise ValueError(f"power_offset must be a finite number, got {self.power_offset!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
        for f in dataclasses.fields(self):  # one type per option: 3 and 3.0 are the same key_power
            if f.type in ("float", float):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        size = self.lepe_kernel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"lepe_kernel_size must be a positive odd integer, got {size!r}")

    @classmethod
    def for_type(cls, attention_type: str, **options) -> Dict[str, Any]:
        """Validated options of an ``attention_type`` processor: the defaults of the options it
        takes, overridden by ``options``; an option it does not take is a ``ValueError``."""
        allowed = option_names(attention_type)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{attention_type!r} attention does not take option(s) {unknown}; allowed: {sorted(allowed)}")
        values = dataclasses.asdict(cls(**options))
        return {name: values[name] for name in allowed}


FIELDS = {f.name: f for f in dataclasses.fields(AttentionOptions)}
DEFAULTS = AttentionOptions()


def check_attention_type(attention_type: str) -> str:
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
    return attention_type


def layer_attention_types(num_layers: int, attention_type: str = "nala", attention_types: Optional[Sequence[str]] = None,
                          softmax_layers: Optional[Sequence[int]] = None) -> List[str]:
    """The attention type of each of ``num_layers`` blocks.

    ``attention_types`` gives one kind per block; ``softmax_layers`` (block indices, negative counting
    from the end, as in NaLaFormer's released models, whose last stages are softmax) makes those blocks
    ``"softmax"`` and every other block ``attention_type``. Neither: every block is ``attention_type``.
    Wrong lengths, unknown kinds and indices out of range are ``ValueError``s naming them.
    """
    check_attention_type(attention_type)
    if attention_types is not None and softmax_layers is not None:
        raise ValueError("give attention_types or softmax_layers, not both")
    if attention_types is not None:
        if isinstance(attention_types, str) or not isinstance(attention_types, Sequence):
            raise ValueError(f"attention_types must be a list with one attention type per block, got {attention_types!r}")
        kinds = list(attention_types)
        if len(kinds) != num_layers:
            raise ValueError(f"attention_types has {len(kinds)} entries but the model has {num_layers} blocks: "
                             f"{kinds!r}; give one of {ATTENTION_TYPES} per block")
        for index, kind in enumerate(kinds):
            if kind not in ATTENTION_TYPES:
                raise ValueError(f"attention_types[{index}] is {kind!r}; each entry must be one of {ATTENTION_TYPES}")
        return kinds
    kinds = [attention_type] * num_layers
    for index in block_indices(softmax_layers or (), num_layers, "softmax_layers"):
        kinds[index] = "softmax"
    return kinds


def block_indices(indices: Sequence[int], num_layers: int, what: str = "layers") -> List[int]:
    """Block indices (negative counting from the end) as sorted non-negative ones; out of range or not
    an integer is a ``ValueError`` naming ``what``."""
    if isinstance(indices, (int, str)):
        indices = [indices]
    resolved = set()
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{what} must be block indices (integers), got {index!r}")
        if not -num_layers <= index < num_layers:
            raise ValueError(f"{what} index {index} is out of range for a model with {num_layers} blocks "
                             f"(allowed: {-num_layers}..{num_layers - 1})")
        resolved.add(index % num_layers)
    return sorted(resolved)


def option_names(attention_type: str) -> Tuple[str, ...]:
    """The options a processor of ``attention_type`` takes (besides its sizes)."""
    check_attention_type(attention_type)
    return tuple(name for name, f in FIELDS.items() if attention_type in f.metadata["kinds"])


def config_key(name: str) -> str:
    """The model-config key of option ``name`` (``eps`` is ``attention_eps`` there)."""
    return FIELDS[name].metadata["config_key"] or name


CONFIG_KEYS = tuple(config_key(name) for name in FIELDS)


def options_from_config(config: Mapping[str, Any], attention_type: Optional[str] = None) -> Dict[str, Any]:
    """The processor options recorded in a model config, for ``attention_type`` (default: the config's
    ``attention_type``; a hybrid model asks once per kind); keys the config lacks (older configs) take
    what those configs were built with (:data:`LEGACY_CONFIG_DEFAULTS`), else the defaults."""
    attention_type = attention_type or config.get("attention_type", "nala")
    names = option_names(attention_type)
    values = {name: config[config_key(name)] for name in names if config.get(config_key(name)) is not None}
    values.update({name: value for name, value in LEGACY_CONFIG_DEFAULTS.items()
                   if name in names and config_key(name) not in config})
    return AttentionOptions.for_type(attention_type, **values)


def _flag_type(f):
    return {"float": float, "int": int, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)


def add_option_flags(parser: argparse._ActionsContainer, defaults: Mapping[str, str] = None) -> Tuple[str, ...]:
    """One flag per option (``--power_scale``, ``--use_lepe/--no-use_lepe``, ...; ``eps`` is
    ``--attention_eps``), each with the option's type, choices and help text. Every flag defaults to
    None, "as the model or preset has it"; the help says what that means (``defaults`` replaces
    that text per option). Returns the option names, which are the flags' ``dest``."""
    defaults = dict(defaults or {})
    for name, f in FIELDS.items():
        kinds = "" if f.metadata["kinds"] == _ALL else f" [{', '.join(f.metadata['kinds'])}]"
        default = defaults.get(name, f"the model's, else {getattr(DEFAULTS, name)}")
        help_text = f"{f.metadata['help']}{kinds} (default: {default})"
        flag = f"--{config_key(name)}"
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(f), choices=f.metadata["choices"], default=None,
                                help=help_text)
    return tuple(FIELDS)
