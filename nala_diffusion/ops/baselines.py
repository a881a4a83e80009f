"""The attentions NaLa is compared with: kernel linear attention (ReLU, as SANA; 1 + ELU) and softmax."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from nala_diffusion.ops.common import check_qkv, compute_dtype
from nala_diffusion.ops.feature_maps import kernel_feature_map
from nala_diffusion.ops.params import LinearParams, SoftmaxParams
from nala_diffusion.ops.readout import linear_readout
from nala_diffusion.ops.rope import RopeArg, apply_rope


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: Optional[LinearParams] = None,
    *,
    feature_map: str = "relu",
    rope: RopeArg = None,
    backend: str = "auto",
    **overrides,
) -> torch.Tensor:
    """Kernel linear attention: ``"relu"`` (as SANA) or ``"elu"`` (1 + ELU, Katharopoulos et al.).
    ``params``: :class:`~nala_diffusion.ops.params.LinearParams` (``eps``), replaced by ``overrides``;
    ``backend``: the readout's implementation, as for :func:`~nala_diffusion.ops.nala.nala_attention`."""
    check_qkv(query, key, value)
    params = LinearParams.of(params, **overrides)
    dtype = compute_dtype(query.dtype)
    phi_q = kernel_feature_map(query.to(dtype), feature_map)  # (B, H, N, d)
    phi_k = kernel_feature_map(key.to(dtype), feature_map)
    return linear_readout(phi_q, phi_k, value.to(dtype), params.eps, rope, backend).to(query.dtype)


def softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: Optional[SoftmaxParams] = None,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    rope: RopeArg = None,
    **overrides,
) -> torch.Tensor:
    """Softmax attention through ``torch.nn.functional.scaled_dot_product_attention``: the logits
    q.k / sqrt(head_dim) times ``params.logit_scale`` (:class:`~nala_diffusion.ops.params.SoftmaxParams`)."""
    check_qkv(query, key, value)
    params = SoftmaxParams.of(params, **overrides)
    scale = None if params.logit_scale == 1.0 else params.logit_scale / math.sqrt(query.shape[-1])
    if rope is not None:
        query, key = apply_rope(query, rope), apply_rope(key, rope)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                          scale=scale)
