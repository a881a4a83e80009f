"""Convolutional positional encodings (CPE) of NaLaFormer's blocks, for the NaLa DiT.

NaLaFormer's released block adds a depthwise 3 x 3 convolution of the tokens on their grid before the
attention and again before the feed-forward network, each as a residual:

    x = x + cpe1(x);  x = x + attn(norm1(x));  x = x + cpe2(x);  x = x + ffn(norm2(x))

In a diffusers DiT block (``BasicTransformerBlock``, ``ada_norm_zero``) the first lands before the
block; the second sits inside it, between the attention residual and ``norm3`` (the feed-forward
norm). :class:`BlockConvPositions` puts it there without copying the block: a pre-hook on ``norm3``
adds cpe2(x) to its input, and a hook on the block adds the same cpe2(x) to its output, which gives
exactly x' = x + cpe2(x), out = x' + gate * ffn(norm3(x')) since the block's last step is a residual.

Initialisation: ``"trunc_normal"`` (std 0.02, bias 0), as NaLaFormer's ``_init_weights`` does every
convolution; ``"zero"``, for conversions, so that a converted model's output is unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from nala_diffusion.models.options import CONV_INITS


def init_depthwise(conv: nn.Conv2d, init: str) -> None:
    """NaLaFormer's initialisation of its convolutions (``trunc_normal_(std=0.02)``, bias 0), or zeros."""
    if init not in CONV_INITS:
        raise ValueError(f"a convolution's init must be one of {CONV_INITS}, got {init!r}")
    if init == "zero":
        nn.init.zeros_(conv.weight)
    else:
        nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def depthwise(channels: int, kernel_size: int, init: str) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
    init_depthwise(conv, init)
    return conv


def on_grid(conv: nn.Conv2d, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """conv of (B, N, C) tokens laid out on a (rows, cols) grid, back as (B, N, C)."""
    batch, count, channels = tokens.shape
    rows, cols = grid
    if rows * cols != count:
        raise ValueError(f"a {rows}x{cols} grid holds {rows * cols} tokens, the input has {count}")
    image = tokens.transpose(1, 2).reshape(batch, channels, rows, cols)
    return conv(image).flatten(2).transpose(1, 2).to(tokens.dtype)


class BlockConvPositions(nn.Module):
    """The two CPE convolutions of one DiT block: :meth:`before_block` (cpe1, in the model's loop) and
    cpe2, attached to the block by :meth:`attach`. ``grid`` is set by the model before each call."""

    def __init__(self, channels: int, init: str = "trunc_normal"):
        super().__init__()
        self.cpe1 = depthwise(channels, 3, init)
        self.cpe2 = depthwise(channels, 3, init)
        self.grid: Optional[Tuple[int, int]] = None
        self._added: Optional[torch.Tensor] = None

    def before_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + on_grid(self.cpe1, hidden_states, self.grid)

    def attach(self, block: nn.Module) -> None:
        """Hooks that place cpe2 between ``block``'s attention residual and its feed-forward norm."""
        if getattr(block, "norm_type", None) != "ada_norm_zero" or getattr(block, "attn2", None) is not None:
            raise ValueError("convolutional positions fit a DiT block (ada_norm_zero, no cross-attention)")
        block.norm3.register_forward_pre_hook(self._before_ffn_norm)
        block.register_forward_hook(self._after_block)

    def _before_ffn_norm(self, module, inputs):
        (hidden_states,) = inputs
        self._added = on_grid(self.cpe2, hidden_states, self.grid)
        return (hidden_states + self._added,)

    def _after_block(self, module, inputs, output):
        added, self._added = self._added, None
        return output + added
