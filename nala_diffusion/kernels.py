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

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

INHIBIT_MODES = ("relu_split", "cosine")
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
    power_scale: Union[float, torch.Tensor] = 3.0,
    power_offset: float = 0.5,
    norm_scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """The norm-aware power p(r) = lambda * (tau + tanh(r / sigma)), for query norms ``r``.

    The one definition every path of the kernel uses. ``power_scale`` (lambda) and ``norm_scale``
    (sigma) are floats or tensors broadcastable to ``norm`` (per head); sigma = 1 is NaLaFormer's
    official formula, bit for bit (``r / 1.0`` is exact).
    """
    return power_scale * (power_offset + torch.tanh(norm / norm_scale))


def power_sensitivity(
    norm: torch.Tensor,
    power_scale: Union[float, torch.Tensor] = 3.0,
    norm_scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """dp / d(log r) = lambda * (r / sigma) * sech^2(r / sigma): how much the power changes for a
    relative change of the query norm (scale-free, unlike dp/dr). Near 0 where tanh has saturated."""
    x = norm / norm_scale
    return power_scale * x * (1 - torch.tanh(x).square())


def _angle(direction: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Per-coordinate angle in (-pi/4, pi/4): its sign is the coordinate's sign."""
    return (math.pi / 4) * torch.tanh(sharpness * direction)


def nala_query_features(
    query: torch.Tensor,
    *,
    power_scale: Union[float, torch.Tensor] = 3.0,
    power_offset: float = 0.5,
    inhibit: str = "relu_split",
    angle_sharpness: float = 20.0,
    eps: float = 1e-6,
    norm_scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """phi_q: (batch, heads, tokens, d) -> (batch, heads, tokens, 2d), non-negative."""
    norm = torch.linalg.vector_norm(query, dim=-1, keepdim=True)  # (B, H, N, 1)
    direction = query / norm.clamp_min(eps)  # (B, H, N, d), entries in [-1, 1]
    power = query_power(norm, _per_head(power_scale, query), power_offset, _per_head(norm_scale, query))  # (B, H, N, 1)
    magnitude = direction.abs().pow(power)  # |u|^p, in [0, 1]
    if inhibit == "relu_split":
        # relu(u)^p and relu(-u)^p: the magnitude goes to the half that matches the sign.
        positive = direction > 0
        zero = torch.zeros((), dtype=magnitude.dtype, device=magnitude.device)
        return torch.cat([torch.where(positive, magnitude, zero), torch.where(direction < 0, magnitude, zero)], -1)
    if inhibit == "cosine":
        angle = _angle(direction, angle_sharpness)
        return torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=-1)
    raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {inhibit!r}")


def nala_key_features(
    key: torch.Tensor,
    *,
    key_power: float = 3,
    inhibit: str = "relu_split",
    angle_sharpness: float = 20.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """phi_k: (batch, heads, tokens, d) -> (batch, heads, tokens, 2d), non-negative."""
    magnitude = key.abs().pow(key_power)  # |k|^gamma
    if inhibit == "relu_split":
        # k' = sign(k) |k|^gamma (= k^gamma for odd gamma); [relu(k'), relu(-k')]
        zero = torch.zeros((), dtype=magnitude.dtype, device=magnitude.device)
        return torch.cat([torch.where(key > 0, magnitude, zero), torch.where(key < 0, magnitude, zero)], dim=-1)
    if inhibit == "cosine":
        direction = key / torch.linalg.vector_norm(key, dim=-1, keepdim=True).clamp_min(eps)
        angle = _angle(direction, angle_sharpness)
        return torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=-1)
    raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {inhibit!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: RopeArg) -> torch.Tensor:
    """Rotate ``x`` (..., tokens, dim) by ``rope``: a ``(cos, sin)`` pair of tables or a callable."""
    if rope is None:
        return x
    if callable(rope):
        return rope(x)
    cos, sin = rope
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def rope_2d_tables(
    grid_size: Sequence[int],
    dim: int,
    *,
    base: float = 10000.0,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> RotaryTables:
    """Axial 2D rotary tables ``(cos, sin)``, each (rows * cols, dim), tokens in row-major order.

    Rotation pairs are (i, i + dim/2) as in :func:`rotate_half`; the first half of the pairs turns
    with the row index, the second half with the column index.
    """
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even feature dimension, got {dim}")
    rows, cols = (int(s) for s in grid_size)
    pairs = dim // 2
    row_pairs, col_pairs = (pairs + 1) // 2, pairs // 2

    def axis_angles(positions: torch.Tensor, count: int) -> torch.Tensor:
        inv_freq = base ** (-torch.arange(count, device=device, dtype=torch.float64) / max(count, 1))
        return positions[:, None].double() * inv_freq[None, :]  # (positions, count)

    row_index = torch.arange(rows, device=device).repeat_interleave(cols)  # (N,)
    col_index = torch.arange(cols, device=device).repeat(rows)  # (N,)
    angles = torch.cat([axis_angles(row_index, row_pairs), axis_angles(col_index, col_pairs)], dim=-1)  # (N, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (N, dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _linear_readout(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    value: torch.Tensor,
    eps: float,
    rope: RopeArg = None,
) -> torch.Tensor:
    """o = phi_q . S / (phi_q . z + eps), S = mean_j phi_k v^T, z = mean_j phi_k; rope on the numerator only."""
    num_keys = phi_k.shape[-2]
    key_mean = phi_k.mean(dim=-2, keepdim=True)  # (B, H, 1, F)
    denominator = (phi_q * key_mean).sum(dim=-1, keepdim=True)  # (B, H, N, 1)
    if rope is not None:
        phi_q, phi_k = apply_rope(phi_q, rope), apply_rope(phi_k, rope)
    state = torch.matmul(phi_k.transpose(-1, -2), value) / num_keys  # (B, H, F, d)
    numerator = torch.matmul(phi_q, state)  # (B, H, N, d)
    return numerator / (denominator + eps)


class _MagnitudePower(torch.autograd.Function):
    """|x|^p as exp(p log|x|), about twice as fast as ``pow`` with a tensor exponent; its backward
    gives 0 (not NaN) where x = 0, as ``pow``'s does."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        result = torch.exp(power * torch.log(magnitude))  # log 0 = -inf -> exp(-inf) = 0
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


def _query_magnitude(query, power_scale, power_offset, eps, norm_scale=1.0):
    """(|u|^p(r), u) with u = q / max(|q|, eps)."""
    norm = torch.linalg.vector_norm(query, dim=-1, keepdim=True)  # (B, H, N, 1)
    direction = query / norm.clamp_min(eps)  # (B, H, N, d)
    power = query_power(norm, _per_head(power_scale, query), power_offset, _per_head(norm_scale, query))  # (B, H, N, 1)
    return _MagnitudePower.apply(direction.abs(), power), direction


def _check_positive(**values) -> None:
    """Float options that must be positive (tensors are left to their owners, to avoid a device sync)."""
    for name, value in values.items():
        if not torch.is_tensor(value) and not float(value) > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _odd_integer(value) -> bool:
    return float(value).is_integer() and int(value) % 2 == 1


def _split_readout(q_parts, k_parts, value: torch.Tensor, eps: float) -> torch.Tensor:
    """o = sum_i q_i S_i / (sum_i q_i z_i + eps) for feature blocks q_i, k_i, which is the readout of
    the concatenated features without building them: S_i = mean_j k_ij v_j^T, z_i = mean_j k_ij."""
    batch, heads, tokens, _ = q_parts[0].shape
    num_keys, dim = value.shape[-2], value.shape[-1]
    value = value.reshape(batch * heads, num_keys, dim)
    numerator = denominator = None
    for q_i, k_i in zip(q_parts, k_parts):
        q_i = q_i.reshape(batch * heads, tokens, -1)
        k_i = k_i.reshape(batch * heads, num_keys, -1)
        state = _bmm(k_i.transpose(1, 2), value) / num_keys  # (BH, F, d)
        key_mean = k_i.mean(dim=1).unsqueeze(-1)  # (BH, F, 1)
        num_i, den_i = _bmm(q_i, state), _bmm(q_i, key_mean)  # (BH, N, d), (BH, N, 1)
        numerator = num_i if numerator is None else numerator + num_i
        denominator = den_i if denominator is None else denominator + den_i
    if torch.is_grad_enabled() and numerator.requires_grad:
        return (numerator / (denominator + eps)).view(batch, heads, tokens, dim)
    return numerator.div_(denominator.add_(eps)).view(batch, heads, tokens, dim)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm, or the 2-D mm/mv for a batch of one (faster on CPU for these skinny shapes)."""
    if a.shape[0] == 1:
        return (torch.mv(a[0], b[0, :, 0]).unsqueeze(-1) if b.shape[-1] == 1 else torch.mm(a[0], b[0])).unsqueeze(0)
    return torch.bmm(a, b)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)


def _signed_key_power(k: torch.Tensor, key_power) -> torch.Tensor:
    """k' = sign(k) |k|^gamma, with plain products for odd integer gamma."""
    if _odd_integer(key_power):
        return k.pow(int(key_power))
    return torch.copysign(k.abs().pow(key_power), k)


_CHUNK_BYTES = 8 * 2**20  # feature buffers per chunk of heads: small enough to stay in cache and off mmap


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


def relu_split_query_terms(q: torch.Tensor, power_scale: torch.Tensor, power_offset: float, eps: float,
                           norm_scale: torch.Tensor):
    """The relu_split query features in gather form, for ``q`` of shape (heads, N, d).

    phi_q = [relu(u)^p, relu(-u)^p] has exactly one non-zero of each pair (m, d + m): |u_m|^p, at m
    for u_m > 0 and at d + m otherwise. Returns that magnitude ``|u|^p`` (heads, N, d) and its
    feature index (:func:`_feature_index`). ``power_scale`` and ``norm_scale`` are (heads, 1, 1).
    Computed in place (:mod:`nala_diffusion.fused` has the same as plain code for the compiler).
    """
    norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)  # (h, N, 1)
    power = query_power(norm, power_scale, power_offset, norm_scale)  # (h, N, 1)
    shift = norm.clamp_min_(eps).log2_().mul_(power)  # p log2 r
    # |u|^p = 2^(p log2|q| - p log2 r) (exp2/log2 are the cheaper pair); log2 0 = -inf gives 0 for
    # zero coordinates (and for q = 0)
    magnitude = torch.abs(q, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))  # contiguous
    magnitude.log2_().mul_(power).sub_(shift).exp2_()
    return magnitude, _feature_index(q)


