"""Is NaLa's norm-aware power alive? Query capture, sigma calibration and saturation reports.

NaLa's power p(r) = lambda (tau + tanh(r / sigma)) only makes the attention norm-aware while tanh
still bends at the query norms r a layer actually sees. With sigma = 1 (the official formula) and a
diffusers DiT (head_dim 64, xavier init) queries have r ~ 4..9 from the first step, tanh(r) > 0.998,
and the power is the constant lambda (tau + 1) for every query: the kernel has lost its
norm-awareness and gradients cannot bring it back (tanh's slope there is ~1e-6).

- :func:`capture_queries`: every self-attention layer's per-head queries on one forward pass.
- :func:`calibrate_norm_scale`: sigma per layer and head from those queries (a quantile of their
  norms, the median by default), for processors with ``norm_scale_mode`` ``"calibrated"`` or
  ``"learnable"``; the queries may come from another model with the same layer names (a teacher).
- :func:`saturation_report`: per layer and head, query-norm and power quantiles and the fraction of
  queries whose power still responds to the norm; warns about saturated layers.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from nala_diffusion.models.processors import NaLaAttnProcessor
from nala_diffusion.models.swap import self_attention_modules
from nala_diffusion.ops.feature_maps import power_sensitivity, query_power

#: |dp / d log r| below this counts as saturated: a 10 % change of the norm moves the power by
#: less than 0.01 (lambda = 3 reaches it at r / sigma ~ 2.9).
RESPONSE_THRESHOLD = 0.1
#: a layer is flagged as saturated when fewer than this fraction of its queries respond.
SATURATED_BELOW = 0.5
QUANTILES = (0.05, 0.5, 0.95)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


@contextlib.contextmanager
def capture_queries(model: nn.Module, keys: bool = False) -> Iterator[Dict[str, Dict[str, torch.Tensor]]]:
    """Inside the ``with`` block, every forward of ``model`` records each self-attention layer's
    queries (and keys) as the kernel gets them: ``{layer: {"query": (B, H, N, d), "key": ...}}``
    (after ``norm_q``/``norm_k`` where the layer has them; the last call wins)."""
    captured: Dict[str, Dict[str, torch.Tensor]] = {}
    hooks = []

    def hook(name, attn, which):
        norm = attn.norm_q if which == "query" else attn.norm_k

        def record(module, inputs, output):
            heads = _split_heads(output.detach(), attn.heads)
            captured.setdefault(name, {})[which] = norm(heads) if norm is not None else heads

        return record

    try:
        for name, attn in self_attention_modules(model):
            hooks.append(attn.to_q.register_forward_hook(hook(name, attn, "query")))
            if keys:
                hooks.append(attn.to_k.register_forward_hook(hook(name, attn, "key")))
        yield captured
    finally:
        for handle in hooks:
            handle.remove()


def applied_attention_weights(processor, query: torch.Tensor, key: torch.Tensor, grid=None) -> torch.Tensor:
    """The (B, H, N, M) weights a layer's kernel applies to its values, RoPE included: the processor's
    own ``attend`` on identity values (every kernel's output is linear in the values), in float64.

    For layers with ``use_rope`` (``grid`` = (rows, cols) of the tokens) these differ from
    :func:`~nala_diffusion.ops.attention_weights.attention_weights` of the captured queries and keys,
    which are taken before the rotation. For linear kernels RoPE turns the numerator's features only,
    so these rows need not sum to 1 and may hold negative weights."""
    rope = processor.rope_tables(grid, query)
    tokens = key.shape[-2]
    identity = torch.eye(tokens, dtype=query.dtype, device=query.device).expand(*key.shape[:-2], tokens, tokens)
    return processor.attend(query, key, identity, rope=rope).double()


def distribution_inputs(processor, query: torch.Tensor, key: torch.Tensor, grid=None):
    """The queries and keys whose kernel distribution
    (:func:`~nala_diffusion.ops.attention_weights.attention_weights`) is the one a layer attends with.

    Captured queries and keys are taken before RoPE. A softmax layer with ``use_rope`` rotates both
    inside its logits, so its distribution is that of the rotated pair (``grid`` = (rows, cols) of
    the tokens); a linear kernel (NaLa included) rotates the numerator's features only, and its
    normaliser's distribution stays that of the unrotated pair, which is returned unchanged."""
    if not (getattr(processor, "use_rope", False) and getattr(processor, "attention_type", None) == "softmax"):
        return query, key
    from nala_diffusion.ops.rope import apply_rope

    rope = processor.rope_tables(grid, query)
    return apply_rope(query, rope), apply_rope(key, rope)


def layer_queries(model: nn.Module, *args, **kwargs) -> Dict[str, torch.Tensor]:
    """{layer: queries (B, H, N, d)} of one ``model(*args, **kwargs)`` call, without gradients."""
    with capture_queries(model) as captured, torch.no_grad():
        model(*args, **kwargs)
    return {name: tensors["query"] for name, tensors in captured.items()}


def nala_processors(model: nn.Module) -> Dict[str, NaLaAttnProcessor]:
    """{layer name: processor} for every self-attention layer of ``model`` that runs NaLa."""
    return {name: attn.processor for name, attn in self_attention_modules(model)
            if isinstance(attn.processor, NaLaAttnProcessor)}


def _head_norms(queries: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (H, B * N) query norms in float32."""
    norms = torch.linalg.vector_norm(queries.float(), dim=-1)  # (B, H, N)
    return norms.transpose(0, 1).reshape(norms.shape[1], -1)


@torch.no_grad()
def calibrate_norm_scale(model: nn.Module, *args, quantile: float = 0.5, source: Optional[nn.Module] = None,
                         layers: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, list]:
    """Set sigma of every calibrated or learnable NaLa layer of ``model`` to a quantile (the median by
    default) of the query norms each head sees on ``source(*args, **kwargs)``.

    ``source`` defaults to ``model``; pass the pretrained teacher when converting (its layers must
    have the same names). With sigma at the median norm, half the queries have r / sigma < 1 and the
    power spreads over the bend of tanh. ``layers`` (attention module names) restricts it to those
    layers, e.g. the ones whose sigma was not inherited. Returns ``{layer: [sigma per head]}``.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    targets = {name: p for name, p in nala_processors(model).items() if p.norm_scale_mode != "fixed"
               and (layers is None or name in layers)}
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no NaLa layer with norm_scale_mode 'calibrated' or 'learnable' to calibrate"
        )
    queries = layer_queries(source if source is not None else model, *args, **kwargs)
    missing = sorted(set(targets) - set(queries))
    if missing:
        raise ValueError(f"the calibration pass saw no queries for layers {missing}")
    result = {}
    for name, processor in targets.items():
        norms = _head_norms(queries[name])  # (H, B * N)
        if processor.log_norm_scale.shape[0] == 1:  # one sigma shared by all heads
            norms = norms.reshape(1, -1)
        if norms.shape[0] != processor.log_norm_scale.shape[0]:
            raise ValueError(f"layer {name}: the source has {norms.shape[0]} heads, the model {processor.log_norm_scale.shape[0]}")
        sigma = torch.quantile(norms, quantile, dim=1).clamp_min(processor.eps)  # (H,)
        processor.set_norm_scale(sigma)
        result[name] = sigma.tolist()
    return result


def _quantiles(values: torch.Tensor) -> Dict[str, float]:
    points = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, points)}


