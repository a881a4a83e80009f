"""Pipelines of nala_diffusion (installed as ``nala_diffusion.pipelines``), loaded on first use."""

import importlib

_WHERE = {
    "NaLaDiTPipeline": "pipeline_nala_dit",
    "NaLaPipelineOutput": "pipeline_nala_dit",
    "NaLaDiTHighResPipeline": "pipeline_nala_dit_highres",
    "HighResPipelineOutput": "pipeline_nala_dit_highres",
    "convert_dit_pipeline_to_nala": "conversion",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
