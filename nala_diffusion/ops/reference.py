"""NaLa written literally from the formulas, beside the fast paths: the naive reference the tests and
benchmarks compare them with."""

from __future__ import annotations

from typing import Optional

import torch

from nala_diffusion.ops.common import check_qkv, compute_dtype
from nala_diffusion.ops.feature_maps import nala_key_features, nala_query_features
from nala_diffusion.ops.params import NaLaParams
from nala_diffusion.ops.readout import linear_readout
from nala_diffusion.ops.rope import RopeArg, apply_rope


def nala_attention_explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: Optional[NaLaParams] = None,
    *,
    rope: RopeArg = None,
    **overrides,
) -> torch.Tensor:
    """NaLa written literally from the formulas: the 2d-wide features are built, then read out.

    Same arguments and result as :func:`~nala_diffusion.ops.nala.nala_attention`, slower and without its key scaling; the
    straightforward baseline of the benchmarks.
    """
    check_qkv(query, key, value)
    params = NaLaParams.of(params, **overrides)
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    phi_q = nala_query_features(q, params)  # (B, H, N, 2d)
    phi_k = nala_key_features(k, params)
    halves = None if rope is None else (lambda x: torch.cat([apply_rope(h, rope) for h in x.chunk(2, dim=-1)], -1))
    return linear_readout(phi_q, phi_k, v, params.eps, halves).to(query.dtype)  # RoPE turns each half on its own
