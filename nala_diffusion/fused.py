"""NaLa inference fused with ``torch.compile``: ``nala_attention(..., compile=True)``.

The eager kernel (:func:`~nala_diffusion.nala_attention`) runs each elementwise step of the feature
maps as its own pass over memory. Here the same formulas are written as one plain function of a
chunk of heads, which TorchInductor turns into a single fused loop per feature map (norm, tanh,
|u|^p = exp(p (log|q| - log r)), sign split or angles, and the concatenation), followed by the two
readout matmuls. Heads are processed in chunks so that the feature buffers stay small (large fresh
allocations are slow to touch on some machines).

Inference only: with autograd the eager kernel runs (its backward keeps O(tokens) memory). The
first call for a new shape compiles (seconds on a CPU; it needs a C++ compiler there).
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import _CHUNK_BYTES, _angle

_compiled = None


def nala_chunk(q, k, v, power_scale, power_offset: float, key_power: float, inhibit: str, angle_sharpness: float,
               eps: float) -> torch.Tensor:
    """NaLa on (heads, tokens, d) chunks, written as plain math for the compiler; ``power_scale`` is
    a (heads, 1, 1) tensor. Same formulas as :func:`~nala_diffusion.kernels.nala_attention`."""
    norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)  # (h, N, 1)
    power = power_scale * (power_offset + torch.tanh(norm))
    q_magnitude = torch.exp(power * (torch.log(q.abs()) - torch.log(norm.clamp_min(eps))))  # |u|^p
    k_magnitude = k.abs() ** key_power  # |k|^gamma
    if inhibit == "relu_split":
        signed = torch.copysign(q_magnitude, q)
        phi_q = torch.cat([torch.relu(signed), torch.relu(-signed)], dim=-1)  # (h, N, 2d)
        k_signed = torch.copysign(k_magnitude, k)
        phi_k = torch.cat([torch.relu(k_signed), torch.relu(-k_signed)], dim=-1)  # (h, M, 2d)
    else:  # cosine
        q_angle = _angle(q / norm.clamp_min(eps), angle_sharpness)
        k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
        k_angle = _angle(k / k_norm.clamp_min(eps), angle_sharpness)
        phi_q = torch.cat([q_magnitude * torch.cos(q_angle), q_magnitude * torch.sin(q_angle)], dim=-1)
        phi_k = torch.cat([k_magnitude * torch.cos(k_angle), k_magnitude * torch.sin(k_angle)], dim=-1)
    num_keys = k.shape[-2]
    state = torch.bmm(phi_k.transpose(1, 2), v) / num_keys  # (h, 2d, d)
    key_mean = phi_k.mean(dim=1).unsqueeze(-1)  # (h, 2d, 1)
    return torch.bmm(phi_q, state) / (torch.bmm(phi_q, key_mean) + eps)  # (h, N, d)


def compiled_chunk():
    """The compiled :func:`nala_chunk`, built once per process."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(nala_chunk, dynamic=None)
    return _compiled


@torch.no_grad()
def nala_attention_fused(q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps,
                         heads_per_chunk: Optional[int] = None) -> torch.Tensor:
    """(batch, heads, tokens, d) in the compute dtype -> the same shape; see the module docstring."""
    batch, heads, tokens, dim = q.shape
    num_keys = k.shape[-2]
    if torch.is_tensor(power_scale):
        scales = power_scale.to(device=q.device, dtype=q.dtype).reshape(-1)
        if scales.numel() == 1:
            scales = scales.expand(heads)
    else:
        scales = torch.full((heads,), float(power_scale), device=q.device, dtype=q.dtype)
    if scales.numel() != heads:
        raise ValueError(f"a per-head power_scale needs {heads} entries (one per head), got {scales.numel()}")
    scales = scales.view(heads, 1, 1)
    step = heads_per_chunk or max(1, _CHUNK_BYTES // ((tokens + num_keys) * 2 * dim * q.element_size()))
    kernel = compiled_chunk()
    out = q.new_empty(batch, heads, tokens, dim)
    for b in range(batch):
        for h in range(0, heads, step):
            part = slice(h, min(heads, h + step))
            try:
                out[b, part] = kernel(q[b, part], k[b, part], v[b, part], scales[part], power_offset, key_power,
                                      inhibit, angle_sharpness, eps)
            except Exception as error:  # compilation errors come in many types
                if type(error).__module__.startswith("torch._dynamo") or "inductor" in repr(error).lower():
                    raise RuntimeError(
                        "nala_attention(compile=True) could not compile its kernel with torch.compile "
                        f"(on CPU TorchInductor needs a C++ compiler): {error}. Use compile=False."
                    ) from error
                raise
    return out
