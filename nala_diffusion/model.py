"""Where ``NaLaDiTTransformer2DModel`` lived before the package had sub-packages.

Pipeline folders saved then name ``nala_diffusion.model`` as the transformer's library in their
``model_index.json`` (the shipped demo among them); diffusers imports that module to load them, so
it stays, re-exporting the model from :mod:`nala_diffusion.models.transformer`. diffusers finds a
component's loading methods through the base classes named in that module (``ModelMixin``), so it
names them too.
"""

from diffusers import ConfigMixin, ModelMixin

from nala_diffusion.models.transformer import DIT_PRESETS, NaLaDiTTransformer2DModel, preset_config

__all__ = ["DIT_PRESETS", "ConfigMixin", "ModelMixin", "NaLaDiTTransformer2DModel", "preset_config"]
