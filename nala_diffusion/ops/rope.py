"""Axial 2D rotary position embedding (RoPE) tables and their application."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from nala_diffusion.ops.common import compiling

RotaryTables = Tuple[torch.Tensor, torch.Tensor]
RopeArg = Optional[Union[RotaryTables, Callable[[torch.Tensor], torch.Tensor]]]


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
        # NaLaFormer's RoPE: 1 / base ** linspace(0, 1, d/4) per axis, both ends included
        inv_freq = base ** (-torch.linspace(0.0, 1.0, count, device=device, dtype=torch.float64))
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

    As NaLaFormer's released ``RoPE``: rotation pairs are adjacent coordinates (2i, 2i + 1); the first
    half of the pairs turns with the row index, the second half with the column index, each axis at the
    angles 1 / base ** linspace(0, 1, pairs per axis) (d/4 of them for head_dim d). An odd number of
    pairs gives the rows one more. For NaLa ``dim`` is
    the head_dim: each d-wide feature half is rotated on its own. Tables are cached per (grid, dim,
    base, device, dtype); treat them as read-only.
    """
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even feature dimension, got {dim}")
    rows, cols = (int(s) for s in grid_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    tables = _rope_tables.__wrapped__ if compiling() else _rope_tables  # traced by torch.compile: not cached
    return tables(rows, cols, int(dim), float(base), device, dtype)
