"""Names a package exports without importing their modules until first use (so that ``--help`` and light
imports stay fast)."""

import importlib
from typing import Any, Callable, Dict


def lazy_getattr(package: str, where: Dict[str, str], namespace: Dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each exported name to its submodule (relative to
    ``package``); the first lookup imports it and keeps the value in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    return __getattr__
