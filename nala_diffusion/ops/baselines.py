"""The attentions NaLa is compared with: kernel linear attention (ReLU, as SANA; 1 + ELU) and softmax."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nala_diffusion.models.options import DEFAULTS
from nala_diffusion.ops.common import check_qkv, compute_dtype
from nala_diffusion.ops.feature_maps import kernel_feature_map
from nala_diffusion.ops.readout import linear_readout
from nala_diffusion.ops.rope import RopeArg, apply_rope


def linear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    feature_map: str = "relu",
    eps: float = DEFAULTS.eps,
    rope: RopeArg = None,
) -> torch.Tensor:
    """Kernel linear attention: ``"relu"`` (as SANA) or ``"elu"`` (1 + ELU, Katharopoulos et al.)."""
    check_qkv(query, key, value)
    dtype = compute_dtype(query.dtype)
    phi_q = kernel_feature_map(query.to(dtype), feature_map)  # (B, H, N, d)
    phi_k = kernel_feature_map(key.to(dtype), feature_map)
    return linear_readout(phi_q, phi_k, value.to(dtype), eps, rope).to(query.dtype)


def softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    rope: RopeArg = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Softmax attention through ``torch.nn.functional.scaled_dot_product_attention``; ``scale``
    multiplies the logits (default 1 / sqrt(head_dim))."""
    check_qkv(query, key, value)
    if rope is not None:
        query, key = apply_rope(query, rope), apply_rope(key, rope)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                          scale=scale)
