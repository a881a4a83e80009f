"""Paths of the files shipped inside the package: the demo pipeline and the domain classifier."""

import os

ASSETS = os.path.dirname(os.path.abspath(__file__))


def _existing(name: str) -> str:
    path = os.path.join(ASSETS, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"the shipped folder {path} is missing; reinstall nala-diffusion")
    return path


def demo_pipeline_path() -> str:
    """The demo NaLa DiT pipeline folder (trained on builtin:photos), for ``NaLaDiTPipeline.from_pretrained``."""
    return _existing("demo_pipeline")


def demo_classifier_path() -> str:
    """The builtin:photos domain classifier folder, for ``DomainClassifier.from_pretrained``."""
    return _existing("photos_classifier")
