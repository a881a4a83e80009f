"""NaLa written literally from the formulas, beside the fast paths: the naive reference the tests and
benchmarks compare them with."""

from __future__ import annotations

from typing import Union

import torch

from nala_diffusion.models.options import DEFAULTS
from nala_diffusion.ops.common import check_qkv, compute_dtype
from nala_diffusion.ops.feature_maps import nala_key_features, nala_query_features
from nala_diffusion.ops.readout import linear_readout
from nala_diffusion.ops.rope import RopeArg, apply_rope


def nala_attention_explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    power_scale: Union[float, torch.Tensor] = DEFAULTS.power_scale,
    power_offset: float = DEFAULTS.power_offset,
    key_power: float = DEFAULTS.key_power,
    inhibit: str = DEFAULTS.inhibit,
    angle_sharpness: float = DEFAULTS.angle_sharpness,
    eps: float = DEFAULTS.eps,
    rope: RopeArg = None,
    norm_scale: Union[float, torch.Tensor] = DEFAULTS.norm_scale,
) -> torch.Tensor:
    """NaLa written literally from the formulas: the 2d-wide features are built, then read out.

    Same arguments and result as :func:`~nala_diffusion.ops.nala.nala_attention`, slower and without its key scaling; the
    straightforward baseline of the benchmarks.
    """
    check_qkv(query, key, value)
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    phi_q = nala_query_features(
        q, power_scale=power_scale, power_offset=power_offset, inhibit=inhibit, angle_sharpness=angle_sharpness,
        eps=eps, norm_scale=norm_scale,
    )  # (B, H, N, 2d)
    phi_k = nala_key_features(k, key_power=key_power, inhibit=inhibit, angle_sharpness=angle_sharpness, eps=eps)
    halves = None if rope is None else (lambda x: torch.cat([apply_rope(h, rope) for h in x.chunk(2, dim=-1)], -1))
    return linear_readout(phi_q, phi_k, v, eps, halves).to(query.dtype)  # RoPE turns each half on its own
