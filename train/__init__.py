"""Training tools of nala_diffusion (installed as ``nala_diffusion.train``): ``train(RunConfig(...))`` runs what
``nala-train`` runs with the same flags."""

from nala_diffusion.utils.lazy import lazy_getattr

_WHERE = {"RunConfig": "run_config", "train": "train_nala_dit"}
__all__ = sorted(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE, globals())
