"""Attention kernels: NaLa (norm-aware linear attention) and the baselines it is compared with.

Every function takes ``query``, ``key``, ``value`` shaped ``(batch, heads, tokens, head_dim)`` and
returns ``(batch, heads, query_tokens, head_dim)`` in the dtype of ``query``. Linear kernels compute
in at least float32 (float16/bfloat16 are upcast, float64 stays float64) and never allocate a
tokens x tokens matrix: they build a ``(features, head_dim)`` state from the keys and values once,
then read it with every query.

NaLa follows NaLaFormer (arXiv 2506.21137):

    r = |q|, u = q / max(r, eps), p(r) = power_scale * (power_offset + tanh(r / norm_scale))
    relu_split: phi_q = [relu(u)^p, relu(-u)^p],          phi_k = [relu(k'), relu(-k')],  k' = sign(k) |k|^gamma
    cosine:     phi_q = |u|^p * [cos t(u), sin t(u)],     phi_k = |k|^gamma * [cos t(k), sin t(k)],
                t(x) = (pi / 4) * tanh(s * x / |x|)
    o_i = phi_q(q_i) . S / (phi_q(q_i) . z + eps),  S = mean_j phi_k(k_j) v_j^T,  z = mean_j phi_k(k_j)

A larger query norm raises the direction's entries to a higher power, which sharpens the attention
(the temperature effect of softmax); unlike a scalar factor it does not cancel in the ratio.
``norm_scale`` (sigma) sets where tanh bends: sigma = 1 is the official formula, which saturates
(p = lambda (tau + 1) for every query) once query norms exceed about 3, as they do in a DiT with
head_dim 64; sigma near the typical query norm keeps the power responsive (see
:func:`query_power`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .options import DEFAULTS, INHIBIT_MODES  # noqa: F401  (INHIBIT_MODES re-exported)

FEATURE_MAPS = ("relu", "elu")

RotaryTables = Tuple[torch.Tensor, torch.Tensor]
RopeArg = Optional[Union[RotaryTables, Callable[[torch.Tensor], torch.Tensor]]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the linear kernels accumulate in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Shapes (batch, heads, tokens, head_dim) that agree: the same batch and heads everywhere, q and
    k of one head_dim, k and v of one token count (v's head_dim may differ); floating dtypes."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be shaped (batch, heads, tokens, head_dim); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not tensor.is_floating_point():
            raise TypeError(f"attention needs floating-point tensors; {name} is {tensor.dtype}")
    if not query.shape[:2] == key.shape[:2] == value.shape[:2]:
        raise ValueError(
            "query, key and value must have the same batch and heads; got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key head_dim differ: {query.shape[-1]} vs {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value token counts differ: {key.shape[-2]} vs {value.shape[-2]}")
    if key.shape[-2] == 0:
        raise ValueError("attention needs at least one key token")


def _per_head(value: Union[float, torch.Tensor], like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A float stays a float; a per-head tensor of shape (heads,) becomes (1, heads, 1, 1)."""
    if not torch.is_tensor(value):
        return float(value)
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 1:
        if value.shape[0] != like.shape[1]:
            raise ValueError(f"a per-head tensor needs {like.shape[1]} entries (one per head), got {value.shape[0]}")
        value = value.view(1, -1, 1, 1)
    return value


