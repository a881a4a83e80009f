"""NaLa's relu_split inference path on CPU: a weighted gather-sum instead of dense products.

phi_q = [relu(u)^p, relu(-u)^p] has exactly one non-zero of each pair (m, d + m), so each query reads
only d of its 2d feature rows of the state (one per coordinate, chosen by the sign): the readout is
an ``embedding_bag`` over the table [S; z], half the multiply-adds of the dense product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nala_diffusion.ops.feature_maps import direction_power, nala_key_halves
from nala_diffusion.ops.params import NaLaParams

CHUNK_BYTES = 8 * 2**20  # feature buffers per chunk of heads stay in cache and off mmap


def sign_bit(x: torch.Tensor) -> torch.Tensor:
    """-1 where x's sign bit is set (negative numbers and -0.0), else 0; an arithmetic shift of the
    float's bits, one vectorised pass (comparisons and bool-to-int conversions take several)."""
    bits = {4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(bits) >> (8 * x.element_size() - 1)


def feature_index(q: torch.Tensor) -> torch.Tensor:
    """For q (heads, N, d): the index of the non-zero relu_split query feature of each coordinate in
    a table of all heads' 2d feature rows: 2d h + m for u_m > 0, 2d h + d + m otherwise."""
    heads, _, dim = q.shape
    first = torch.arange(heads, device=q.device, dtype=torch.int32).view(heads, 1, 1) * (2 * dim)
    first = first + torch.arange(dim, device=q.device, dtype=torch.int32)  # (h, 1, d)
    index = torch.empty(q.shape, dtype=torch.int32, device=q.device)  # contiguous whatever q's strides
    return torch.sub(first, sign_bit(q), alpha=dim, out=index)  # + d where the sign bit is set


def relu_split_query_terms(q: torch.Tensor, params: NaLaParams):
    """The relu_split query features in gather form, for ``q`` of shape (heads, N, d): the magnitude
    ``|u|^p`` (heads, N, d) of the one non-zero feature of each coordinate, from the shared
    :func:`~nala_diffusion.ops.feature_maps.direction_power`, and its feature index
    (:func:`feature_index`). ``params``' lambda and sigma are (heads, 1, 1)."""
    magnitude, _ = direction_power(q, params)
    return magnitude, feature_index(q)


def readout_table_width(dim: int) -> int:
    """Columns of the readout table: d of S, one of z, padded to a multiple of 16 for the gather."""
    return -(-(dim + 1) // 16) * 16


def relu_split_table(k: torch.Tensor, v: torch.Tensor, params: NaLaParams) -> torch.Tensor:
    """The gather readout's table (h, 2d, width) for keys (h, M, d) and values (h, M, e): rows
    [S; z] per feature, S = mean_j phi_k v^T (columns :e), z = mean_j phi_k (column e), padded to
    :func:`readout_table_width`. phi_k from the shared ``nala_key_halves``."""
    heads, num_keys, dim = k.shape
    value_dim = v.shape[-1]
    table = k.new_zeros(heads, 2 * dim, readout_table_width(value_dim))
    for rows, half in zip((slice(0, dim), slice(dim, 2 * dim)), nala_key_halves(k, params)):
        table[:, rows, :value_dim] = torch.bmm(half.transpose(1, 2), v)  # (bmm's out= on a slice is slower)
        table[:, rows, value_dim] = half.sum(dim=1)
    return table.div_(num_keys)


@torch.no_grad()
def relu_split_gather(q, k, v, params: NaLaParams, denominator_eps: torch.Tensor,
                      query_terms=relu_split_query_terms, table=relu_split_table) -> torch.Tensor:
    """relu_split inference by chunks of heads (buffers stay in cache). ``denominator_eps`` is a
    (B, H, 1, 1) tensor (:func:`~nala_diffusion.ops.feature_maps.scaled_keys`); the feature functions
    may be compiled versions of the defaults (:mod:`nala_diffusion.ops.fused`)."""
    batch, heads, tokens, dim = q.shape
    num_keys, value_dim = k.shape[-2], v.shape[-1]
    heads_params = params.per_head(q)  # lambda, sigma as (B, H, 1, 1)
    out = q.new_empty(batch, heads, tokens, value_dim)
    step = max(1, CHUNK_BYTES // ((tokens + num_keys) * 2 * dim * q.element_size()))
    for b in range(batch):
        for h in range(0, heads, step):
            part = slice(h, min(heads, h + step))
            chunk = heads_params.rows((b, part))
            magnitude, index = query_terms(q[b, part], chunk)
            readout = table(k[b, part], v[b, part], params)  # (h, 2d, width)
            read = F.embedding_bag(index.reshape(-1, dim), readout.view(-1, readout.shape[-1]), mode="sum",
                                   per_sample_weights=magnitude.reshape(-1, dim)).view(-1, tokens, readout.shape[-1])
            denominator = read[..., value_dim:value_dim + 1].add_(denominator_eps[b, part])
            torch.div(read[..., :value_dim], denominator, out=out[b, part])
    return out
