"""nala_diffusion: NaLa (norm-aware linear attention) for diffusion transformers, on diffusers.

The package root loads lazily, as diffusers' own does: ``import nala_diffusion`` costs little, and
each name below imports its module (and diffusers, where that module needs it) on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"

_EXPORTS: Dict[str, List[str]] = {
    "assets": ["demo_classifier_path", "demo_pipeline_path"],
    "metrics.classifier": ["DomainClassifier"],
    "models.conversion": ["convert_dit_to_nala", "with_new_class_embedding"],
    "models.sources": ["load_denoiser", "load_dit", "load_vae"],
    "models.sit": ["convert_sit_to_nala", "load_sit"],
    "ops": [
        "apply_rope",
        "linear_attention",
        "nala_attention",
        "nala_attention_explicit",
        "nala_key_features",
        "nala_key_halves",
        "nala_query_features",
        "nala_query_halves",
        "power_sensitivity",
        "query_power",
        "rope_2d_tables",
        "softmax_attention",
    ],
    "models.transformer": ["DIT_PRESETS", "NaLaDiTTransformer2DModel", "preset_config"],
    "models.norm_awareness": ["calibrate_norm_scale", "capture_queries", "saturation_report"],
    "models.options": ["AttentionOptions"],
    "models.processors": [
        "ATTENTION_KINDS",
        "ATTENTION_PROCESSORS",
        "ELULinearAttnProcessor",
        "KernelAttnProcessor",
        "NaLaAttnProcessor",
        "ReLULinearAttnProcessor",
        "SoftmaxAttnProcessor",
    ],
    "models.sharpness": ["set_attention_sharpness"],
    "models.swap": [
        "ATTENTION_TYPES",
        "restore_attention",
        "self_attention_modules",
        "set_attention",
        "set_attention_backend",
        "set_fused_attention",
        "set_nala_attention",
    ],
    "pipelines": ["HighResPipelineOutput", "NaLaDiTHighResPipeline", "NaLaDiTPipeline", "NaLaPipelineOutput",
                  "convert_dit_pipeline_to_nala"],
    "pipelines.request": ["SamplingRequest"],
    "train.run_config": ["RunConfig"],
}
# diffusers' pipeline loader looks up base classes such as ModelMixin in the namespace of the
# library named in model_index.json; these names make "nala_diffusion" such a library.
_DIFFUSERS_BASES = ("ConfigMixin", "DiffusionPipeline", "ModelMixin", "SchedulerMixin")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name in _DIFFUSERS_BASES:
        value = getattr(importlib.import_module("diffusers"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_WHERE) | set(_DIFFUSERS_BASES))


if TYPE_CHECKING:  # names for type checkers and IDEs
    from nala_diffusion.assets import demo_classifier_path, demo_pipeline_path  # noqa: F401
    from nala_diffusion.models.conversion import convert_dit_to_nala  # noqa: F401
    from nala_diffusion.models.sit import convert_sit_to_nala, load_sit  # noqa: F401
    from nala_diffusion.models.sources import load_denoiser, load_dit, load_vae  # noqa: F401
    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel  # noqa: F401
    from nala_diffusion.ops import linear_attention, nala_attention, softmax_attention  # noqa: F401
    from nala_diffusion.pipelines import NaLaDiTHighResPipeline, NaLaDiTPipeline, convert_dit_pipeline_to_nala  # noqa: F401