@torch.no_grad()
def saturation_from_queries(processors: Dict[str, NaLaAttnProcessor], queries: Dict[str, torch.Tensor],
                            threshold: float = RESPONSE_THRESHOLD) -> Dict[str, dict]:
    """The report of :func:`saturation_report` from captured queries (see there)."""
    report = {}
    for name, processor in processors.items():
        if name not in queries:
            continue
        norms = _head_norms(queries[name])  # (H, B * N)
        heads = norms.shape[0]
        lam = torch.as_tensor(processor.resolved_power_scale(), dtype=torch.float32).expand(heads).reshape(heads, 1)
        sigma = torch.as_tensor(processor.resolved_norm_scale(), dtype=torch.float32).expand(heads).reshape(heads, 1)
        lam, sigma = lam.to(norms.device), sigma.to(norms.device)
        power = query_power(norms, lam, processor.power_offset, sigma)  # (H, B * N)
        responding = power_sensitivity(norms, lam, sigma).abs() > threshold  # (H, B * N)
        per_head = [{"norm": _quantiles(norms[h]), "power": _quantiles(power[h]),
                     "responding_fraction": float(responding[h].float().mean()),
                     "norm_scale": float(sigma[h])} for h in range(heads)]
        fraction = float(responding.float().mean())
        report[name] = {"heads": per_head, "norm": _quantiles(norms.flatten()), "power": _quantiles(power.flatten()),
                        "responding_fraction": fraction, "saturated": fraction < SATURATED_BELOW,
                        "uncalibrated": processor.norm_scale_uncalibrated}
    return report