def head_scales(value: Union[float, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """A per-head option (lambda, sigma) as a (batch, heads, 1, 1) tensor like ``q``, from a float or
    a per-head tensor."""
    scales = _per_head(value, q)
    if not torch.is_tensor(scales):
        return q.new_full((q.shape[0], q.shape[1], 1, 1), scales)
    return scales.expand(q.shape[0], q.shape[1], 1, 1)


def query_power(
    norm: torch.Tensor,
    power_scale: Union[float, torch.Tensor] = DEFAULTS.power_scale,
    power_offset: float = DEFAULTS.power_offset,
    norm_scale: Union[float, torch.Tensor] = DEFAULTS.norm_scale,
) -> torch.Tensor:
    """The norm-aware power p(r) = lambda * (tau + tanh(r / sigma)), for query norms ``r``.

    The one definition every path of the kernel uses. ``power_scale`` (lambda) and ``norm_scale``
    (sigma) are floats or tensors broadcastable to ``norm`` (per head); sigma = 1 is NaLaFormer's
    official formula, bit for bit (``r / 1.0`` is exact).
    """
    return power_scale * (power_offset + torch.tanh(norm / norm_scale))


def power_sensitivity(
    norm: torch.Tensor,
    power_scale: Union[float, torch.Tensor] = DEFAULTS.power_scale,
    norm_scale: Union[float, torch.Tensor] = DEFAULTS.norm_scale,
) -> torch.Tensor:
    """dp / d(log r) = lambda * (r / sigma) * sech^2(r / sigma): how much the power changes for a
    relative change of the query norm (scale-free, unlike dp/dr). Near 0 where tanh has saturated."""
    x = norm / norm_scale
    return power_scale * x * (1 - torch.tanh(x).square())


def _angle(direction: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Per-coordinate angle in (-pi/4, pi/4): its sign is the coordinate's sign."""
    return (math.pi / 4) * torch.tanh(sharpness * direction)


# -- the feature maps, written once ----------------------------------------------------------------
# Every path (explicit, autograd, inference, compiled, the entropy tool) builds its features from
# the functions below: query_power (the power), _direction_power (|u|^p), _key_power_signed (k'),
# _sign_halves (relu_split) and _angle_halves (cosine). Each feature map is kept as its two d-wide
# halves; only the explicit path concatenates them.


def _power_in_place(magnitude: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """|x|^p = exp(p log|x|) on a fresh tensor of magnitudes, in place (about twice as fast as
    ``pow`` with a tensor exponent); log 0 = -inf gives exactly 0."""
    return magnitude.log_().mul_(power).exp_()


class _MagnitudePower(torch.autograd.Function):
    """:func:`_power_in_place` with a backward that gives 0 (not NaN) where x = 0, as ``pow``'s does."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        result = _power_in_place(magnitude.clone(), power)
        ctx.save_for_backward(magnitude, power, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        magnitude, power, result = ctx.saved_tensors
        positive = magnitude > 0
        grad_magnitude = grad_power = None
        if ctx.needs_input_grad[0]:
            grad_magnitude = torch.where(positive, grad * power * result / magnitude, 0.0)
        if ctx.needs_input_grad[1]:
            grad_power = torch.where(positive, grad * result * torch.log(magnitude), 0.0)
            grad_power = grad_power.sum_to_size(power.shape)
        return grad_magnitude, grad_power


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)


def _direction_power(query, power_scale, power_offset: float, eps: float, norm_scale):
    """(|u|^p(r), u) for queries (..., tokens, d): u = q / max(|q|, eps), p from :func:`query_power`.
    ``power_scale`` and ``norm_scale`` are floats, per-head tensors ``(heads,)`` or tensors that
    broadcast against (..., tokens, 1)."""
    norm = torch.linalg.vector_norm(query, dim=-1, keepdim=True)  # (..., N, 1)
    direction = query / norm.clamp_min(eps)  # (..., N, d), entries in [-1, 1]
    power = query_power(norm, _per_head(power_scale, query), power_offset, _per_head(norm_scale, query))
    if _needs_grad(query, power):
        return _MagnitudePower.apply(direction.abs(), power), direction
    return _power_in_place(direction.abs(), power), direction


def _key_power_signed(key: torch.Tensor, key_power) -> torch.Tensor:
    """k' = sign(k) |k|^gamma, with plain products for odd integer gamma."""
    if float(key_power).is_integer() and int(key_power) % 2 == 1:
        return key.pow(int(key_power))
    return torch.copysign(key.abs().pow(key_power), key)


def _sign_halves(signed: torch.Tensor):
    """relu_split: [relu(x), relu(-x)] as two halves; the second is exact since one of them is 0."""
    positive = torch.relu(signed)
    return positive, positive - signed


def _angle_halves(magnitude: torch.Tensor, direction: torch.Tensor, sharpness: float):
    """cosine: [m cos t(u), m sin t(u)] as two halves, t(u) = (pi/4) tanh(s u)."""
    angle = _angle(direction, sharpness)
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


def nala_query_halves(query, *, power_scale=DEFAULTS.power_scale, power_offset=DEFAULTS.power_offset,
                      inhibit=DEFAULTS.inhibit, angle_sharpness=DEFAULTS.angle_sharpness, eps=DEFAULTS.eps,
                      norm_scale=DEFAULTS.norm_scale):
    """The two d-wide halves of phi_q: [relu(u)^p, relu(-u)^p] or |u|^p [cos t(u), sin t(u)]."""
    magnitude, direction = _direction_power(query, power_scale, power_offset, eps, norm_scale)
    if inhibit == "relu_split":
        return _sign_halves(torch.copysign(magnitude, direction))
    if inhibit == "cosine":
        return _angle_halves(magnitude, direction, angle_sharpness)
    raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {inhibit!r}")


def nala_key_halves(key, *, key_power=DEFAULTS.key_power, inhibit=DEFAULTS.inhibit,
                    angle_sharpness=DEFAULTS.angle_sharpness, eps=DEFAULTS.eps):
    """The two d-wide halves of phi_k: [relu(k'), relu(-k')] or |k|^gamma [cos t(k), sin t(k)]."""
    if inhibit == "relu_split":
        return _sign_halves(_key_power_signed(key, key_power))
    if inhibit == "cosine":
        direction = key / torch.linalg.vector_norm(key, dim=-1, keepdim=True).clamp_min(eps)
        return _angle_halves(key.abs().pow(key_power), direction, angle_sharpness)
    raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {inhibit!r}")


def nala_query_features(query: torch.Tensor, **options) -> torch.Tensor:
    """phi_q: (batch, heads, tokens, d) -> (batch, heads, tokens, 2d), non-negative for relu_split.
    ``options``: those of :func:`nala_query_halves`."""
    return torch.cat(nala_query_halves(query, **options), dim=-1)


def nala_key_features(key: torch.Tensor, **options) -> torch.Tensor:
    """phi_k: (batch, heads, tokens, d) -> (batch, heads, tokens, 2d). ``options``: those of
    :func:`nala_key_halves`."""
    return torch.cat(nala_key_halves(key, **options), dim=-1)


def scaled_keys(key: torch.Tensor, key_power, eps: float):
    """Keys divided by their largest magnitude per (batch, head), and the denominator's eps in the
    same units: (k / m, eps / m^gamma).

    phi_k is homogeneous of degree gamma in k, so S and z scale by m^-gamma together and the output
    phi_q S / (phi_q z + eps) is unchanged when eps scales with them. In these units k^gamma cannot
    overflow (|k / m| <= 1) for any finite key; where m^gamma itself overflows, eps / m^gamma is 0,
    which is the exact value in float32 anyway.
    """
    largest = key.detach().abs().amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    return key / largest, eps / largest.pow(key_power)


# -- rotary embedding -------------------------------------------------------------------------------


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): adjacent pairs turned by 90 degrees."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: RopeArg) -> torch.Tensor:
    """Rotate ``x`` (..., tokens, dim) by ``rope``: a ``(cos, sin)`` pair of tables or a callable."""
    if rope is None:
        return x
    if callable(rope):
        return rope(x)
    cos, sin = rope
    return x * cos.to(x.dtype) + rotate_pairs(x) * sin.to(x.dtype)


@functools.lru_cache(maxsize=64)
def _rope_tables(rows: int, cols: int, dim: int, base: float, device: torch.device, dtype: torch.dtype) -> RotaryTables:
    pairs = dim // 2
    row_pairs, col_pairs = (pairs + 1) // 2, pairs // 2

    def axis_angles(positions: torch.Tensor, count: int) -> torch.Tensor:
        inv_freq = base ** (-torch.arange(count, device=device, dtype=torch.float64) / max(count, 1))
        return positions[:, None].double() * inv_freq[None, :]  # (positions, count)

    row_index = torch.arange(rows, device=device).repeat_interleave(cols)  # (N,)
    col_index = torch.arange(cols, device=device).repeat(rows)  # (N,)
    angles = torch.cat([axis_angles(row_index, row_pairs), axis_angles(col_index, col_pairs)], dim=-1)  # (N, d/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (N, dim): both members of a pair turn by one angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_2d_tables(
    grid_size: Sequence[int],
    dim: int,
    *,
    base: float = 10000.0,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> RotaryTables:
    """Axial 2D rotary tables ``(cos, sin)``, each (rows * cols, dim), tokens in row-major order.

    Rotation pairs are adjacent coordinates (2i, 2i + 1), as in NaLaFormer's code; the first half of
    the pairs turns with the row index, the second half with the column index. For NaLa ``dim`` is
    the head_dim: each d-wide feature half is rotated on its own. Tables are cached per (grid, dim,
    base, device, dtype); treat them as read-only.
    """
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even feature dimension, got {dim}")
    rows, cols = (int(s) for s in grid_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _rope_tables(rows, cols, int(dim), float(base), device, dtype)


# -- readouts ------------------------------------------------------------------------------------


def _linear_readout(phi_q, phi_k, value, eps, rope: RopeArg = None) -> torch.Tensor:
    """o = phi_q . S / (phi_q . z + eps), S = mean_j phi_k v^T, z = mean_j phi_k; rope on the
    numerator only. For the d-wide features of the linear baselines."""
    return _split_readout((phi_q,), (phi_k,), value, eps, rope)


def _split_readout(q_parts, k_parts, value: torch.Tensor, eps, rope: RopeArg = None) -> torch.Tensor:
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
        den_i = _bmm(q_i.reshape(batch * heads, tokens, -1), key_mean)  # (BH, N, 1)
        q_i, k_i = apply_rope(q_i, rope), apply_rope(k_i, rope)
        state = _bmm(k_i.reshape(batch * heads, num_keys, -1).transpose(1, 2), value) / num_keys  # (BH, F, d)
        num_i = _bmm(q_i.reshape(batch * heads, tokens, -1), state)  # (BH, N, d)
        numerator = num_i if numerator is None else numerator + num_i
        denominator = den_i if denominator is None else denominator + den_i
    if torch.is_tensor(eps):
        eps = eps.expand(batch, heads, 1, 1).reshape(batch * heads, 1, 1)
    if _needs_grad(numerator, denominator):
        return (numerator / (denominator + eps)).view(batch, heads, tokens, dim)
    return numerator.div_(denominator.add_(eps)).view(batch, heads, tokens, dim)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm, or the 2-D mm/mv for a batch of one (faster on CPU for these skinny shapes)."""
    if a.shape[0] == 1:
        return (torch.mv(a[0], b[0, :, 0]).unsqueeze(-1) if b.shape[-1] == 1 else torch.mm(a[0], b[0])).unsqueeze(0)
    return torch.bmm(a, b)


def _check_positive(**values) -> None:
    """Float options that must be positive (tensors are left to their owners, to avoid a device sync)."""
    for name, value in values.items():
        if not torch.is_tensor(value) and not float(value) > 0:
            raise ValueError(f"{name} must be positive, got {value}")


# -- the kernel's paths ------------------------------------------------------------------------------

_CHUNK_BYTES = 8 * 2**20  # CPU gather path: feature buffers per chunk of heads stay in cache and off mmap
_DENSE_CHUNK_BYTES = 2 * 2**30  # dense path: features of one batched call; larger inputs go by chunks


def _sign_bit(x: torch.Tensor) -> torch.Tensor:
    """-1 where x's sign bit is set (negative numbers and -0.0), else 0; an arithmetic shift of the
    float's bits, one vectorised pass (comparisons and bool-to-int conversions take several)."""
    bits = {4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(bits) >> (8 * x.element_size() - 1)


def _feature_index(q: torch.Tensor) -> torch.Tensor:
    """For q (heads, N, d): the index of the non-zero relu_split query feature of each coordinate in
    a table of all heads' 2d feature rows: 2d h + m for u_m > 0, 2d h + d + m otherwise."""
    heads, _, dim = q.shape
    first = torch.arange(heads, device=q.device, dtype=torch.int32).view(heads, 1, 1) * (2 * dim)
    first = first + torch.arange(dim, device=q.device, dtype=torch.int32)  # (h, 1, d)
    index = torch.empty(q.shape, dtype=torch.int32, device=q.device)  # contiguous whatever q's strides
    return torch.sub(first, _sign_bit(q), alpha=dim, out=index)  # + d where the sign bit is set


def relu_split_query_terms(q: torch.Tensor, power_scale, power_offset: float, eps: float, norm_scale):
    """The relu_split query features in gather form, for ``q`` of shape (heads, N, d).

    phi_q = [relu(u)^p, relu(-u)^p] has exactly one non-zero of each pair (m, d + m): |u_m|^p, at m
    for u_m > 0 and at d + m otherwise. Returns that magnitude ``|u|^p`` (heads, N, d), from the
    shared :func:`_direction_power`, and its feature index (:func:`_feature_index`).
    ``power_scale`` and ``norm_scale`` are (heads, 1, 1).
    """
    magnitude, _ = _direction_power(q, power_scale, power_offset, eps, norm_scale)
    return magnitude, _feature_index(q)


def readout_table_width(dim: int) -> int:
    """Columns of the readout table: d of S, one of z, padded to a multiple of 16 for the gather."""
    return -(-(dim + 1) // 16) * 16


def relu_split_table(k: torch.Tensor, v: torch.Tensor, key_power) -> torch.Tensor:
    """The gather readout's table (h, 2d, width) for keys (h, M, d) and values (h, M, e): rows
    [S; z] per feature, S = mean_j phi_k v^T (columns :e), z = mean_j phi_k (column e), padded to
    :func:`readout_table_width`. phi_k from the shared :func:`nala_key_halves`."""
    heads, num_keys, dim = k.shape
    value_dim = v.shape[-1]
    table = k.new_zeros(heads, 2 * dim, readout_table_width(value_dim))
    for rows, half in zip((slice(0, dim), slice(dim, 2 * dim)), nala_key_halves(k, key_power=key_power)):
        table[:, rows, :value_dim] = torch.bmm(half.transpose(1, 2), v)  # (bmm's out= on a slice is slower)
        table[:, rows, value_dim] = half.sum(dim=1)
    return table.div_(num_keys)


@torch.no_grad()
def _relu_split_gather(q, k, v, power_scale, power_offset, key_power, eps, norm_scale, denominator_eps,
                       query_terms=relu_split_query_terms, table=relu_split_table) -> torch.Tensor:
    """relu_split inference on CPU by chunks of heads (buffers stay in cache). Each query reads only d
    of its 2d feature rows (one per coordinate, chosen by the sign), so the readout is a weighted
    gather-sum (``embedding_bag``) over the table [S; z]: half the multiply-adds of the dense
    product. ``denominator_eps`` is a (B, H, 1, 1) tensor (:func:`scaled_keys`); the feature
    functions may be compiled versions of the defaults (:mod:`nala_diffusion.fused`)."""
    batch, heads, tokens, dim = q.shape
    num_keys, value_dim = k.shape[-2], v.shape[-1]
    scales, sigmas = head_scales(power_scale, q), head_scales(norm_scale, q)  # (B, H, 1, 1) each
    out = q.new_empty(batch, heads, tokens, value_dim)
    step = max(1, _CHUNK_BYTES // ((tokens + num_keys) * 2 * dim * q.element_size()))
    for b in range(batch):
        for h in range(0, heads, step):
            part = slice(h, min(heads, h + step))
            magnitude, index = query_terms(q[b, part], scales[b, part], power_offset, eps, sigmas[b, part])
            readout = table(k[b, part], v[b, part], key_power)  # (h, 2d, width)
            read = F.embedding_bag(index.reshape(-1, dim), readout.view(-1, readout.shape[-1]), mode="sum",
                                   per_sample_weights=magnitude.reshape(-1, dim)).view(-1, tokens, readout.shape[-1])
            denominator = read[..., value_dim:value_dim + 1].add_(denominator_eps[b, part])
            torch.div(read[..., :value_dim], denominator, out=out[b, part])
    return out


def dense_nala(q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps, norm_scale,
               denominator_eps, rope: RopeArg = None) -> torch.Tensor:
    """NaLa as batched products of the feature halves (no Python loop over heads); differentiable.
    ``denominator_eps``: a float or a (B, H, 1, 1) tensor (see :func:`scaled_keys`)."""
    q_parts = nala_query_halves(q, power_scale=power_scale, power_offset=power_offset, inhibit=inhibit,
                                angle_sharpness=angle_sharpness, eps=eps, norm_scale=norm_scale)
    k_parts = nala_key_halves(k, key_power=key_power, inhibit=inhibit, angle_sharpness=angle_sharpness, eps=eps)
    return _split_readout(q_parts, k_parts, v, denominator_eps, rope)


@torch.no_grad()
def _dense_inference(q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps, norm_scale,
                     denominator_eps, rope: RopeArg = None, kernel=None) -> torch.Tensor:
    """:func:`dense_nala` in one batched call, or by chunks of (batch x heads) only where the
    features would exceed ``_DENSE_CHUNK_BYTES``."""
    kernel = kernel or dense_nala
    batch, heads, tokens, dim = q.shape
    per_head = (tokens + k.shape[-2]) * 2 * dim * q.element_size() * 2
    rows = max(1, _DENSE_CHUNK_BYTES // per_head)
    if batch * heads <= rows:
        return kernel(q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps, norm_scale,
                      denominator_eps, rope)
    scales, sigmas = head_scales(power_scale, q), head_scales(norm_scale, q)
    denominator_eps = head_scales(denominator_eps, q)
    flat = lambda x: x.reshape(batch * heads, 1, *x.shape[2:])  # noqa: E731  (one head per "batch" row)
    q_, k_, v_, scales, sigmas, den = (flat(x) for x in (q, k, v, scales, sigmas, denominator_eps))
    out = q.new_empty(batch * heads, 1, tokens, v.shape[-1])
    for start in range(0, batch * heads, rows):
        part = slice(start, start + rows)
        out[part] = kernel(q_[part], k_[part], v_[part], scales[part], power_offset, key_power, inhibit,
                           angle_sharpness, eps, sigmas[part], den[part], rope)
    return out.view(batch, heads, tokens, -1)


_RECOMPUTE_BYTES = 4 * 2**20  # recompute the features in backward when one (B, H, N, d) tensor holds this much


def _memory_lean(function, *args):
    """``function(*args)``, whose backward recomputes the feature halves from q, k, v instead of
    keeping them (``torch.utils.checkpoint``) when they are large: training memory as for a d-wide
    linear attention. Below ``_RECOMPUTE_BYTES`` per tensor storing them costs little and saves the
    recomputation (about one more forward of the kernel)."""
    q = args[0]
    if q.numel() * q.element_size() < _RECOMPUTE_BYTES:
        return function(*args)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def nala_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    power_scale: Union[float, torch.Tensor] = DEFAULTS.power_scale,
    power_offset: float = DEFAULTS.power_offset,
    key_power: float = DEFAULTS.key_power,
    inhibit: str = DEFAULTS.inhibit,
    angle_sharpness: float = DEFAULTS.angle_sharpness,
    eps: float = DEFAULTS.eps,
    rope: RopeArg = None,
    compile: bool = False,
    norm_scale: Union[float, torch.Tensor] = DEFAULTS.norm_scale,
    gather: Optional[bool] = None,
) -> torch.Tensor:
    """Norm-aware linear attention, O(tokens * head_dim^2) time and O(head_dim^2) state per head.

    Args:
        query, key, value: ``(batch, heads, tokens, head_dim)``; keys and values may have another
            token count than queries, and values another head_dim.
        power_scale: lambda in p(r) = lambda * (tau + tanh(r / sigma)); a float or a per-head tensor
            ``(heads,)``.
        power_offset: tau.
        key_power: gamma, the power of the keys (odd keeps the sign).
        inhibit: ``"relu_split"`` (released code) or ``"cosine"`` (the paper's angular form).
        angle_sharpness: s in the ``cosine`` angle (pi/4) tanh(s x / |x|).
        eps: guards the query normalisation and the output's denominator.
        rope: rotary tables ``(cos, sin)`` broadcastable to ``(..., tokens, head_dim)`` (see
            :func:`rope_2d_tables`), or a callable; each d-wide feature half is rotated on its own,
            in the numerator only, as in NaLaFormer's code.
        compile: without autograd, run the same feature functions fused by ``torch.compile``
            (:mod:`nala_diffusion.fused`; the first call per shape compiles). Otherwise ignored.
        norm_scale: sigma, the query-norm scale of the power: a positive float or a per-head tensor
            ``(heads,)``; 1 is the official formula (see :func:`query_power`).
        gather: without autograd and RoPE, for ``relu_split``: read the state by a gather-sum of the
            d feature rows each query uses (the default on CPU) instead of batched dense products
            (the default elsewhere).

    Returns:
        ``(batch, heads, query_tokens, value_head_dim)`` in ``query.dtype``.

    The 2d-wide features are never concatenated: the readout runs on their two d-wide halves. Keys
    are scaled per head before the power (:func:`scaled_keys`), so no finite input overflows. With
    autograd the features are recomputed in backward rather than stored.
    """
    _check_qkv(query, key, value)
    if inhibit not in INHIBIT_MODES:
        raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {inhibit!r}")
    _check_positive(norm_scale=norm_scale, power_scale=power_scale, key_power=key_power, eps=eps)
    if query.shape[-2] == 0:
        return query.new_empty(*query.shape[:3], value.shape[-1])
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    k, key_eps = scaled_keys(k, key_power, eps)  # (B, H, M, d), (B, H, 1, 1)
    args = (q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps, norm_scale, key_eps)
    if _needs_grad(q, k, v, power_scale, norm_scale):
        return _memory_lean(dense_nala, *args, rope).to(query.dtype)
    if gather is None:
        gather = q.device.type == "cpu"
    if compile:
        from .fused import nala_attention_fused

        return nala_attention_fused(*args, rope=rope, gather=gather).to(query.dtype)
    if inhibit == "relu_split" and rope is None and gather:
        return _relu_split_gather(*args[:6], eps, norm_scale, key_eps).to(query.dtype)
    return _dense_inference(*args, rope).to(query.dtype)


def nala_attention_explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    power_scale: Union[float, torch.Tensor] = DEFAULTS.power_scale,
    power_offset: float = DEFAULTS.power_offset,
    key_power: float = DEFAULTS.key_power,
    inhibit: str = DEFAULTS.inhibit,
    angle_sharpness: float = DEFAULTS.angle_sharpness,
    eps: float = DEFAULTS.eps,
    rope: RopeArg = None,
    norm_scale: Union[float, torch.Tensor] = DEFAULTS.norm_scale,
) -> torch.Tensor:
    """NaLa written literally from the formulas: the 2d-wide features are built, then read out.

    Same arguments and result as :func:`nala_attention`, slower and without its key scaling; the
    straightforward baseline of the benchmarks.
    """
    _check_qkv(query, key, value)
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    phi_q = nala_query_features(
        q, power_scale=power_scale, power_offset=power_offset, inhibit=inhibit, angle_sharpness=angle_sharpness,
        eps=eps, norm_scale=norm_scale,
    )  # (B, H, N, 2d)
    phi_k = nala_key_features(k, key_power=key_power, inhibit=inhibit, angle_sharpness=angle_sharpness, eps=eps)
    halves = None if rope is None else (lambda x: torch.cat([apply_rope(h, rope) for h in x.chunk(2, dim=-1)], -1))
    return _linear_readout(phi_q, phi_k, v, eps, halves).to(query.dtype)  # RoPE turns each half on its own


def kernel_feature_map(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "elu":
        return F.elu(x) + 1.0
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


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
    _check_qkv(query, key, value)
    dtype = compute_dtype(query.dtype)
    phi_q = kernel_feature_map(query.to(dtype), feature_map)  # (B, H, N, d)
    phi_k = kernel_feature_map(key.to(dtype), feature_map)
    return _linear_readout(phi_q, phi_k, value.to(dtype), eps, rope).to(query.dtype)


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
    _check_qkv(query, key, value)
    if rope is not None:
        query, key = apply_rope(query, rope), apply_rope(key, rope)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                          scale=scale)
