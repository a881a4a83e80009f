"""Opens this folder with diffusers' loader:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

The code is the installed nala_diffusion package's (pip install nala-diffusion); this file only names it.
"""

from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline  # noqa: F401
