"""diffusers attention processors that run the kernels of :mod:`nala_diffusion.ops`.

All processors share one shape (:class:`KernelAttnProcessor`): the projections, heads and
``norm_q``/``norm_k`` of the ``Attention`` module they serve, the same optional extras (LePE, output
gate, 2D RoPE), and a ``grid_size=(rows, cols)`` keyword that reaches them through
``cross_attention_kwargs``. They differ only in the kernel, so a comparison swaps only the kernel.

They are ``nn.Module``s: diffusers registers a module processor as a submodule of its
``Attention``, so LePE, gate and learnable-power parameters are saved and loaded with the model
(``...attn1.processor.lepe.weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Type

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from nala_diffusion.models.conv_positions import init_depthwise
from nala_diffusion.models.options import (  # noqa: F401  (NORM_SCALE_MODES re-exported)
    ATTENTION_TYPES,
    NORM_SCALE_MODES,
    AttentionOptions,
    option_names,
)
from nala_diffusion.ops import (
    LinearParams,
    NaLaParams,
    SoftmaxParams,
    compute_dtype,
    linear_attention,
    nala_attention,
    rope_2d_tables,
    softmax_attention,
)
from nala_diffusion.ops.params import KERNEL_PARAMS


def _resolve_grid(grid_size: Optional[Sequence[int]], num_tokens: int) -> Tuple[int, int]:
    """The (rows, cols) token grid: as given, or the square one when the token count is square."""
    if grid_size is not None:
        rows, cols = (int(s) for s in grid_size)
        if rows * cols != num_tokens:
            raise ValueError(f"grid_size {(rows, cols)} holds {rows * cols} tokens but the input has {num_tokens}")
        return rows, cols
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens do not form a square grid; pass grid_size=(rows, cols) through "
            "cross_attention_kwargs so LePE/RoPE know the token layout"
        )
    return side, side


class KernelAttnProcessor(nn.Module):
    r"""Self-attention processor around one attention kernel, with optional NaLaFormer extras.

    Args:
        hidden_size: channels of the attention (``heads * head_dim``); needed by LePE, the gate and
            per-head NaLa state. :func:`~nala_diffusion.set_attention` fills it in.
        num_heads: number of heads; needed by per-head NaLa state.
        query_dim: channels of the attention's input, for the gate (defaults to ``hidden_size``).
        **options: the options of :class:`~nala_diffusion.models.options.AttentionOptions` that this
            processor's ``attention_type`` takes. Extras for every kernel: ``use_lepe`` (a
            depthwise ``lepe_kernel_size`` convolution of V over the token grid, added to the output;
            ``lepe_init`` zero or NaLaFormer's trunc-normal), ``use_gate`` (``LayerNorm(o) * SiLU(W_g x)``), ``use_rope`` (2D
            rotary embedding; for linear kernels on the numerator's features) and ``rope_base``.
    """

    attention_type = "softmax"  # its kernel, and whose options it takes (the base: the extras only)

    def __init__(
        self,
        hidden_size: Optional[int] = None,
        num_heads: Optional[int] = None,
        query_dim: Optional[int] = None,
        **options,
    ):
        super().__init__()
        values = AttentionOptions.for_type(self.attention_type, **options)
        if (values["use_lepe"] or values["use_gate"]) and hidden_size is None:
            raise ValueError("use_lepe and use_gate need hidden_size (the attention's heads * head_dim)")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        for name, value in values.items():
            setattr(self, name, value)
        # resolution-aware sharpness, a run-time setting (not saved): softmax multiplies its logits
        # by it, NaLa its power; linear kernels have no temperature and ignore it
        self.attention_sharpness = 1.0
        if self.use_lepe:
            self.lepe = nn.Conv2d(
                hidden_size, hidden_size, self.lepe_kernel_size, padding=self.lepe_kernel_size // 2, groups=hidden_size
            )
            init_depthwise(self.lepe, self.lepe_init)
        if self.use_gate:
            self.gate_proj = nn.Linear(query_dim or hidden_size, hidden_size)
            self.gate_norm = nn.LayerNorm(hidden_size)

    # -- what subclasses provide -------------------------------------------------------------
    def attend(self, query, key, value, rope=None, attention_mask=None) -> torch.Tensor:
        raise NotImplementedError

    def rope_tables(self, grid: Optional[Tuple[int, int]], query: torch.Tensor):
        """The ``(cos, sin)`` tables this layer rotates queries like ``query`` (..., N, head_dim) with on a
        (rows, cols) token ``grid``; None without RoPE."""
        if not self.use_rope:
            return None
        if grid is None:
            raise ValueError("a layer with RoPE needs the token grid (rows, cols) to rebuild its rotation")
        return rope_2d_tables(grid, query.shape[-1], base=self.rope_base, device=query.device,
                              dtype=compute_dtype(query.dtype))

    def options(self) -> Dict[str, object]:
        """Settings that rebuild this processor (with ``hidden_size``/``num_heads``)."""
        return {name: getattr(self, name) for name in option_names(self.attention_type)}

    def kernel_params(self):
        """The parameters object this layer hands its kernel (:mod:`nala_diffusion.ops.params`), as it runs
        now; the analysis functions (:func:`~nala_diffusion.ops.attention_weights.attention_weights`) take
        the same object, so they measure the kernel the layer applies."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())

    # -- diffusers entry point ---------------------------------------------------------------
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        grid_size: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        # Named parameters (not *args/**kwargs): Attention.forward drops keywords a processor's
        # __call__ does not name, and grid_size must get through.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, grid_size)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        grid_size: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                f"{type(self).__name__} is for self-attention; it was given encoder_hidden_states. "
                "Swap only self-attention layers (set_attention does so)."
            )
        # Same steps, in the same order, as diffusers' AttnProcessor2_0.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            grid_size = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape  # (B, N, C)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, N, inner)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value_heads = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        grid = _resolve_grid(grid_size, sequence_length) if (self.use_lepe or self.use_rope) else None
        rope = self.rope_tables(grid, query)

        out = self.attend(query, key, value_heads, rope=rope, attention_mask=attention_mask)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, N, inner)
        out = out.to(query.dtype)

        if self.use_lepe:
            rows, cols = grid
            value_grid = value.transpose(1, 2).reshape(batch_size, inner_dim, rows, cols)  # (B, C, rows, cols)
            out = out + self.lepe(value_grid).flatten(2).transpose(1, 2).to(out.dtype)  # (B, N, C)
        if self.use_gate:
            out = self.gate_norm(out) * nn.functional.silu(self.gate_proj(hidden_states))

        out = attn.to_out[0](out)  # linear proj
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SoftmaxAttnProcessor(KernelAttnProcessor):
    """Softmax attention (SDPA); with no extras it computes exactly what ``AttnProcessor2_0`` does."""

    attention_type = "softmax"

    def kernel_params(self) -> SoftmaxParams:
        """The logit scale is the run-time ``attention_sharpness``."""
        return SoftmaxParams(logit_scale=self.attention_sharpness)

    def attend(self, query, key, value, rope=None, attention_mask=None):
        return softmax_attention(query, key, value, self.kernel_params(), attn_mask=attention_mask, rope=rope)


