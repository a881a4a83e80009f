"""The linear-attention readout o = phi_q . S / (phi_q . z + eps), for whole features or feature blocks."""

from __future__ import annotations

import torch

from nala_diffusion.ops.common import bmm, needs_grad
from nala_diffusion.ops.rope import RopeArg, apply_rope


def linear_readout(phi_q, phi_k, value, eps, rope: RopeArg = None) -> torch.Tensor:
    """o = phi_q . S / (phi_q . z + eps), S = mean_j phi_k v^T, z = mean_j phi_k; rope on the
    numerator only. For the d-wide features of the linear baselines."""
    return split_readout((phi_q,), (phi_k,), value, eps, rope)


def split_readout(q_parts, k_parts, value: torch.Tensor, eps, rope: RopeArg = None) -> torch.Tensor:
    """o = sum_i rot(q_i) S_i / (sum_i q_i z_i + eps) for feature blocks q_i, k_i (B, H, N, F_i),
    which is the readout of the concatenated features without building them: S_i = mean_j rot(k_ij)
    v_j^T, z_i = mean_j k_ij. ``rope`` rotates each block on its own (numerator only); ``eps`` is a
    float or a (B, H, 1, 1) tensor."""
    batch, heads, tokens, _ = q_parts[0].shape
    num_keys, dim = value.shape[-2], value.shape[-1]
    value = value.reshape(batch * heads, num_keys, dim)
    numerator = denominator = None
    for q_i, k_i in zip(q_parts, k_parts):
        key_mean = k_i.reshape(batch * heads, num_keys, -1).mean(dim=1).unsqueeze(-1)  # (BH, F, 1)
        den_i = bmm(q_i.reshape(batch * heads, tokens, -1), key_mean)  # (BH, N, 1)
        q_i, k_i = apply_rope(q_i, rope), apply_rope(k_i, rope)
        state = bmm(k_i.reshape(batch * heads, num_keys, -1).transpose(1, 2), value) / num_keys  # (BH, F, d)
        num_i = bmm(q_i.reshape(batch * heads, tokens, -1), state)  # (BH, N, d)
        numerator = num_i if numerator is None else numerator + num_i
        denominator = den_i if denominator is None else denominator + den_i
    if torch.is_tensor(eps):
        eps = eps.expand(batch, heads, 1, 1).reshape(batch * heads, 1, 1)
    if needs_grad(numerator, denominator):
        return (numerator / (denominator + eps)).view(batch, heads, tokens, dim)
    return numerator.div_(denominator.add_(eps)).view(batch, heads, tokens, dim)
