"""NaLa's parameters as one frozen object, passed down the kernel's paths instead of a chain of
positional arguments."""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from nala_diffusion.models.options import DEFAULTS, INHIBIT_MODES
from nala_diffusion.ops.common import check_positive, head_scales


@dataclasses.dataclass(frozen=True)
class NaLaParams:
    """The options of :func:`~nala_diffusion.ops.nala.nala_attention` that shape the feature maps.

    ``power_scale`` (lambda) and ``norm_scale`` (sigma) are floats or per-head tensors ``(heads,)``
    (or, inside the kernel, tensors that broadcast against ``(batch, heads, tokens, 1)``)."""

    power_scale: Union[float, torch.Tensor] = DEFAULTS.power_scale
    power_offset: float = DEFAULTS.power_offset
    key_power: float = DEFAULTS.key_power
    inhibit: str = DEFAULTS.inhibit
    angle_sharpness: float = DEFAULTS.angle_sharpness
    eps: float = DEFAULTS.eps
    norm_scale: Union[float, torch.Tensor] = DEFAULTS.norm_scale

    def validate(self) -> "NaLaParams":
        if self.inhibit not in INHIBIT_MODES:
            raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {self.inhibit!r}")
        check_positive(norm_scale=self.norm_scale, power_scale=self.power_scale, key_power=self.key_power, eps=self.eps)
        return self

    def per_head(self, q: torch.Tensor) -> "NaLaParams":
        """The same parameters with lambda and sigma as (batch, heads, 1, 1) tensors like ``q``."""
        return dataclasses.replace(self, power_scale=head_scales(self.power_scale, q),
                                   norm_scale=head_scales(self.norm_scale, q))

    def rows(self, index) -> "NaLaParams":
        """Per-head parameters (from :meth:`per_head`) of the rows ``index`` of the first two axes."""
        return dataclasses.replace(self, power_scale=self.power_scale[index], norm_scale=self.norm_scale[index])

    @property
    def query_options(self) -> dict:
        return {"power_scale": self.power_scale, "power_offset": self.power_offset, "inhibit": self.inhibit,
                "angle_sharpness": self.angle_sharpness, "eps": self.eps, "norm_scale": self.norm_scale}

    @property
    def key_options(self) -> dict:
        return {"key_power": self.key_power, "inhibit": self.inhibit, "angle_sharpness": self.angle_sharpness,
                "eps": self.eps}

    def tensors(self) -> tuple:
        """The parameters that are tensors (for autograd checks)."""
        return tuple(v for v in (self.power_scale, self.norm_scale) if torch.is_tensor(v))
