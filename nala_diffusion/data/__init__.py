"""Training and evaluation data: ImageFolder datasets and the built-in offline ones
(``builtin:photos``, ``builtin:pairs``)."""

from nala_diffusion.data.datasets import load_dataset

__all__ = ["load_dataset"]
