"""Checks on weights as they are loaded: nothing missing, nothing unexpected, nothing non-finite."""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_loaded_weights(module: torch.nn.Module, where: str, *, missing: Optional[List[str]] = None,
                         unexpected: Optional[List[str]] = None, mismatched: Optional[list] = None) -> None:
    """Raise ``ValueError`` naming the tensors when a module loaded from ``where`` lacks weights (given
    as ``missing``, or left on the ``meta`` device), had tensors it does not use, tensors of other
    shapes, or holds NaN/inf values."""
    missing = set(missing or [])
    missing |= {name for name, tensor in [*module.named_parameters(), *module.named_buffers()]
                if tensor.device.type == "meta"}
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"tensors of another shape: {_listing(str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched)}")
    if not problems:
        bad = [name for name, tensor in module.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if bad:
            problems.append(f"non-finite values (NaN or inf) in: {_listing(bad)}")
    if problems:
        raise ValueError(f"the weights in {where} do not fit {type(module).__name__}: " + "; ".join(problems)
                         + ". The file is incomplete, corrupt or for another model; nothing was loaded.")