class _NoMaskMixin:
    def _reject_mask(self, attention_mask):
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not support attention_mask (linear attention over all tokens)")


class LinearAttnProcessor(_NoMaskMixin, KernelAttnProcessor):
    """Kernel linear attention, the base of :class:`ReLULinearAttnProcessor` (``feature_map`` ``"relu"``, as
    SANA) and :class:`ELULinearAttnProcessor` (``"elu"``, 1 + ELU)."""

    feature_map: str

    def kernel_params(self) -> LinearParams:
        return LinearParams(**{name: getattr(self, name) for name in LinearParams.names()})

    def attend(self, query, key, value, rope=None, attention_mask=None):
        self._reject_mask(attention_mask)
        return linear_attention(query, key, value, self.kernel_params(), feature_map=self.feature_map, rope=rope,
                                backend=getattr(self, "backend", "auto"))


class ReLULinearAttnProcessor(LinearAttnProcessor):
    """ReLU linear attention (SANA's kernel)."""

    attention_type = "relu_linear"
    feature_map = "relu"


class ELULinearAttnProcessor(LinearAttnProcessor):
    """1 + ELU linear attention (Katharopoulos et al. 2020)."""

    attention_type = "elu_linear"
    feature_map = "elu"


class NaLaAttnProcessor(_NoMaskMixin, KernelAttnProcessor):
    r"""Norm-aware linear attention (NaLaFormer) as a diffusers attention processor.

    Kernel options are those of :func:`~nala_diffusion.nala_attention`; ``learnable_power`` makes
    ``power_scale`` a per-head parameter (kept positive through its logarithm), initialised to
    ``power_scale``. The extras are those of :class:`KernelAttnProcessor`.

    The query-norm scale sigma of the power p(r) = lambda (tau + tanh(r / sigma)) is set by
    ``norm_scale_mode``:

    - ``"fixed"``: ``norm_scale`` for every head, no state (``norm_scale=1`` is the official formula);
    - ``"learnable"``: a per-head parameter ``log_norm_scale``, trained with the model;
    - ``"calibrated"``: a per-head buffer ``log_norm_scale``, set from the query norms the layer
      sees on real inputs (:func:`~nala_diffusion.calibrate_norm_scale`) and kept fixed.

    In the last two ``norm_scale`` is the starting value and the per-head values are saved with the
    model's weights; :func:`~nala_diffusion.calibrate_norm_scale` sets both kinds. A processor built
    without ``num_heads`` holds one sigma shared by all heads.

    Example::

        from nala_diffusion import NaLaAttnProcessor
        attn.set_processor(NaLaAttnProcessor(inhibit="cosine"))
        out = attn(hidden_states, grid_size=(16, 24))
    """

    attention_type = "nala"

    def __init__(self, hidden_size: Optional[int] = None, num_heads: Optional[int] = None,
                 query_dim: Optional[int] = None, **options):
        super().__init__(hidden_size, num_heads, query_dim, **options)
        if self.learnable_power and num_heads is None:
            raise ValueError("learnable_power needs num_heads (one power scale per head)")
        self.compile = False  # a run-time choice, not saved: see set_fused_attention
        if self.learnable_power:
            self.log_power_scale = nn.Parameter(torch.full((num_heads,), math.log(self.power_scale)))
        log_sigma = torch.full((num_heads or 1,), math.log(self.norm_scale))  # without num_heads: one for all heads
        if self.norm_scale_mode == "learnable":
            self.log_norm_scale = nn.Parameter(log_sigma)
        elif self.norm_scale_mode == "calibrated":
            self.register_buffer("log_norm_scale", log_sigma)

    def resolved_power_scale(self):
        """lambda as the kernel gets it (times the run-time ``attention_sharpness``): a float, or a
        per-head tensor when learnable."""
        power_scale = self.log_power_scale.exp() if self.learnable_power else self.power_scale
        return power_scale if self.attention_sharpness == 1.0 else power_scale * self.attention_sharpness

    def resolved_norm_scale(self):
        """sigma as the kernel gets it: a float (fixed), or a per-head tensor."""
        return self.norm_scale if self.norm_scale_mode == "fixed" else self.log_norm_scale.exp()

    @torch.no_grad()
    def set_norm_scale(self, sigma: torch.Tensor) -> None:
        """Set the per-head sigma (``(heads,)``, positive) of a learnable or calibrated processor."""
        if self.norm_scale_mode == "fixed":
            raise ValueError("this processor has a fixed norm_scale; build it with norm_scale_mode='calibrated' "
                             "or 'learnable' to set per-head values")
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.shape != self.log_norm_scale.shape or not bool((sigma > 0).all() & torch.isfinite(sigma).all()):
            raise ValueError(f"norm scales must be {tuple(self.log_norm_scale.shape)} positive finite values, got {sigma}")
        self.log_norm_scale.copy_(sigma.log().to(self.log_norm_scale))

    @property
    def norm_scale_uncalibrated(self) -> bool:
        """True for a calibrated or learnable sigma that still holds its start value ``norm_scale`` in every
        head: nothing (training, conversion, :func:`~nala_diffusion.calibrate_norm_scale`) has set it yet."""
        if self.norm_scale_mode == "fixed":
            return False
        return bool((self.log_norm_scale.detach() == math.log(self.norm_scale)).all())

    def kernel_params(self) -> NaLaParams:
        """The :class:`~nala_diffusion.ops.params.NaLaParams` this layer runs with: its options, with lambda
        and sigma resolved (per-head tensors where learnable or calibrated, lambda times the sharpness)."""
        values = {name: getattr(self, name) for name in NaLaParams.names()}
        return NaLaParams(**{**values, "power_scale": self.resolved_power_scale(), "norm_scale": self.resolved_norm_scale()})

    def attend(self, query, key, value, rope=None, attention_mask=None):
        self._reject_mask(attention_mask)
        return nala_attention(query, key, value, self.kernel_params(), rope=rope, compile=self.compile,
                              backend=getattr(self, "backend", "auto"))


@dataclass(frozen=True)
class AttentionKind:
    """One attention type: its processor class, its kernel's parameter class and the options it takes."""

    name: str
    processor: Type[KernelAttnProcessor]
    params: type

    @property
    def options(self) -> Tuple[str, ...]:
        return option_names(self.name)


#: every attention type (:data:`~nala_diffusion.models.options.ATTENTION_TYPES`) with its processor, parameters
#: and options: the one table the swap, the model and the tools read
ATTENTION_KINDS: Dict[str, AttentionKind] = {
    cls.attention_type: AttentionKind(cls.attention_type, cls, KERNEL_PARAMS[cls.attention_type])
    for cls in (NaLaAttnProcessor, SoftmaxAttnProcessor, ReLULinearAttnProcessor, ELULinearAttnProcessor)
}
if tuple(sorted(ATTENTION_KINDS)) != tuple(sorted(ATTENTION_TYPES)):
    raise ImportError(f"attention kinds without a processor or processors without a kind: {sorted(ATTENTION_KINDS)} "
                      f"against {sorted(ATTENTION_TYPES)}")
ATTENTION_PROCESSORS: Dict[str, Type[KernelAttnProcessor]] = {name: kind.processor
                                                              for name, kind in ATTENTION_KINDS.items()}
