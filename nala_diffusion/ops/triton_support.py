"""Which inputs the Triton readout (:mod:`~nala_diffusion.ops.triton_readout`) takes, decided without
importing Triton."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

#: the widest feature block and value head the kernels take (a NaLa half is head_dim wide)
MAX_WIDTH = 128


def unsupported_reason(q_parts: Sequence[torch.Tensor], k_parts: Sequence[torch.Tensor], value: torch.Tensor,
                       eps, rope) -> Optional[str]:
    """Why these inputs go to the torch readout instead (None when the kernels take them)."""
    if len(q_parts) not in (1, 2):
        return f"{len(q_parts)} feature blocks (the kernels take 1 or 2)"
    tensors = [*q_parts, *k_parts, value]
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in tensors):
        return "float64 inputs (the torch readout keeps float64)"
    if any(t.shape[-1] > MAX_WIDTH or t.shape[-1] < 1 for t in tensors):
        return f"a feature block or value head wider than {MAX_WIDTH}"
    if len({q.shape[-1] for q in q_parts} | {k.shape[-1] for k in k_parts}) != 1:
        return "feature blocks of different widths"
    if torch.is_tensor(eps) and eps.requires_grad:
        return "an eps that requires grad"
    if rope is not None:
        if callable(rope) or not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            return "a RoPE callable (the kernels take (cos, sin) tables)"
        tokens, keys, width = q_parts[0].shape[-2], k_parts[0].shape[-2], q_parts[0].shape[-1]
        if tokens != keys:
            return "RoPE with different query and key token counts"
        if width % 2:
            return "RoPE on an odd feature width"
        for table in rope:
            if table.requires_grad or table.numel() != tokens * width or table.shape[-2:] != (tokens, width):
                return "RoPE tables that are not one (tokens, width) table for every head"
    return None
