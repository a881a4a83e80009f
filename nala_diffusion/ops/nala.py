"""``nala_attention``: norm-aware linear attention (NaLaFormer, arXiv 2506.21137), choosing its path.

Every function of :mod:`nala_diffusion.ops` takes ``query``, ``key``, ``value`` shaped
``(batch, heads, tokens, head_dim)`` and returns ``(batch, heads, query_tokens, head_dim)`` in the
dtype of ``query``. Linear kernels compute in at least float32 (float16/bfloat16 are upcast, float64
stays float64) and never allocate a tokens x tokens matrix: they build a ``(features, head_dim)``
state from the keys and values once, then read it with every query:

    o_i = phi_q(q_i) . S / (phi_q(q_i) . z + eps),  S = mean_j phi_k(k_j) v_j^T,  z = mean_j phi_k(k_j)

with NaLa's feature maps (:mod:`nala_diffusion.ops.feature_maps`). A larger query norm raises the
direction's entries to a higher power, which sharpens the attention (the temperature effect of
softmax); unlike a scalar factor it does not cancel in the ratio. ``norm_scale`` (sigma) sets where
tanh bends: sigma = 1 is the official formula, which saturates (p = lambda (tau + 1) for every query)
once query norms exceed about 3, as they do in a DiT with head_dim 64; sigma near the typical query
norm keeps the power responsive (see :func:`~nala_diffusion.ops.feature_maps.query_power`).

The paths, one module each: ``dense`` (batched products: training on any device, inference on CUDA, and on
CPU wherever ``gather`` does not apply, i.e. with the cosine form or RoPE; chunked in inference), ``gather``
(relu_split inference without RoPE on CPU), ``fused`` (``torch.compile``), and ``reference`` (the formulas
written literally). The dense path's readout runs in Triton on CUDA (``backend``;
:mod:`~nala_diffusion.ops.triton_readout`).
"""

from __future__ import annotations

from typing import Optional

import torch

from nala_diffusion.ops import dense
from nala_diffusion.ops.common import check_qkv, compiling, compute_dtype, needs_grad
from nala_diffusion.ops.feature_maps import scaled_keys
from nala_diffusion.ops.gather import relu_split_gather
from nala_diffusion.ops.params import NaLaParams
from nala_diffusion.ops.readout import BACKENDS, triton_unusable
from nala_diffusion.ops.rope import RopeArg


def nala_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: Optional[NaLaParams] = None,
    *,
    rope: RopeArg = None,
    compile: bool = False,
    gather: Optional[bool] = None,
    backend: str = "auto",
    **overrides,
) -> torch.Tensor:
    """Norm-aware linear attention, O(tokens * head_dim^2) time and O(head_dim^2) state per head.

    Args:
        query, key, value: ``(batch, heads, tokens, head_dim)``; keys and values may have another
            token count than queries, and values another head_dim.
        params: the kernel's :class:`~nala_diffusion.ops.params.NaLaParams` (default: its defaults): lambda,
            tau, gamma, the inhibit form and its angle sharpness, eps, and sigma (1 is the official
            formula); lambda and sigma may be per-head tensors ``(heads,)``.
        **overrides: parameters replacing those of ``params``, e.g. ``inhibit="cosine"``.
        rope: rotary tables ``(cos, sin)`` broadcastable to ``(..., tokens, head_dim)`` (see
            :func:`~nala_diffusion.ops.rope.rope_2d_tables`), or a callable; each d-wide feature half
            is rotated on its own, in the numerator only, as in NaLaFormer's code.
        compile: without autograd, run the same feature functions fused by ``torch.compile``
            (:mod:`nala_diffusion.ops.fused`; the first call per shape compiles). Otherwise ignored.
        gather: without autograd and RoPE, for ``relu_split``: read the state by a gather-sum of the
            d feature rows each query uses (the default on CPU) instead of batched dense products
            (the default elsewhere).
        backend: the readout's implementation (:mod:`~nala_diffusion.ops.readout`): ``"auto"`` runs the
            Triton kernels on CUDA tensors (where Triton is installed and the shapes suit them) and torch
            elsewhere; ``"triton"`` asks for them (a ``RuntimeError`` on a device they cannot run on);
            ``"torch"`` never uses them.

    Returns:
        ``(batch, heads, query_tokens, value_head_dim)`` in ``query.dtype``.

    The 2d-wide features are never concatenated: the readout runs on their two d-wide halves. Keys
    are scaled per head before the power (:func:`~nala_diffusion.ops.feature_maps.scaled_keys`), so
    no finite input overflows. With autograd the features are recomputed in backward rather than
    stored when they are large.
    """
    check_qkv(query, key, value)
    params = NaLaParams.of(params, **overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and triton_unusable(query.device):
        raise RuntimeError(f"nala_attention(backend='triton'): {triton_unusable(query.device)}")
    if query.shape[-2] == 0:
        return query.new_empty(*query.shape[:3], value.shape[-1])
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    k, key_eps = scaled_keys(k, params)  # (B, H, M, d), (B, H, 1, 1)
    if needs_grad(q, k, v, *params.tensors()):
        return dense.memory_lean(dense.dense_nala, q, k, v, params, key_eps, rope, backend).to(query.dtype)
    if gather is None:  # traced by torch.compile, the dense path fuses; the gather's out= buffers do not trace
        gather = q.device.type == "cpu" and not compiling() and backend != "triton"
    if compile:
        from nala_diffusion.ops.fused import nala_attention_fused

        return nala_attention_fused(q, k, v, params, key_eps, rope=rope, gather=gather, backend=backend).to(query.dtype)
    if params.inhibit == "relu_split" and rope is None and gather:
        return relu_split_gather(q, k, v, params, key_eps).to(query.dtype)
    return dense.dense_inference(q, k, v, params, key_eps, rope, backend=backend).to(query.dtype)
