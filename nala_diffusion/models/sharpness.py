"""Resolution-aware attention sharpness: keep each layer's attention entropy at its training level.

With N tokens instead of the training n, a query's attention spreads over more keys and its
entropy grows; images sampled above the training size lose detail. The remedy for softmax, free of
training, scales the logits by sqrt(log N / log n) (Jin et al., "Training-free diffusion model
adaptation for variable-sized text-to-image synthesis", 2023). NaLa has its own temperature, the
norm-aware power: :func:`calibrate_nala_sharpness` scales each layer's power so that its mean
attention entropy per query, relative to the uniform attention's log N, at N equals the one at n,
measured on the model itself.

Why relative: the same content at 4x the side spreads over 16x the tokens, and the entropy of an
attention that keeps its pattern grows by log 16. Matching the absolute entropy would ask each
query to attend to 1/16 of the content it attended to at the training size; for a linear kernel
it is also out of reach (on the shipped demo at 4x: 3.9 nats at the training size, 6.6 at 4x, still
5.7 with the power multiplied by 16).

The sharpness is a run-time setting of the processors (``processor.attention_sharpness``), never
saved with the model; :func:`set_attention_sharpness` sets it, :func:`attention_sharpness_of` reads it.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Union

import torch
from torch import nn

from nala_diffusion.models.norm_awareness import capture_queries
from nala_diffusion.models.processors import KernelAttnProcessor, NaLaAttnProcessor, SoftmaxAttnProcessor
from nala_diffusion.models.swap import self_attention_modules
from nala_diffusion.ops.attention_weights import mean_entropy

SHARPNESS_MODES = ("off", "auto")
#: the search range of NaLa's power factor
NALA_SHARPNESS_BOUNDS = (0.25, 16.0)


def _kernel_processors(model: nn.Module) -> Dict[str, KernelAttnProcessor]:
    return {name: attn.processor for name, attn in self_attention_modules(model)
            if isinstance(attn.processor, KernelAttnProcessor)}


def set_attention_sharpness(model: nn.Module, sharpness: Union[float, Mapping[str, float]] = 1.0) -> int:
    """Set the run-time sharpness of every kernel processor of ``model`` (a float for all, or
    ``{layer name: value}``; 1 is off). Returns the number of processors set."""
    processors = _kernel_processors(model)
    values = sharpness if isinstance(sharpness, Mapping) else {name: sharpness for name in processors}
    unknown = sorted(set(values) - set(processors))
    if unknown:
        raise ValueError(f"no kernel attention layers named {unknown}; layers: {sorted(processors)}")
    for name, value in values.items():
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"attention sharpness must be a positive number, got {value} for {name}")
        processors[name].attention_sharpness = float(value)
    return len(values)


def attention_sharpness_of(model: nn.Module) -> Dict[str, float]:
    """{layer: sharpness} of every kernel processor of ``model``."""
    return {name: p.attention_sharpness for name, p in _kernel_processors(model).items()}


def softmax_sharpness_rule(train_tokens: int, tokens: int) -> float:
    """sqrt(log N / log n): the logit scale that keeps softmax's entropy at its training level."""
    if train_tokens < 2 or tokens < 2:
        return 1.0
    return math.sqrt(math.log(tokens) / math.log(train_tokens))


#: the calibration subsamples the queries so that a weight matrix holds at most this many entries
CALIBRATION_ENTRIES = 2**21


def _layer_entropy(processor: NaLaAttnProcessor, tensors: dict, sharpness: float) -> float:
    """Mean attention entropy per query divided by log(keys): 1 is uniform attention."""
    previous = processor.attention_sharpness
    processor.attention_sharpness = sharpness
    try:
        params = processor.kernel_params().detached()
        entropy = mean_entropy("nala", tensors["query"], tensors["key"], params, max_entries=CALIBRATION_ENTRIES)
        return entropy / math.log(tensors["key"].shape[-2])
    finally:
        processor.attention_sharpness = previous


@torch.no_grad()
def calibrate_nala_sharpness(model: nn.Module, train_inputs: dict, target_inputs: dict, iterations: int = 14
                             ) -> Dict[str, dict]:
    """Per NaLa layer, the power factor that brings the mean attention entropy per query over
    log(tokens) on ``target_inputs`` (keyword arguments of one model call at the target size) back
    to its value on ``train_inputs`` (the same content at the training size), found by bisection on
    a log scale.

    Layers are calibrated in order, each with the earlier layers' factors in place (a layer's input
    depends on them). The factors are left set on the model. Returns ``{layer: {"sharpness",
    "entropy_train", "entropy_target_off", "entropy_target_on"}}``; a factor that hits the search
    bounds (:data:`NALA_SHARPNESS_BOUNDS`) is clamped there.
    """
    layers = {name: p for name, p in _kernel_processors(model).items() if isinstance(p, NaLaAttnProcessor)}
    if not layers:
        return {}
    set_attention_sharpness(model, {name: 1.0 for name in layers})
    with capture_queries(model, keys=True) as captured:
        model(**train_inputs)
    train_entropy = {name: _layer_entropy(p, captured[name], 1.0) for name, p in layers.items()}
    result = {}
    low_bound, high_bound = (math.log(b) for b in NALA_SHARPNESS_BOUNDS)
    for name, processor in layers.items():
        with capture_queries(model, keys=True) as captured:
            model(**target_inputs)
        tensors, target = captured[name], train_entropy[name]
        off = _layer_entropy(processor, tensors, 1.0)
        low, high = low_bound, high_bound  # entropy falls as the power grows
        for _ in range(iterations):
            middle = (low + high) / 2
            if _layer_entropy(processor, tensors, math.exp(middle)) > target:
                low = middle
            else:
                high = middle
        sharpness = math.exp((low + high) / 2)
        processor.attention_sharpness = sharpness
        result[name] = {"sharpness": sharpness, "entropy_train": target, "entropy_target_off": off,
                        "entropy_target_on": _layer_entropy(processor, tensors, sharpness)}
    return result


def resolution_sharpness(model: nn.Module, train_tokens: int, tokens: int, train_inputs: dict, target_inputs: dict
                         ) -> Dict[str, dict]:
    """The ``"auto"`` setting for a grid of ``tokens`` (training grid: ``train_tokens``), set on the
    model: softmax layers get :func:`softmax_sharpness_rule`, NaLa layers
    :func:`calibrate_nala_sharpness`, other kernels (no temperature) stay at 1. Returns
    ``{layer: {"kernel", "sharpness", ...}}``."""
    processors = _kernel_processors(model)
    set_attention_sharpness(model, 1.0)
    if tokens == train_tokens:
        return {name: {"attention_type": p.attention_type, "sharpness": 1.0} for name, p in processors.items()}
    rule = softmax_sharpness_rule(train_tokens, tokens)
    set_attention_sharpness(model, {name: rule for name, p in processors.items() if isinstance(p, SoftmaxAttnProcessor)})
    calibrated = calibrate_nala_sharpness(model, train_inputs, target_inputs)
    return {name: {"attention_type": p.attention_type, **calibrated.get(name, {"sharpness": p.attention_sharpness})}
            for name, p in processors.items()}
