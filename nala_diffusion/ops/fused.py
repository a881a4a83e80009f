"""NaLa inference fused with ``torch.compile``: ``nala_attention(..., compile=True)``.

The eager kernel (:func:`~nala_diffusion.nala_attention`) runs each elementwise step of the feature
maps as its own pass over memory. Here the very same functions of :mod:`nala_diffusion.ops` are
handed to ``torch.compile``, and TorchInductor fuses each into a few loops (norm, tanh,
|u|^p = exp(p log|u|), sign split or angles): for ``relu_split`` on CPU the gather path's two
feature functions (query terms and key table), elsewhere the whole dense kernel
(:func:`~nala_diffusion.ops.dense.dense_nala`). There is no second copy of the math.

Inference only: with autograd the eager kernel runs. The first call for a new shape compiles
(seconds on a CPU; it needs a C++ compiler there).
"""

from __future__ import annotations

import torch

from nala_diffusion.ops.dense import dense_inference, dense_nala
from nala_diffusion.ops.gather import relu_split_gather, relu_split_query_terms, relu_split_table
from nala_diffusion.ops.params import NaLaParams

_compiled = {}


def compiled(function):
    """``torch.compile(function)``, built once per process."""
    if function not in _compiled:
        _compiled[function] = torch.compile(function, dynamic=None)
    return _compiled[function]


def _compile_error(error: Exception) -> Exception:
    if type(error).__module__.startswith("torch._dynamo") or "inductor" in repr(error).lower():
        return RuntimeError(
            "nala_attention(compile=True) could not compile its kernel with torch.compile "
            f"(on CPU TorchInductor needs a C++ compiler): {error}. Use compile=False."
        )
    return error


@torch.no_grad()
def nala_attention_fused(q, k, v, params: NaLaParams, denominator_eps, rope=None, gather: bool = True,
                         backend: str = "auto") -> torch.Tensor:
    """(batch, heads, tokens, d) in the compute dtype, keys scaled
    (:func:`~nala_diffusion.ops.feature_maps.scaled_keys`) -> the same shape; see the module docstring."""
    try:
        if params.inhibit == "relu_split" and rope is None and gather:
            return relu_split_gather(q, k, v, params, denominator_eps,
                                     query_terms=compiled(relu_split_query_terms), table=compiled(relu_split_table))
        return dense_inference(q, k, v, params, denominator_eps, rope, kernel=compiled(dense_nala), backend=backend)
    except Exception as error:  # compilation errors come in many types
        raised = _compile_error(error)
        if raised is error:
            raise
        raise raised from error
