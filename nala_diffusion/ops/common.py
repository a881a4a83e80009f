"""Checks and helpers every attention kernel shares: input validation, the accumulation dtype and the
batched product on skinny shapes."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the linear kernels accumulate in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
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


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm, or the 2-D mm/mv for a batch of one (faster on CPU for these skinny shapes)."""
    if a.shape[0] == 1:
        return (torch.mv(a[0], b[0, :, 0]).unsqueeze(-1) if b.shape[-1] == 1 else torch.mm(a[0], b[0])).unsqueeze(0)
    return torch.bmm(a, b)


def compiling() -> bool:
    """Whether this code is being traced by ``torch.compile`` (``torch.compiler.is_compiling`` from torch 2.3,
    ``torch._dynamo.is_compiling`` before)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is None:
        from torch import _dynamo

        is_compiling = _dynamo.is_compiling
    return bool(is_compiling())
