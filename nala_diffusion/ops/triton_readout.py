"""The linear-attention readout of :func:`~nala_diffusion.ops.readout.split_readout` as Triton kernels,
forward and backward: the same formula, for one or two feature blocks,

    o = sum_i rot(q_i) S_i / (sum_i q_i z_i + eps),  S_i = mean_j rot(k_ij) v_j^T,  z_i = mean_j k_ij,

with ``rot`` the optional RoPE of the numerator (tables ``(cos, sin)`` of shape (tokens, F)).

Kernels (all accumulate in float32 whatever the input dtype; outputs and gradients in the inputs' dtype):

- ``_state_kernel``: the key tokens split over ``SPLITS`` programs per (batch, head), each summing its
  contiguous chunk of rot(k)^T v and k; the partial states are added by one ``torch.sum`` in a fixed
  order. No atomics: a given input and launch configuration gives bitwise the same result on every run.
- ``_readout_kernel``: one program per (batch x head, query tile): both blocks' numerator and denominator,
  then the division.
- ``_query_grad_kernel``: per (batch x head, chunk of query tiles): recomputes numerator and denominator
  from the saved states (cheaper than storing the (N, d) numerator), writes dq_i and partial dS_i, dz_i.
- ``_key_grad_kernel``: per (batch x head, key tile): dk_i and dv from the reduced dS_i, dz_i.

No tokens x tokens tensor exists; what backward keeps is the inputs and the (F, d) states.
The kernel is registered as the custom op ``nala::linear_readout`` (with its backward and a fake
implementation), so ``torch.compile(fullgraph=True)`` traces it rather than breaking the graph.

``TRITON_INTERPRET=1``, set before Triton is imported, runs these kernels on CPU tensors; that is how
they are tested without a GPU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

#: query (and key) tokens per tile
BLOCK_TOKENS = 32
#: programs a reduction over tokens aims for in all (None: four per CUDA multiprocessor; one row on a CPU)
TARGET_PROGRAMS: Optional[int] = None


@triton.jit
def rotate_pairs(x, BN: tl.constexpr, BF: tl.constexpr):
    # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...), as ops.rope.rotate_pairs
    a, b = tl.split(tl.reshape(x, (BN, BF // 2, 2)))
    return tl.reshape(tl.join(-b, a), (BN, BF))

@triton.jit
def load_tile(ptr, rows, row_mask, cols, col_mask, width):
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                   other=0.0).to(tl.float32)

@triton.jit
def state_kernel(K, V, COS, SIN, S_PART, Z_PART, M, F, D, CHUNK, SPLITS,
                 HAS_ROPE: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    f, d = tl.arange(0, BF), tl.arange(0, BD)
    f_mask, d_mask = f < F, d < D
    state = tl.zeros((BF, BD), dtype=tl.float32)
    total = tl.zeros((BF,), dtype=tl.float32)
    start = split * CHUNK
    for m0 in range(start, tl.minimum(start + CHUNK, M), BM):
        m = m0 + tl.arange(0, BM)
        m_mask = (m < M) & (m < start + CHUNK)
        k = load_tile(K + bh * M * F, m, m_mask, f, f_mask, F)
        total += tl.sum(k, axis=0)
        if HAS_ROPE:
            k = k * load_tile(COS, m, m_mask, f, f_mask, F) + rotate_pairs(k, BM, BF) * load_tile(
                SIN, m, m_mask, f, f_mask, F)
        v = load_tile(V + bh * M * D, m, m_mask, d, d_mask, D)
        state += tl.dot(tl.trans(k), v, input_precision="ieee")
    out = (bh * SPLITS + split)
    tl.store(S_PART + out * F * D + f[:, None] * D + d[None, :], state, mask=f_mask[:, None] & d_mask[None, :])
    tl.store(Z_PART + out * F + f, total, mask=f_mask)

@triton.jit
def numerator_denominator(Q, S, Z, COS, SIN, bh, n, n_mask, f, f_mask, d, d_mask, N, F, D,
                          HAS_ROPE: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr):
    q = load_tile(Q + bh * N * F, n, n_mask, f, f_mask, F)
    z = tl.load(Z + bh * F + f, mask=f_mask, other=0.0)
    state = load_tile(S + bh * F * D, f, f_mask, d, d_mask, D)
    den = tl.sum(q * z[None, :], axis=1)
    if HAS_ROPE:
        q = q * load_tile(COS, n, n_mask, f, f_mask, F) + rotate_pairs(q, BN, BF) * load_tile(
            SIN, n, n_mask, f, f_mask, F)
    return q, z, state, tl.dot(q, state, input_precision="ieee"), den

@triton.jit
def readout_kernel(Q0, Q1, S0, S1, Z0, Z1, EPS, COS, SIN, OUT, N, F, D,
                   HAS_ROPE: tl.constexpr, TWO: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr,
                   BD: tl.constexpr):
    bh, tile = tl.program_id(0), tl.program_id(1)
    n = tile * BN + tl.arange(0, BN)
    f, d = tl.arange(0, BF), tl.arange(0, BD)
    n_mask, f_mask, d_mask = n < N, f < F, d < D
    _, _, _, num, den = numerator_denominator(Q0, S0, Z0, COS, SIN, bh, n, n_mask, f, f_mask, d, d_mask, N, F, D,
                                              HAS_ROPE, BN, BF)
    if TWO:
        _, _, _, num1, den1 = numerator_denominator(Q1, S1, Z1, COS, SIN, bh, n, n_mask, f, f_mask, d, d_mask, N,
                                                    F, D, HAS_ROPE, BN, BF)
        num += num1
        den += den1
    out = num / (den + tl.load(EPS + bh))[:, None]
    tl.store(OUT + bh * N * D + n[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty),
             mask=n_mask[:, None] & d_mask[None, :])

@triton.jit
def query_grad_part(q_rot, state, z, dnum, dden, COS, SIN, DQ, bh, n, n_mask, f, f_mask, N, F,
                    HAS_ROPE: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr):
    # dq = rot^T(dnum S^T) + dden z;  rot^T(y) = y cos - rotate_pairs(y sin)
    grad = tl.dot(dnum, tl.trans(state), input_precision="ieee")
    if HAS_ROPE:
        grad = grad * load_tile(COS, n, n_mask, f, f_mask, F) - rotate_pairs(
            grad * load_tile(SIN, n, n_mask, f, f_mask, F), BN, BF)
    grad += dden[:, None] * z[None, :]
    tl.store(DQ + bh * N * F + n[:, None] * F + f[None, :], grad.to(DQ.dtype.element_ty),
             mask=n_mask[:, None] & f_mask[None, :])

@triton.jit
def query_grad_kernel(Q0, Q1, S0, S1, Z0, Z1, EPS, COS, SIN, G, DQ0, DQ1, DS_PART, DZ_PART, N, F, D, CHUNK,
                      SPLITS, HAS_ROPE: tl.constexpr, TWO: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr,
                      BD: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    f, d = tl.arange(0, BF), tl.arange(0, BD)
    f_mask, d_mask = f < F, d < D
    eps = tl.load(EPS + bh)
    ds0 = tl.zeros((BF, BD), dtype=tl.float32)
    dz0 = tl.zeros((BF,), dtype=tl.float32)
    ds1 = tl.zeros((BF, BD), dtype=tl.float32)
    dz1 = tl.zeros((BF,), dtype=tl.float32)
    start = split * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, N), BN):
        n = n0 + tl.arange(0, BN)
        n_mask = (n < N) & (n < start + CHUNK)
        q0, z0, state0, num, den = numerator_denominator(Q0, S0, Z0, COS, SIN, bh, n, n_mask, f, f_mask, d,
                                                         d_mask, N, F, D, HAS_ROPE, BN, BF)
        if TWO:
            q1, z1, state1, num1, den1 = numerator_denominator(Q1, S1, Z1, COS, SIN, bh, n, n_mask, f, f_mask, d,
                                                               d_mask, N, F, D, HAS_ROPE, BN, BF)
            num += num1
            den += den1
        inverse = 1.0 / (den + eps)
        g = load_tile(G + bh * N * D, n, n_mask, d, d_mask, D)
        dnum = g * inverse[:, None]
        dden = -tl.sum(g * num, axis=1) * inverse * inverse
        query_grad_part(q0, state0, z0, dnum, dden, COS, SIN, DQ0, bh, n, n_mask, f, f_mask, N, F, HAS_ROPE, BN,
                        BF)
        raw0 = load_tile(Q0 + bh * N * F, n, n_mask, f, f_mask, F)
        ds0 += tl.dot(tl.trans(q0), dnum, input_precision="ieee")
        dz0 += tl.sum(raw0 * dden[:, None], axis=0)
        if TWO:
            query_grad_part(q1, state1, z1, dnum, dden, COS, SIN, DQ1, bh, n, n_mask, f, f_mask, N, F, HAS_ROPE,
                            BN, BF)
            raw1 = load_tile(Q1 + bh * N * F, n, n_mask, f, f_mask, F)
            ds1 += tl.dot(tl.trans(q1), dnum, input_precision="ieee")
            dz1 += tl.sum(raw1 * dden[:, None], axis=0)
    parts = 2 if TWO else 1
    out = (bh * SPLITS + split) * parts
    mask = f_mask[:, None] & d_mask[None, :]
    tl.store(DS_PART + out * F * D + f[:, None] * D + d[None, :], ds0, mask=mask)
    tl.store(DZ_PART + out * F + f, dz0, mask=f_mask)
    if TWO:
        tl.store(DS_PART + (out + 1) * F * D + f[:, None] * D + d[None, :], ds1, mask=mask)
        tl.store(DZ_PART + (out + 1) * F + f, dz1, mask=f_mask)

@triton.jit
def key_grad_part(K, DS, DZ, COS, SIN, DK, v, bh, m, m_mask, f, f_mask, d, d_mask, M, F, D, inv_m,
                  HAS_ROPE: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr):
    k = load_tile(K + bh * M * F, m, m_mask, f, f_mask, F)
    if HAS_ROPE:
        k = k * load_tile(COS, m, m_mask, f, f_mask, F) + rotate_pairs(k, BM, BF) * load_tile(
            SIN, m, m_mask, f, f_mask, F)
    ds = load_tile(DS + bh * F * D, f, f_mask, d, d_mask, D)
    dz = tl.load(DZ + bh * F + f, mask=f_mask, other=0.0)
    grad = tl.dot(v, tl.trans(ds), input_precision="ieee") * inv_m  # d rot(k)
    if HAS_ROPE:
        grad = grad * load_tile(COS, m, m_mask, f, f_mask, F) - rotate_pairs(
            grad * load_tile(SIN, m, m_mask, f, f_mask, F), BM, BF)
    grad += dz[None, :] * inv_m
    tl.store(DK + bh * M * F + m[:, None] * F + f[None, :], grad.to(DK.dtype.element_ty),
             mask=m_mask[:, None] & f_mask[None, :])
    return tl.dot(k, ds, input_precision="ieee") * inv_m  # this block's share of dv

@triton.jit
def key_grad_kernel(K0, K1, V, DS0, DS1, DZ0, DZ1, COS, SIN, DK0, DK1, DV, M, F, D, inv_m,
                    HAS_ROPE: tl.constexpr, TWO: tl.constexpr, BM: tl.constexpr, BF: tl.constexpr,
                    BD: tl.constexpr):
    bh, tile = tl.program_id(0), tl.program_id(1)
    m = tile * BM + tl.arange(0, BM)
    f, d = tl.arange(0, BF), tl.arange(0, BD)
    m_mask, f_mask, d_mask = m < M, f < F, d < D
    v = load_tile(V + bh * M * D, m, m_mask, d, d_mask, D)
    dv = key_grad_part(K0, DS0, DZ0, COS, SIN, DK0, v, bh, m, m_mask, f, f_mask, d, d_mask, M, F, D, inv_m,
                       HAS_ROPE, BM, BF)
    if TWO:
        dv += key_grad_part(K1, DS1, DZ1, COS, SIN, DK1, v, bh, m, m_mask, f, f_mask, d, d_mask, M, F, D, inv_m,
                            HAS_ROPE, BM, BF)
    tl.store(DV + bh * M * D + m[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])




def _block(width: int) -> int:
    return max(16, 1 << (int(width) - 1).bit_length())


def _splits(rows: int, tokens: int, device: torch.device) -> Tuple[int, int]:
    """(programs per row, tokens per program) for a reduction over ``tokens``: enough programs in all to fill
    the device (about four per multiprocessor), each over whole tiles."""
    if TARGET_PROGRAMS is not None:
        target = TARGET_PROGRAMS
    elif device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 1
    tiles = -(-tokens // BLOCK_TOKENS)
    splits = max(1, min(tiles, -(-target // max(rows, 1))))
    chunk = -(-tiles // splits) * BLOCK_TOKENS
    return -(-tokens // chunk), chunk


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-2:]).contiguous()


def _rope_tables(rope, like: torch.Tensor):
    if rope is None:
        return like.new_zeros(1), like.new_zeros(1), False
    cos, sin = rope
    width = cos.shape[-1]
    return (cos.reshape(-1, width).to(torch.float32).contiguous(), sin.reshape(-1, width).to(torch.float32).contiguous(),
            True)


def _eps_rows(eps, batch: int, heads: int, device) -> torch.Tensor:
    if torch.is_tensor(eps):
        return eps.detach().to(device=device, dtype=torch.float32).expand(batch, heads, 1, 1).reshape(-1).contiguous()
    return torch.full((batch * heads,), float(eps), device=device, dtype=torch.float32)


def _forward(q0, k0, q1, k1, v, eps, cos, sin, has_rope: bool):
    """(out, states (P, BH, F, D), key means (P, BH, F)) for flat (BH, tokens, width) inputs."""
    rows, tokens, width = q0.shape
    keys, dim = v.shape[-2], v.shape[-1]
    parts = [(q0, k0)] + ([(q1, k1)] if q1 is not None else [])
    splits, chunk = _splits(rows, keys, v.device)
    states = v.new_empty(len(parts), rows, width, dim, dtype=torch.float32)
    means = v.new_empty(len(parts), rows, width, dtype=torch.float32)
    block_f, block_d = _block(width), _block(dim)
    for index, (_, k) in enumerate(parts):
        state_part = v.new_empty(rows, splits, width, dim, dtype=torch.float32)
        mean_part = v.new_empty(rows, splits, width, dtype=torch.float32)
        state_kernel[(rows, splits)](k, v, cos, sin, state_part, mean_part, keys, width, dim, chunk, splits,
                                         HAS_ROPE=has_rope, BM=BLOCK_TOKENS, BF=block_f, BD=block_d)
        torch.sum(state_part, dim=1, out=states[index])  # a fixed order: the same result on every run
        torch.sum(mean_part, dim=1, out=means[index])
    states /= keys
    means /= keys
    out = v.new_empty(rows, tokens, dim, dtype=q0.dtype)
    second = parts[-1]
    readout_kernel[(rows, -(-tokens // BLOCK_TOKENS))](
        q0, second[0], states[0], states[-1], means[0], means[-1], eps, cos, sin, out, tokens, width, dim,
        HAS_ROPE=has_rope, TWO=len(parts) == 2, BN=BLOCK_TOKENS, BF=block_f, BD=block_d)
    return out, states, means


def _backward(grad, q0, k0, q1, k1, v, eps, cos, sin, states, means, has_rope: bool):
    rows, tokens, width = q0.shape
    keys, dim = v.shape[-2], v.shape[-1]
    two = q1 is not None
    parts = 2 if two else 1
    grad = grad.contiguous()
    splits, chunk = _splits(rows, tokens, v.device)
    ds_part = v.new_empty(rows, splits, parts, width, dim, dtype=torch.float32)
    dz_part = v.new_empty(rows, splits, parts, width, dtype=torch.float32)
    dq0 = torch.empty_like(q0)
    dq1 = torch.empty_like(q1) if two else dq0
    block_f, block_d = _block(width), _block(dim)
    query_grad_kernel[(rows, splits)](
        q0, q1 if two else q0, states[0], states[-1], means[0], means[-1], eps, cos, sin, grad, dq0, dq1, ds_part,
        dz_part, tokens, width, dim, chunk, splits, HAS_ROPE=has_rope, TWO=two, BN=BLOCK_TOKENS, BF=block_f,
        BD=block_d)
    ds = ds_part.sum(dim=1).transpose(0, 1).contiguous()  # (P, BH, F, D), a fixed order
    dz = dz_part.sum(dim=1).transpose(0, 1).contiguous()
    dk0 = torch.empty_like(k0)
    dk1 = torch.empty_like(k1) if two else dk0
    dv = torch.empty_like(v)
    key_grad_kernel[(rows, -(-keys // BLOCK_TOKENS))](
        k0, k1 if two else k0, v, ds[0], ds[-1], dz[0], dz[-1], cos, sin, dk0, dk1, dv, keys, width, dim, 1.0 / keys,
        HAS_ROPE=has_rope, TWO=two, BM=BLOCK_TOKENS, BF=block_f, BD=block_d)
    return dq0, dk0, (dq1 if two else None), (dk1 if two else None), dv


# -- the custom op: what torch.compile sees ---------------------------------------------------------------
@torch.library.custom_op("nala::linear_readout", mutates_args=())
def _readout_op(q0: torch.Tensor, k0: torch.Tensor, q1: Optional[torch.Tensor], k1: Optional[torch.Tensor],
                v: torch.Tensor, eps: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                has_rope: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q0, k0, q1, k1, v, eps, cos, sin, has_rope)


@_readout_op.register_fake
def _(q0, k0, q1, k1, v, eps, cos, sin, has_rope):
    parts = 2 if q1 is not None else 1
    rows, tokens, width = q0.shape
    dim = v.shape[-1]
    return (q0.new_empty(rows, tokens, dim), v.new_empty(parts, rows, width, dim, dtype=torch.float32),
            v.new_empty(parts, rows, width, dtype=torch.float32))


@torch.library.custom_op("nala::linear_readout_backward", mutates_args=())
def _readout_backward_op(grad: torch.Tensor, q0: torch.Tensor, k0: torch.Tensor, q1: Optional[torch.Tensor],
                         k1: Optional[torch.Tensor], v: torch.Tensor, eps: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, states: torch.Tensor, means: torch.Tensor,
                         has_rope: bool) -> List[torch.Tensor]:
    dq0, dk0, dq1, dk1, dv = _backward(grad, q0, k0, q1, k1, v, eps, cos, sin, states, means, has_rope)
    return [dq0, dk0, dv] + ([dq1, dk1] if dq1 is not None else [])


@_readout_backward_op.register_fake
def _(grad, q0, k0, q1, k1, v, eps, cos, sin, states, means, has_rope):
    grads = [torch.empty_like(q0), torch.empty_like(k0), torch.empty_like(v)]
    return grads + ([torch.empty_like(q1), torch.empty_like(k1)] if q1 is not None else [])


def _setup_context(ctx, inputs, output):
    q0, k0, q1, k1, v, eps, cos, sin, has_rope = inputs
    _, states, means = output
    ctx.save_for_backward(q0, k0, q1, k1, v, eps, cos, sin, states, means)
    ctx.has_rope = has_rope


def _backward_formula(ctx, grad, grad_states, grad_means):
    q0, k0, q1, k1, v, eps, cos, sin, states, means = ctx.saved_tensors
    grads = _readout_backward_op(grad, q0, k0, q1, k1, v, eps, cos, sin, states, means, ctx.has_rope)
    dq1, dk1 = (grads[3], grads[4]) if q1 is not None else (None, None)
    return grads[0], grads[1], dq1, dk1, grads[2], None, None, None, None


_readout_op.register_autograd(_backward_formula, setup_context=_setup_context)


def triton_split_readout(q_parts: Sequence[torch.Tensor], k_parts: Sequence[torch.Tensor], value: torch.Tensor,
                         eps, rope=None) -> torch.Tensor:
    """:func:`~nala_diffusion.ops.readout.split_readout` in Triton, differentiable: 1 or 2 feature blocks
    (B, H, N, F) and (B, H, M, F) with F <= 128, values (B, H, M, d) with d <= 128, ``eps`` a float or a
    (B, H, 1, 1) tensor, ``rope`` None or ``(cos, sin)`` tables of one (N, F) table (N = M). Output in the
    dtype of ``q_parts[0]``. Callers check ``triton_support.unsupported_reason`` and ``readout.triton_unusable``
    first (:func:`~nala_diffusion.ops.readout.split_readout` does)."""
    batch, heads, tokens, _ = q_parts[0].shape
    q0, k0 = _flat(q_parts[0]), _flat(k_parts[0])
    q1, k1 = (_flat(q_parts[1]), _flat(k_parts[1])) if len(q_parts) == 2 else (None, None)
    v = _flat(value)
    cos, sin, has_rope = _rope_tables(rope, v.float())
    out, _, _ = _readout_op(q0, k0, q1, k1, v, _eps_rows(eps, batch, heads, v.device), cos, sin, has_rope)
    return out.view(batch, heads, tokens, value.shape[-1])
