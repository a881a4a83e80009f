"""Attention-output distillation: each student block's attention output matched to a teacher's attention
on the same hidden states (LinFusion, CLEAR), beside the noise and output-distillation losses.

    distiller = AttentionDistillation(student, teacher)        # teacher None: the student's own q, k, v
    with distiller.capture():                                  #   projections under softmax attention
        output = student(noisy, timestep=t, class_labels=y)
    losses = distiller.losses()                                # {"loss_attention": mean, "loss_attention_3": ...}

For block i the target is the teacher's block-i attention applied to the input the student's block-i
attention received (its normed, modulated hidden states), without gradient; the loss is the mean squared
error to the student's attention output. Blocks whose student attention is already softmax are skipped:
against their own softmax they would distil to themselves at zero cost.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _kind(processor) -> Optional[str]:
    return getattr(processor, "attention_type", None)


class AttentionDistillation:
    """Captures the student's attention inputs and outputs during one forward pass and scores them against
    the teacher's attention (see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None):
        from nala_diffusion.models.swap import make_processor

        blocks = list(student.transformer_blocks)
        if teacher is not None and len(teacher.transformer_blocks) != len(blocks):
            raise ValueError(f"attention distillation pairs blocks: the teacher has {len(teacher.transformer_blocks)}, "
                             f"the student {len(blocks)}")
        self.layers: List[Tuple[int, nn.Module, nn.Module, Optional[object]]] = []
        for index, block in enumerate(blocks):
            attention = block.attn1
            if _kind(attention.processor) == "softmax":
                continue
            if teacher is not None:
                target = teacher.transformer_blocks[index].attn1
                if target.inner_dim != attention.inner_dim or target.heads != attention.heads:
                    raise ValueError(f"block {index}: the teacher's attention has {target.heads} heads of width "
                                     f"{target.inner_dim}, the student's {attention.heads} of {attention.inner_dim}")
                self.layers.append((index, attention, target, None))
            else:  # the student's own projections under plain softmax (no extras)
                self.layers.append((index, attention, attention, make_processor("softmax", attention)))
        if not self.layers:
            raise ValueError("attention distillation has nothing to distil: every block of the student runs softmax")
        self._captured: Dict[int, Tuple[torch.Tensor, dict, torch.Tensor]] = {}

    @property
    def layer_indices(self) -> List[int]:
        return [index for index, *_ in self.layers]

    @contextlib.contextmanager
    def capture(self) -> Iterator["AttentionDistillation"]:
        """Record each distilled block's attention input, keywords and output during the forward pass
        inside the block (the first call per block: a gradient-checkpointing recomputation is not a
        second sample)."""
        self._captured = {}
        handles = []
        for index, attention, _, _ in self.layers:
            def hook(module, args, kwargs, output, index=index):
                if index not in self._captured:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    keywords = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                    self._captured[index] = (hidden, keywords, output)
            handles.append(attention.register_forward_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def losses(self) -> Dict[str, torch.Tensor]:
        """``loss_attention`` (the mean over distilled blocks) and ``loss_attention_<block>`` per block."""
        missing = [index for index in self.layer_indices if index not in self._captured]
        if missing:
            raise RuntimeError(f"no attention output was captured for blocks {missing}; run the student inside capture()")
        per_layer = {}
        for index, _, target, processor in self.layers:
            hidden, keywords, output = self._captured[index]
            with torch.no_grad():
                hidden = hidden.detach().to(next(target.parameters()).dtype)
                if processor is not None:
                    expected = processor(target, hidden, **_accepted(processor, keywords))
                else:
                    expected = target(hidden, **_accepted(target.processor, keywords))
            per_layer[f"loss_attention_{index}"] = F.mse_loss(output.float(), expected.float())
        self._captured = {}
        return {"loss_attention": torch.stack(list(per_layer.values())).mean(), **per_layer}


def _accepted(processor, keywords: dict) -> dict:
    """The keywords a processor's ``__call__`` names (``Attention`` would drop the rest with a warning)."""
    import inspect

    names = inspect.signature(processor.__call__).parameters
    return {k: v for k, v in keywords.items() if k in names}
