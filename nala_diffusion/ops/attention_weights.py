"""Explicit attention weights of every kernel kind, their entropy and the norm effect.

N x N matrices in float64, for analysis only (keep N to a few thousand, or subsample the queries):
the entropy tool (``nala-entropy``), the saturation study and the resolution-aware sharpness
calibration of the high-resolution pipeline use these. The NaLa weights are built from the
kernels' own feature maps, with a layer's own options.
"""

from __future__ import annotations

from typing import Optional

import torch

from nala_diffusion.ops.feature_maps import nala_key_features, nala_query_features

KINDS = ("softmax", "relu_linear", "elu_linear", "nala", "norm_cancelling")
QUERY_OPTIONS = ("power_scale", "power_offset", "inhibit", "angle_sharpness", "eps", "norm_scale")
KEY_OPTIONS = ("key_power", "inhibit", "angle_sharpness", "eps")
#: alpha of the norm-cancelling kind's |q|^alpha factor (any value gives the same weights)
CANCELLING_ALPHA = 1.0
#: the norm effect rescales every query by this factor up and down, direction kept
NORM_STEP = 1.1


def attention_weights(kind: str, q: torch.Tensor, k: torch.Tensor, options: Optional[dict] = None) -> torch.Tensor:
    """(..., N, d), (..., M, d) -> (..., N, M) rows summing to 1 (rows of zeros stay zero), in float64.

    ``options`` are the NaLa kernel's (``NaLaAttnProcessor.kernel_options()``; per-head tensors need
    q and k shaped (batch, heads, N, d)); ``None`` means the kernel's defaults. For ``softmax`` the
    only option is ``logit_scale`` (the resolution-aware sharpness, 1 by default). The kinds:

    - ``softmax``: softmax(logit_scale q.k / sqrt(d));
    - ``relu_linear``: ReLU(q).ReLU(k); ``elu_linear``: (1 + ELU(q)).(1 + ELU(k));
    - ``nala``: phi_q(q).phi_k(k) with the layer's own options;
    - ``norm_cancelling``: |q_i|^alpha (1 + cos(q_i, k_j)) / 2, NaLaFormer as popular write-ups
      state it; the norm factor cancels in the normalisation, so the norm cannot change the entropy.
    """
    q, k = q.double(), k.double()
    if kind == "softmax":
        scale = (options or {}).get("logit_scale", 1.0) / q.shape[-1] ** 0.5
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    if kind == "relu_linear":
        scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    elif kind == "elu_linear":
        scores = (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-1, -2)
    elif kind == "nala":
        options = options or {}
        phi_q = nala_query_features(q, **{n: options[n] for n in QUERY_OPTIONS if n in options})
        phi_k = nala_key_features(k, **{n: options[n] for n in KEY_OPTIONS if n in options})
        scores = phi_q @ phi_k.transpose(-1, -2)
    elif kind == "norm_cancelling":
        norms = q.norm(dim=-1, keepdim=True)
        cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
        scores = norms ** CANCELLING_ALPHA * (1 + cosine) / 2
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    return -(weights * torch.log(weights.clamp_min(1e-300))).sum(-1)


def norm_effect(kind: str, q: torch.Tensor, k: torch.Tensor, options: Optional[dict] = None) -> float:
    """dH / d(log |q|): the mean change of a query's attention entropy when its norm alone changes
    (each query scaled by ``NORM_STEP`` and by its inverse, direction kept), per unit of log norm.

    A causal measure of norm-awareness: exactly 0 for ReLU linear and the norm-cancelling kind, 0
    for NaLa when its power is saturated, negative when a larger norm sharpens the attention.
    Unlike the correlation it is not confounded by norms that go with the query's direction."""
    up = entropy(attention_weights(kind, q * NORM_STEP, k, options))
    down = entropy(attention_weights(kind, q / NORM_STEP, k, options))
    slope = (up - down) / (2 * torch.log(torch.tensor(NORM_STEP, dtype=torch.float64)))
    return float(slope[torch.isfinite(slope)].mean())


def mean_entropy(kind: str, q: torch.Tensor, k: torch.Tensor, options: Optional[dict] = None,
                 max_entries: int = 2**24) -> float:
    """The mean attention entropy per query, with the queries subsampled (evenly) so that the weight
    matrix holds at most ``max_entries`` entries; q, k (batch, heads, N, d)."""
    keep = max(1, min(q.shape[-2], max_entries // max(1, q.shape[0] * q.shape[1] * k.shape[-2])))
    if keep < q.shape[-2]:
        q = q[..., torch.linspace(0, q.shape[-2] - 1, keep).round().long(), :]
    return float(entropy(attention_weights(kind, q, k, options)).mean())