def relu_split_key_features(k: torch.Tensor, key_power) -> torch.Tensor:
    """[relu(k'), -relu(-k')] with k' = sign(k) |k|^gamma: (..., M, d) -> (..., M, 2d), in place. The
    second half carries a minus sign (one clamp instead of a clamp and a negation); the readout
    removes it from the small state instead."""
    dim = k.shape[-1]
    features = k.new_empty(*k.shape[:-1], 2 * dim)
    positive, negative = features[..., :dim], features[..., dim:]
    if _odd_integer(key_power):
        torch.pow(k, int(key_power), out=negative)  # an integer power is plain products, sign kept
    else:
        negative.copy_(_signed_key_power(k, key_power))
    torch.clamp(negative, min=0, out=positive)
    negative.clamp_(max=0)
    return features


def readout_table_width(dim: int) -> int:
    """Columns of the readout table: d of S, one of z, padded to a multiple of 16 for the gather."""
    return -(-(dim + 1) // 16) * 16


def _relu_split_state(k_features: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The readout table (h, 2d, width): rows [S; z] per feature, S = mean_j phi_k v^T (columns :d)
    and z = mean_j phi_k (column d), padded to :func:`readout_table_width`."""
    heads, num_keys, features = k_features.shape
    dim = v.shape[-1]
    table = k_features.new_zeros(heads, features, readout_table_width(dim))
    table[..., :dim] = torch.bmm(k_features.transpose(1, 2), v)
    table[..., dim] = k_features.sum(dim=1)
    table[:, features // 2:].neg_()  # the key features' second half was -relu(-k')
    return table.div_(num_keys)


@torch.no_grad()
def _relu_split_inference(q, k, v, power_scale, power_offset, key_power, eps, norm_scale=1.0,
                          query_terms=relu_split_query_terms, key_features=relu_split_key_features,
                          gather: Optional[bool] = None) -> torch.Tensor:
    """The relu_split kernel without autograd, by chunks of heads (buffers stay small).

    Each query reads only d of its 2d feature rows (one per coordinate, chosen by the sign), so on
    CPU the readout is a weighted gather-sum (``embedding_bag``) over the table [S; z], about half
    the multiply-adds of the dense product. Other devices run the dense matmul (``gather``
    chooses). The two feature functions may be compiled versions of the defaults
    (:mod:`nala_diffusion.fused`).
    """
    batch, heads, tokens, dim = q.shape
    num_keys, value_dim = k.shape[-2], v.shape[-1]
    scales, sigmas = head_scales(power_scale, q), head_scales(norm_scale, q)  # (B, H, 1, 1) each
    gather = q.device.type == "cpu" if gather is None else gather
    out = q.new_empty(batch, heads, tokens, value_dim)
    step = max(1, _CHUNK_BYTES // ((tokens + num_keys) * 2 * dim * q.element_size()))
    for b in range(batch):
        for h in range(0, heads, step):
            part = slice(h, min(heads, h + step))
            magnitude, index = query_terms(q[b, part], scales[b, part], power_offset, eps, sigmas[b, part])  # (h, N, d) each
            table = _relu_split_state(key_features(k[b, part], key_power), v[b, part])  # (h, 2d, width)
            if gather:
                read = F.embedding_bag(index.reshape(-1, dim), table.view(-1, table.shape[-1]), mode="sum",
                                       per_sample_weights=magnitude.reshape(-1, dim)).view(-1, tokens, table.shape[-1])
            else:  # the dense 2d-wide query features
                negative = _sign_bit(q[b, part]).bool()
                zero = magnitude.new_zeros(())
                q_features = torch.cat([torch.where(negative, zero, magnitude), torch.where(negative, magnitude, zero)], -1)
                read = torch.bmm(q_features, table)  # (h, N, width)
            torch.div(read[..., :value_dim], read[..., value_dim:value_dim + 1].add_(eps), out=out[b, part])
    return out


def nala_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    power_scale: Union[float, torch.Tensor] = 3.0,
    power_offset: float = 0.5,
    key_power: float = 3,
    inhibit: str = "relu_split",
    angle_sharpness: float = 20.0,
    eps: float = 1e-6,
    rope: RopeArg = None,
    compile: bool = False,
    norm_scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """Norm-aware linear attention, O(tokens * head_dim^2) time and O(head_dim^2) state per head.

    Args:
        query, key, value: ``(batch, heads, tokens, head_dim)``; keys and values may have another
            token count than queries.
        power_scale: lambda in p(r) = lambda * (tau + tanh(r / sigma)); a float or a per-head tensor
            ``(heads,)``.
        power_offset: tau.
        key_power: gamma, the power of the keys (odd keeps the sign).
        inhibit: ``"relu_split"`` (released code) or ``"cosine"`` (the paper's angular form).
        angle_sharpness: s in the ``cosine`` angle (pi/4) tanh(s x / |x|).
        eps: guards the query normalisation and the output's denominator.
        rope: rotary tables ``(cos, sin)`` broadcastable to ``(..., tokens, 2 * head_dim)`` (see
            :func:`rope_2d_tables`), or a callable, applied to the numerator's features only.
        compile: without autograd and without ``rope``, run the kernel fused by ``torch.compile``
            (:mod:`nala_diffusion.fused`; the first call per shape compiles). Otherwise ignored.
        norm_scale: sigma, the query-norm scale of the power: a positive float or a per-head tensor
            ``(heads,)``; 1 is the official formula (see :func:`query_power`).

    Returns:
        ``(batch, heads, query_tokens, head_dim)`` in ``query.dtype``.

    The 2d-wide features are never concatenated: the readout runs on their two d-wide halves (the
    positive/negative parts, or the cosine/sine parts), which is exact. With ``rope`` the features
    are built whole (:func:`nala_attention_explicit`), since the rotation mixes the halves.
    """
    _check_qkv(query, key, value)
    if inhibit not in INHIBIT_MODES:
        raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {inhibit!r}")
    _check_positive(norm_scale=norm_scale, power_scale=power_scale, key_power=key_power, eps=eps)
    if query.shape[-2] == 0:
        return query.new_empty(*query.shape[:3], value.shape[-1])
    if rope is not None:
        return nala_attention_explicit(
            query, key, value, power_scale=power_scale, power_offset=power_offset, key_power=key_power,
            inhibit=inhibit, angle_sharpness=angle_sharpness, eps=eps, rope=rope, norm_scale=norm_scale,
        )
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    if compile and not _needs_grad(q, k, v, power_scale, norm_scale):
        from .fused import nala_attention_fused

        return nala_attention_fused(
            q, k, v, power_scale, power_offset, key_power, inhibit, angle_sharpness, eps, norm_scale=norm_scale
        ).to(query.dtype)
    if inhibit == "relu_split" and not _needs_grad(q, k, v, power_scale, norm_scale):
        return _relu_split_inference(q, k, v, power_scale, power_offset, key_power, eps, norm_scale).to(query.dtype)
    magnitude, direction = _query_magnitude(q, power_scale, power_offset, eps, norm_scale)  # (B, H, N, d) each
    if inhibit == "relu_split":
        signed = torch.copysign(magnitude, direction)
        q_positive = torch.relu(signed)  # relu(u)^p
        q_negative = q_positive - signed  # relu(-u)^p, exact: one of the two is zero
        k_signed = _signed_key_power(k, key_power)  # k' = sign(k) |k|^gamma
        k_positive = torch.relu(k_signed)
        k_negative = k_positive - k_signed
        out = _split_readout((q_positive, q_negative), (k_positive, k_negative), v, eps)
    else:
        angle = _angle(direction, angle_sharpness)
        k_direction = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(eps)
        k_angle = _angle(k_direction, angle_sharpness)
        k_magnitude = k.abs().pow(key_power)
        out = _split_readout(
            (magnitude * torch.cos(angle), magnitude * torch.sin(angle)),
            (k_magnitude * torch.cos(k_angle), k_magnitude * torch.sin(k_angle)),
            v,
            eps,
        )
    return out.to(query.dtype)


def nala_attention_explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    power_scale: Union[float, torch.Tensor] = 3.0,
    power_offset: float = 0.5,
    key_power: float = 3,
    inhibit: str = "relu_split",
    angle_sharpness: float = 20.0,
    eps: float = 1e-6,
    rope: RopeArg = None,
    norm_scale: Union[float, torch.Tensor] = 1.0,
) -> torch.Tensor:
    """NaLa written literally from the formulas: the 2d-wide features are built, then read out.

    Same arguments and result as :func:`nala_attention`, slower; it serves RoPE (which mixes the
    feature halves) and as the straightforward baseline of the benchmarks.
    """
    _check_qkv(query, key, value)
    dtype = compute_dtype(query.dtype)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    phi_q = nala_query_features(
        q, power_scale=power_scale, power_offset=power_offset, inhibit=inhibit, angle_sharpness=angle_sharpness,
        eps=eps, norm_scale=norm_scale,
    )  # (B, H, N, 2d)
    phi_k = nala_key_features(k, key_power=key_power, inhibit=inhibit, angle_sharpness=angle_sharpness, eps=eps)
    return _linear_readout(phi_q, phi_k, v, eps, rope).to(query.dtype)


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
    eps: float = 1e-6,
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
