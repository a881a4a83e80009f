"""The attention maths, in plain torch (no diffusers): NaLa and the kernels it is compared with.

One file per job:

- ``nala``: :func:`nala_attention`, which picks one of NaLa's paths;
- ``feature_maps``: NaLa's norm-aware power and feature maps (the one definition every path uses)
  and the baselines' kernel features;
- ``params``: the kernels' parameters and defaults (frozen objects, declared once), handed whole to
  every path and to the analysis functions;
- ``dense`` (autograd, CUDA), ``gather`` (relu_split inference on CPU), ``fused`` (``torch.compile``):
  the fast paths; ``reference``: the formulas written literally, beside them;
- ``readout``: the linear-attention readout; ``rope``: 2D rotary tables;
- ``baselines``: ReLU / 1+ELU linear attention and softmax attention;
- ``attention_weights``: explicit attention matrices, entropy and the norm effect, for analysis;
- ``common``: input checks and small helpers.

Nothing here imports diffusers or the rest of the package: ``nala_diffusion.models`` builds on it.
"""

from nala_diffusion.ops.baselines import linear_attention, softmax_attention
from nala_diffusion.ops.common import compute_dtype
from nala_diffusion.ops.feature_maps import (
    nala_key_features,
    nala_key_halves,
    nala_query_features,
    nala_query_halves,
    power_sensitivity,
    query_power,
)
from nala_diffusion.ops.nala import nala_attention
from nala_diffusion.ops.params import LinearParams, NaLaParams, SoftmaxParams
from nala_diffusion.ops.reference import nala_attention_explicit
from nala_diffusion.ops.rope import apply_rope, rope_2d_tables

__all__ = ["LinearParams", "NaLaParams", "SoftmaxParams", "apply_rope", "compute_dtype", "linear_attention", "nala_attention", "nala_attention_explicit",
           "nala_key_features", "nala_key_halves", "nala_query_features", "nala_query_halves", "power_sensitivity",
           "query_power", "rope_2d_tables", "softmax_attention"]
