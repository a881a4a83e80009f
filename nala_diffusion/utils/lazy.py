"""Names imported on first use, so that command-line tools answer ``--help`` without importing
diffusers, accelerate or clean-fid (seconds each).

``Scheduler = lazy("diffusers", "DDPMScheduler")`` binds a stand-in that imports
``diffusers.DDPMScheduler`` the first time it is called, an attribute is read or it is used in
``isinstance``; ``features = lazy("nala_diffusion.metrics.features")`` does the same for a module.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional


class _Lazy:
    __slots__ = ("_module", "_name", "_target")

    def __init__(self, module: str, name: Optional[str] = None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_target", None)

    def _resolve(self) -> Any:
        target = object.__getattribute__(self, "_target")
        if target is None:
            module = importlib.import_module(object.__getattribute__(self, "_module"))
            name = object.__getattribute__(self, "_name")
            target = module if name is None else getattr(module, name)
            object.__setattr__(self, "_target", target)
        return target

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)

    def __instancecheck__(self, instance) -> bool:
        return isinstance(instance, self._resolve())

    def __subclasscheck__(self, subclass) -> bool:
        return issubclass(subclass, self._resolve())

    def __repr__(self) -> str:
        name = object.__getattribute__(self, "_name")
        return f"<lazy {object.__getattribute__(self, '_module')}{'.' + name if name else ''}>"


def lazy(module: str, name: Optional[str] = None) -> Any:
    """A stand-in for ``module`` (or ``module.name``) that imports it on first use."""
    return _Lazy(module, name)
