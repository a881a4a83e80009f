"""Opens this folder with diffusers' loader as the high-resolution pipeline:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_nala_dit_highres", trust_remote_code=True)

The code is the installed nala_diffusion package's (pip install nala-diffusion); this file only names it.
"""

from nala_diffusion.pipelines.pipeline_nala_dit_highres import NaLaDiTHighResPipeline  # noqa: F401
