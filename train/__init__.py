"""Training tools of nala_diffusion (installed as ``nala_diffusion.train``): ``train(RunConfig(...))`` runs what
``nala-train`` runs with the same flags."""

import importlib

_WHERE = {"RunConfig": "run_config", "train": "train_nala_dit"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
