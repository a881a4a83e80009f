"""The kernels' parameters, declared here once: frozen objects with their defaults and validation,
handed whole to the kernels and to the analysis functions (:mod:`~nala_diffusion.ops.attention_weights`).

- :class:`SoftmaxParams`: the logit scale (the resolution-aware sharpness);
- :class:`LinearParams`: what every linear kernel takes (``eps``);
- :class:`NaLaParams`: NaLa's feature-map parameters, on top of those.

The processors, the model config and the command-line flags (:mod:`nala_diffusion.models.options`)
take their defaults from these classes. This module is the bottom of the package: plain torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

INHIBIT_MODES = ("relu_split", "cosine")
Scale = Union[float, torch.Tensor]


def check_positive(**values) -> None:
    """Float options that must be positive and finite (tensors are left to their owners, to avoid a device sync)."""
    for name, value in values.items():
        if torch.is_tensor(value):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class _Params:
    _names: tuple = ()  # the field names, set below each class (dataclasses.fields does not trace in torch.compile)

    @classmethod
    def of(cls, params=None, **overrides):
        """``params`` (default: the defaults) with ``overrides`` replaced, validated."""
        unknown = sorted(set(overrides) - set(cls._names))
        if unknown:
            raise TypeError(f"{cls.__name__} has no parameter(s) {unknown}; its parameters: {cls._names}")
        if params is None:
            return cls(**overrides).validate()
        if not isinstance(params, cls):
            raise TypeError(f"params must be a {cls.__name__}, got {type(params).__name__}")
        return (params.replace(**overrides) if overrides else params).validate()

    @classmethod
    def names(cls) -> tuple:
        return cls._names

    def replace(self, **values):
        """A copy with ``values`` replaced (``dataclasses.replace``, written out so that it traces)."""
        return type(self)(**{**{name: getattr(self, name) for name in self._names}, **values})

    def validate(self):
        return self

    def detached(self):
        """The same parameters with every tensor detached (for analysis without autograd)."""
        return self.replace(**{name: getattr(self, name).detach() for name in self._names
                               if torch.is_tensor(getattr(self, name))})


@dataclasses.dataclass(frozen=True)
class SoftmaxParams(_Params):
    """softmax(logit_scale q.k / sqrt(d)); ``logit_scale`` is the resolution-aware sharpness (1: as trained)."""

    logit_scale: float = 1.0

    def validate(self) -> "SoftmaxParams":
        check_positive(logit_scale=self.logit_scale)
        return self


@dataclasses.dataclass(frozen=True)
class LinearParams(_Params):
    """What every linear kernel takes: ``eps`` guards the readout's denominator (and NaLa's query
    normalisation, where it must be positive; 0 is allowed for the baselines)."""

    eps: float = 1e-6

    def validate(self) -> "LinearParams":
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        return self


@dataclasses.dataclass(frozen=True)
class NaLaParams(LinearParams):
    """NaLa's parameters: p(r) = power_scale (power_offset + tanh(r / norm_scale)) for a query of
    norm r; phi_q = |u|^p split by ``inhibit``, phi_k = sign(k) |k|^key_power split the same way.

    ``power_scale`` (lambda) and ``norm_scale`` (sigma) are floats or per-head tensors ``(heads,)``
    (inside the kernel, tensors that broadcast against ``(batch, heads, tokens, 1)``). ``norm_scale=1``
    is NaLaFormer's formula."""

    power_scale: Scale = 3.0
    power_offset: float = 0.5
    key_power: float = 3.0
    inhibit: str = "relu_split"
    angle_sharpness: float = 20.0
    norm_scale: Scale = 1.0

    def validate(self) -> "NaLaParams":
        if self.inhibit not in INHIBIT_MODES:
            raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {self.inhibit!r}")
        check_positive(norm_scale=self.norm_scale, power_scale=self.power_scale, key_power=self.key_power,
                       eps=self.eps, angle_sharpness=self.angle_sharpness)
        if isinstance(self.power_offset, bool) or not isinstance(self.power_offset, (int, float)) \
                or not math.isfinite(self.power_offset):
            raise ValueError(f"power_offset must be a finite number, got {self.power_offset!r}")
        return self

    def per_head(self, q: torch.Tensor) -> "NaLaParams":
        """The same parameters with lambda and sigma as (batch, heads, 1, 1) tensors like ``q``."""
        return self.replace(power_scale=per_head(self.power_scale, q, expand=True),
                            norm_scale=per_head(self.norm_scale, q, expand=True))

    def rows(self, index) -> "NaLaParams":
        """Per-head parameters (from :meth:`per_head`) of the rows ``index`` of their leading axes."""
        return self.replace(power_scale=self.power_scale[index], norm_scale=self.norm_scale[index])

    def tensors(self) -> tuple:
        """The parameters that are tensors (for autograd checks)."""
        return tuple(v for v in (self.power_scale, self.norm_scale) if torch.is_tensor(v))


def per_head(value: Scale, like: torch.Tensor, expand: bool = False) -> Scale:
    """A per-head option (lambda, sigma, a denominator's eps) in the shape of ``like`` (batch, heads, ...):
    a float stays a float (``expand``: a (batch, heads, 1, 1) tensor), a tensor (heads,) or (1,) becomes
    (1, heads or 1, 1, 1) (``expand``: (batch, heads, 1, 1)); other tensors are taken as broadcastable."""
    if not torch.is_tensor(value):
        return like.new_full((like.shape[0], like.shape[1], 1, 1), float(value)) if expand else float(value)
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 1:
        if value.shape[0] not in (1, like.shape[1]):
            raise ValueError(f"a per-head tensor needs {like.shape[1]} entries (one per head) or one for all heads, "
                             f"got {value.shape[0]}")
        value = value.view(1, -1, 1, 1)
    return value.expand(like.shape[0], like.shape[1], 1, 1) if expand else value


for _cls in (SoftmaxParams, LinearParams, NaLaParams):
    _cls._names = tuple(f.name for f in dataclasses.fields(_cls))


#: the attention kinds and their kernels' parameter classes: the one declaration of which kinds exist (the
#: processors, the model options and the tools' choices are built from it)
KERNEL_PARAMS = {"nala": NaLaParams, "softmax": SoftmaxParams, "relu_linear": LinearParams, "elu_linear": LinearParams}


def default_params(kind: str) -> Optional[_Params]:
    """The default parameters of an attention kind's kernel (None for kinds without any)."""
    return KERNEL_PARAMS[kind]() if kind in KERNEL_PARAMS else None


KERNEL_DEFAULTS = NaLaParams()
