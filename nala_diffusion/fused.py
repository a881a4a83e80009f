"""NaLa inference fused with ``torch.compile``: ``nala_attention(..., compile=True)``.

The eager kernel (:func:`~nala_diffusion.nala_attention`) runs each elementwise step of the feature
maps as its own pass over memory. Compiled, TorchInductor turns each feature map into a single
fused loop (norm, tanh, |u|^p = exp(p (log|q| - log r)), sign split or angles, concatenation):
for ``relu_split`` the two feature functions of the eager kernel are compiled and the readout stays
the same (gather-sum on CPU); for ``cosine`` one plain function of a chunk of heads, features and
readout matmuls, is compiled. Heads are processed in chunks so that the feature buffers stay small
(large fresh allocations are slow to touch on some machines).

Inference only: with autograd the eager kernel runs (its backward keeps O(tokens) memory). The
first call for a new shape compiles (seconds on a CPU; it needs a C++ compiler there).
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import (
    _CHUNK_BYTES,
    _angle,
    _feature_index,
    _relu_split_inference,
    _signed_key_power,
    head_scales,
    query_power,
)

_compiled = {}


def compilable_query_terms(q, power_scale, power_offset: float, eps: float, norm_scale):
    """:func:`nala_diffusion.kernels.relu_split_query_terms` as plain code for the compiler."""
    norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)  # (h, N, 1)
    power = query_power(norm, power_scale, power_offset, norm_scale)
    magnitude = torch.exp2(power * (torch.log2(q.abs()) - torch.log2(norm.clamp_min(eps))))  # |u|^p
    return magnitude, _feature_index(q)


def compilable_key_features(k, key_power):
    """:func:`nala_diffusion.kernels.relu_split_key_features` as plain code for the compiler."""
    k_signed = _signed_key_power(k, key_power)
    return torch.cat([torch.relu(k_signed), torch.clamp(k_signed, max=0)], dim=-1)


def cosine_chunk(q, k, v, power_scale, power_offset: float, key_power: float, angle_sharpness: float,
                 eps: float, norm_scale) -> torch.Tensor:
    """NaLa (``cosine``) on (heads, tokens, d) chunks, written as plain math for the compiler;
    ``power_scale`` and ``norm_scale`` are (heads, 1, 1) tensors. Same formulas as
    :func:`~nala_diffusion.nala_attention`."""
    norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)  # (h, N, 1)
    power = query_power(norm, power_scale, power_offset, norm_scale)
    q_magnitude = torch.exp(power * (torch.log(q.abs()) - torch.log(norm.clamp_min(eps))))  # |u|^p
    k_magnitude = k.abs() ** key_power  # |k|^gamma
    q_angle = _angle(q / norm.clamp_min(eps), angle_sharpness)
    k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    k_angle = _angle(k / k_norm.clamp_min(eps), angle_sharpness)
    phi_q = torch.cat([q_magnitude * torch.cos(q_angle), q_magnitude * torch.sin(q_angle)], dim=-1)  # (h, N, 2d)
    phi_k = torch.cat([k_magnitude * torch.cos(k_angle), k_magnitude * torch.sin(k_angle)], dim=-1)  # (h, M, 2d)
    num_keys = k.shape[-2]
    state = torch.bmm(phi_k.transpose(1, 2), v) / num_keys  # (h, 2d, d)
    key_mean = phi_k.mean(dim=1).unsqueeze(-1)  # (h, 2d, 1)
    return torch.bmm(phi_q, state) / (torch.bmm(phi_q, key_mean) + eps)  # (h, N, d)


def compiled(function):
    """``torch.compile(function)``, built once per process."""
    if function not in _compiled:
        _compiled[function] = torch.compile(function, dynamic=None)
    return _compiled[function]


def _compile_error(error: Exception) -> Exception:
    if type(error).__module__.startswith("torch._dynamo") or "inductor" in repr(error).lower():
        return RuntimeError(
            "nala_attention(compile=True) could not compile its kernel with torch.compile "
            f"(on CPU TorchInductor needs a C++ compiler): {error}. Use compile=False."
        )
    return error


@torch.no_grad()
def nala_attention_fused(q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps,
                         heads_per_chunk: Optional[int] = None, norm_scale=1.0) -> torch.Tensor:
    """(batch, heads, tokens, d) in the compute dtype -> the same shape; see the module docstring."""
    try:
        if inhibit == "relu_split":
            return _relu_split_inference(q, k, v, power_scale, power_offset, key_power, eps, norm_scale,
                                         query_terms=compiled(compilable_query_terms),
                                         key_features=compiled(compilable_key_features))
        return _cosine_fused(q, k, v, power_scale, power_offset, key_power, angle_sharpness, eps, heads_per_chunk,
                             norm_scale)
    except Exception as error:  # compilation errors come in many types
        raised = _compile_error(error)
        if raised is error:
            raise
        raise raised from error


def _cosine_fused(q, k, v, power_scale, power_offset, key_power, angle_sharpness, eps, heads_per_chunk, norm_scale):
    batch, heads, tokens, dim = q.shape
    num_keys = k.shape[-2]
    scales, sigmas = head_scales(power_scale, q), head_scales(norm_scale, q)  # (B, H, 1, 1) each
    step = heads_per_chunk or max(1, _CHUNK_BYTES // ((tokens + num_keys) * 2 * dim * q.element_size()))
    kernel = compiled(cosine_chunk)
    out = q.new_empty(batch, heads, tokens, v.shape[-1])
    for b in range(batch):
        for h in range(0, heads, step):
            part = slice(h, min(heads, h + step))
            out[b, part] = kernel(q[b, part], k[b, part], v[b, part], scales[b, part], power_offset, key_power,
                                  angle_sharpness, eps, sigmas[b, part])
    return out
