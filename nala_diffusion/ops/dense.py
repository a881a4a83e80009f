"""NaLa as batched products of the feature halves: the differentiable path (training, CUDA) and its
chunked, memory-bounded inference."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from nala_diffusion.ops.feature_maps import nala_key_halves, nala_query_halves
from nala_diffusion.ops.params import NaLaParams, per_head
from nala_diffusion.ops.readout import split_readout
from nala_diffusion.ops.rope import RopeArg

DENSE_CHUNK_BYTES = 2 * 2**30  # features of one batched call; larger inputs go by chunks
RECOMPUTE_BYTES = 4 * 2**20  # recompute the features in backward when one (B, H, N, d) tensor holds this much


def dense_nala(q, k, v, params: NaLaParams, denominator_eps, rope: RopeArg = None, backend: str = "auto") -> torch.Tensor:
    """NaLa as batched products of the feature halves (no Python loop over heads); differentiable.
    ``denominator_eps``: a float or a (B, H, 1, 1) tensor (see
    :func:`~nala_diffusion.ops.feature_maps.scaled_keys`); ``backend`` of the readout
    (:func:`~nala_diffusion.ops.readout.split_readout`)."""
    return split_readout(nala_query_halves(q, params), nala_key_halves(k, params), v, denominator_eps, rope, backend)


@torch.no_grad()
def dense_inference(q, k, v, params: NaLaParams, denominator_eps, rope: RopeArg = None, kernel=None,
                    backend: str = "auto") -> torch.Tensor:
    """:func:`dense_nala` in one batched call, or by chunks of (batch x heads) only where the
    features would exceed ``DENSE_CHUNK_BYTES``."""
    kernel = kernel or dense_nala
    batch, heads, tokens, dim = q.shape
    bytes_per_head = (tokens + k.shape[-2]) * 2 * dim * q.element_size() * 2
    rows = max(1, DENSE_CHUNK_BYTES // bytes_per_head)
    if batch * heads <= rows:
        return kernel(q, k, v, params, denominator_eps, rope, backend)
    flat = lambda x: x.reshape(batch * heads, 1, *x.shape[2:])  # noqa: E731  (one head per "batch" row)
    heads_params = params.per_head(q)
    heads_params = heads_params.replace(power_scale=flat(heads_params.power_scale),
                                        norm_scale=flat(heads_params.norm_scale))
    q_, k_, v_, den = (flat(x) for x in (q, k, v, per_head(denominator_eps, q, expand=True)))
    out = q.new_empty(batch * heads, 1, tokens, v.shape[-1])
    for start in range(0, batch * heads, rows):
        part = slice(start, start + rows)
        out[part] = kernel(q_[part], k_[part], v_[part], heads_params.rows(part), den[part], rope, backend)
    return out.view(batch, heads, tokens, -1)


def memory_lean(function, q, *args):
    """``function(q, *args)``, whose backward recomputes the feature halves from q, k, v instead of
    keeping them (``torch.utils.checkpoint``) when they are large: training memory as for a d-wide
    linear attention. Below ``RECOMPUTE_BYTES`` per tensor storing them costs little and saves the
    recomputation (about one more forward of the kernel)."""
    if q.numel() * q.element_size() < RECOMPUTE_BYTES:
        return function(q, *args)
    return torch.utils.checkpoint.checkpoint(function, q, *args, use_reentrant=False)
