"""Pipelines of nala_diffusion (installed as ``nala_diffusion.pipelines``)."""

from .pipeline_nala_dit import NaLaDiTPipeline, NaLaPipelineOutput
from .pipeline_nala_dit_highres import HighResPipelineOutput, NaLaDiTHighResPipeline

__all__ = ["HighResPipelineOutput", "NaLaDiTHighResPipeline", "NaLaDiTPipeline", "NaLaPipelineOutput"]
