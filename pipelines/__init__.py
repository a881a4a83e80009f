"""Pipelines of nala_diffusion (installed as ``nala_diffusion.pipelines``), loaded on first use."""

from nala_diffusion.utils.lazy import lazy_getattr

_WHERE = {
    "NaLaDiTPipeline": "pipeline_nala_dit",
    "NaLaPipelineOutput": "pipeline_nala_dit",
    "NaLaDiTHighResPipeline": "pipeline_nala_dit_highres",
    "HighResPipelineOutput": "pipeline_nala_dit_highres",
    "convert_dit_pipeline_to_nala": "conversion",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE, globals())