def saturation_report(model: nn.Module, *args, threshold: float = RESPONSE_THRESHOLD, warn: bool = True,
                      **kwargs) -> Dict[str, dict]:
    """Per NaLa layer of ``model``, on the inputs of ``model(*args, **kwargs)``:

    - ``norm``, ``power``: quantiles (p5, p50, p95) of the query norms and of the power p(r), over
      all heads and per head (``heads``);
    - ``responding_fraction``: the share of queries whose power still responds to their norm,
      |dp / d log r| = lambda (r / sigma) sech^2(r / sigma) > ``threshold``;
    - ``saturated``: fewer than half respond. A warning names every saturated layer (``warn``);
    - ``uncalibrated``: sigma is per head (calibrated or learnable) but still holds its start value,
      never set from real query norms (:func:`calibrate_norm_scale`); warned about too.

    Works on any model whose self-attention runs :class:`~nala_diffusion.NaLaAttnProcessor` (ours,
    or a diffusers model after :func:`~nala_diffusion.set_nala_attention`); use real inputs (noised
    data at the timesteps you sample at), not random tensors.
    """
    processors = nala_processors(model)
    if not processors:
        raise ValueError(f"{type(model).__name__} has no NaLa self-attention layer to report on")
    report = saturation_from_queries(processors, layer_queries(model, *args, **kwargs), threshold)
    saturated = [name for name, layer in report.items() if layer["saturated"]]
    if warn:
        warn_if_uncalibrated(model)
    if warn and saturated:
        warnings.warn(
            f"NaLa's power is saturated in {len(saturated)} of {len(report)} layers ({', '.join(saturated)}): fewer "
            f"than {SATURATED_BELOW:.0%} of the queries have a power that responds to their norm, so these layers "
            "attend with a fixed temperature. A norm_scale near the typical query norm (norm_scale_mode='calibrated') "
            "keeps it responsive.",
            stacklevel=2,
        )
    return report


def uncalibrated_layers(model: nn.Module) -> List[str]:
    """The NaLa layers whose per-head sigma was never set (see :attr:`NaLaAttnProcessor.norm_scale_uncalibrated`)."""
    return [name for name, processor in nala_processors(model).items() if processor.norm_scale_uncalibrated]


def warn_if_uncalibrated(model: nn.Module) -> None:
    """Warn, naming them, about NaLa layers whose sigma was never calibrated: they run sigma = norm_scale
    (1 by default, NaLaFormer's formula, whose power saturates at a DiT's query norms)."""
    layers = uncalibrated_layers(model)
    if layers:
        warnings.warn(
            f"{len(layers)} NaLa layer(s) of this {type(model).__name__} have norm_scale_mode "
            f"'{nala_processors(model)[layers[0]].norm_scale_mode}' but their sigma was never calibrated "
            f"({', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}): they attend with sigma = norm_scale, "
            "where NaLa's power saturates. A model fresh from from_preset or the constructor is untrained; to use its "
            "kernel as trained models do, run nala_diffusion.calibrate_norm_scale(model, <real inputs>) (nala-train "
            "and conversion do it).", stacklevel=3)


def mean_responding_fraction(report: Dict[str, dict]) -> float:
    """The responding fraction averaged over the layers of a report."""
    return sum(layer["responding_fraction"] for layer in report.values()) / max(len(report), 1)
