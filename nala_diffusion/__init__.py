"""nala_diffusion: NaLa (norm-aware linear attention) for diffusion transformers, on diffusers."""

from .assets import demo_classifier_path, demo_pipeline_path
from .classifier import DomainClassifier
from .conversion import convert_dit_to_nala, load_dit, load_transformer
from .kernels import (
    nala_attention_explicit,
    apply_rope,
    linear_attention,
    nala_attention,
    nala_key_features,
    nala_query_features,
    power_sensitivity,
    query_power,
    rope_2d_tables,
    softmax_attention,
)
from .norm_awareness import calibrate_norm_scale, capture_queries, saturation_report
from .model import DIT_PRESETS, NaLaDiTTransformer2DModel, preset_config
from .processors import (
    ATTENTION_PROCESSORS,
    ELULinearAttnProcessor,
    KernelAttnProcessor,
    NaLaAttnProcessor,
    ReLULinearAttnProcessor,
    SoftmaxAttnProcessor,
)
from .swap import (
    ATTENTION_TYPES,
    restore_attention,
    self_attention_modules,
    set_attention,
    set_fused_attention,
    set_nala_attention,
)

# diffusers' pipeline loader looks up base classes such as ModelMixin in the namespace of the
# library named in model_index.json; these names make "nala_diffusion" such a library.
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: E402,F401

from .pipelines import HighResPipelineOutput, NaLaDiTHighResPipeline, NaLaDiTPipeline  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_PROCESSORS",
    "ATTENTION_TYPES",
    "DIT_PRESETS",
    "DomainClassifier",
    "ELULinearAttnProcessor",
    "KernelAttnProcessor",
    "HighResPipelineOutput",
    "NaLaAttnProcessor",
    "NaLaDiTHighResPipeline",
    "NaLaDiTPipeline",
    "NaLaDiTTransformer2DModel",
    "ReLULinearAttnProcessor",
    "SoftmaxAttnProcessor",
    "apply_rope",
    "calibrate_norm_scale",
    "capture_queries",
    "convert_dit_to_nala",
    "demo_classifier_path",
    "demo_pipeline_path",
    "linear_attention",
    "load_dit",
    "load_transformer",
    "nala_attention",
    "nala_attention_explicit",
    "nala_key_features",
    "nala_query_features",
    "power_sensitivity",
    "preset_config",
    "query_power",
    "restore_attention",
    "rope_2d_tables",
    "saturation_report",
    "self_attention_modules",
    "set_attention",
    "set_nala_attention",
    "set_fused_attention",
    "softmax_attention",
]
