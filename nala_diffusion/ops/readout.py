"""The linear-attention readout o = phi_q . S / (phi_q . z + eps), for whole features or feature blocks,
in torch or in Triton (:mod:`~nala_diffusion.ops.triton_readout`, the same formula), chosen by ``backend``:

- ``"auto"`` (the default): Triton for CUDA tensors where Triton is installed and the inputs are ones its
  kernels take, torch otherwise (CPU, float64, blocks wider than 128, a RoPE callable, ...);
- ``"triton"``: the Triton kernels; a device they cannot run on is a ``RuntimeError`` saying so, inputs they
  do not take go to torch (never a wrong result);
- ``"torch"``: plain torch.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from nala_diffusion.ops.common import bmm, needs_grad
from nala_diffusion.ops.rope import RopeArg, apply_rope

BACKENDS = ("auto", "torch", "triton")


def triton_unusable(device: torch.device) -> Optional[str]:
    """Why the Triton readout cannot run on ``device`` (None when it can): it needs Triton, and CUDA tensors
    (or CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``, for testing)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (it comes with torch's CUDA builds on Linux)"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return None
    return (f"the Triton readout runs on CUDA tensors and these are on {device.type}; use backend='auto' or 'torch' "
            "(on a CPU, TRITON_INTERPRET=1 set before Triton is imported runs the kernels in Triton's interpreter, "
            "for testing)")


def uses_triton(backend: str, q_parts, k_parts, value: torch.Tensor, eps, rope: RopeArg) -> bool:
    """Whether the readout of these inputs runs in Triton under ``backend`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and value.device.type != "cuda"):
        return False
    unusable = triton_unusable(value.device)
    if unusable:
        if backend == "triton":
            raise RuntimeError(f"backend='triton': {unusable}")
        return False
    from nala_diffusion.ops.triton_support import unsupported_reason

    return unsupported_reason(q_parts, k_parts, value, eps, rope) is None


def linear_readout(phi_q, phi_k, value, eps, rope: RopeArg = None, backend: str = "auto") -> torch.Tensor:
    """o = phi_q . S / (phi_q . z + eps), S = mean_j phi_k v^T, z = mean_j phi_k; rope on the
    numerator only. For the d-wide features of the linear baselines."""
    return split_readout((phi_q,), (phi_k,), value, eps, rope, backend)


def split_readout(q_parts, k_parts, value: torch.Tensor, eps, rope: RopeArg = None, backend: str = "auto") -> torch.Tensor:
    """o = sum_i rot(q_i) S_i / (sum_i q_i z_i + eps) for feature blocks q_i, k_i (B, H, N, F_i),
    which is the readout of the concatenated features without building them: S_i = mean_j rot(k_ij)
    v_j^T, z_i = mean_j k_ij. ``rope`` rotates each block on its own (numerator only); ``eps`` is a
    float or a (B, H, 1, 1) tensor. ``backend``: see the module docstring."""
    if uses_triton(backend, q_parts, k_parts, value, eps, rope):
        from nala_diffusion.ops.triton_readout import triton_split_readout

        return triton_split_readout(q_parts, k_parts, value, eps, rope)
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
