"""Explicit attention weights of every kernel kind, their entropy and the norm effect.

N x N matrices in float64, for analysis only (keep N to a few thousand, or subsample the queries):
the entropy tool (``nala-entropy``), the saturation study and the resolution-aware sharpness
calibration of the high-resolution pipeline use these. They are built from the kernels' own feature
maps and the parameters object a layer hands its kernel (``processor.kernel_params()``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from nala_diffusion.ops.feature_maps import kernel_feature_map, nala_key_features, nala_query_features
from nala_diffusion.ops.params import LinearParams, NaLaParams, SoftmaxParams, default_params

KINDS = ("softmax", "relu_linear", "elu_linear", "nala", "norm_cancelling")
Params = Optional[Union[SoftmaxParams, LinearParams, NaLaParams]]
#: alpha of the norm-cancelling kind's |q|^alpha factor (any value gives the same weights)
CANCELLING_ALPHA = 1.0
#: the norm effect rescales every query by this factor up and down, direction kept
NORM_STEP = 1.1


def attention_weights(kind: str, q: torch.Tensor, k: torch.Tensor, params: Params = None) -> torch.Tensor:
    """(..., N, d), (..., M, d) -> (..., N, M): the weights the kernel ``kind`` applies to the values, in float64.

    ``params`` is the kernel's parameters object, as a processor hands it to its kernel
    (``processor.kernel_params()``; per-head tensors need q and k shaped (batch, heads, N, d)); ``None``
    means the kernel's defaults. The kinds:

    - ``softmax``: softmax(logit_scale q.k / sqrt(d)), rows summing to 1;
    - ``relu_linear``: ReLU(q).ReLU(k); ``elu_linear``: (1 + ELU(q)).(1 + ELU(k));
    - ``nala``: phi_q(q).phi_k(k) with the layer's own parameters;
    - ``norm_cancelling``: |q_i|^alpha (1 + cos(q_i, k_j)) / 2, NaLaFormer as popular write-ups
      state it; the norm factor cancels in the normalisation, so the norm cannot change the entropy.

    The linear kinds divide by the row sum plus M eps, exactly as their readout phi_q S / (phi_q z + eps)
    does with S and z means over the M keys: their rows sum to just under 1 (rows of zeros stay zero).
    """
    q, k = q.double(), k.double()
    params = default_params(kind) if params is None else params
    if kind == "softmax":
        scale = params.logit_scale / math.sqrt(q.shape[-1])
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    if kind in ("relu_linear", "elu_linear"):
        feature_map = kind.removesuffix("_linear")
        scores = kernel_feature_map(q, feature_map) @ kernel_feature_map(k, feature_map).transpose(-1, -2)
    elif kind == "nala":
        scores = nala_query_features(q, params) @ nala_key_features(k, params).transpose(-1, -2)
    elif kind == "norm_cancelling":
        norms = q.norm(dim=-1, keepdim=True)
        cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
        scores = norms ** CANCELLING_ALPHA * (1 + cosine) / 2
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return scores / (scores.sum(-1, keepdim=True) + k.shape[-2] * params.eps).clamp_min(1e-300)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    return -(weights * torch.log(weights.clamp_min(1e-300))).sum(-1)


def norm_effect(kind: str, q: torch.Tensor, k: torch.Tensor, params: Params = None) -> float:
    """dH / d(log |q|): the mean change of a query's attention entropy when its norm alone changes
    (each query scaled by ``NORM_STEP`` and by its inverse, direction kept), per unit of log norm.

    A causal measure of norm-awareness: 0 for ReLU linear (up to the readout's eps, which a larger
    norm outweighs a little more) and exactly 0 for the norm-cancelling kind, 0 for NaLa when its power is saturated, negative when a larger norm sharpens the attention.
    Unlike the correlation it is not confounded by norms that go with the query's direction."""
    up = entropy(attention_weights(kind, q * NORM_STEP, k, params))
    down = entropy(attention_weights(kind, q / NORM_STEP, k, params))
    slope = (up - down) / (2 * torch.log(torch.tensor(NORM_STEP, dtype=torch.float64)))
    return float(slope[torch.isfinite(slope)].mean())


def mean_entropy(kind: str, q: torch.Tensor, k: torch.Tensor, params: Params = None,
                 max_entries: int = 2**24) -> float:
    """The mean attention entropy per query, with the queries subsampled (evenly) so that the weight
    matrix holds at most ``max_entries`` entries; q, k (batch, heads, N, d)."""
    keep = max(1, min(q.shape[-2], max_entries // max(1, q.shape[0] * q.shape[1] * k.shape[-2])))
    if keep < q.shape[-2]:
        q = q[..., torch.linspace(0, q.shape[-2] - 1, keep).round().long(), :]
    return float(entropy(attention_weights(kind, q, k, params)).mean())
