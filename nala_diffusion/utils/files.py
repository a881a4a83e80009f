"""File helpers shared by the tools: modes that follow the umask, and writes that are atomic."""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def new_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file (``mkstemp`` gives 0o600,
    which would hide results in a shared folder from everyone else)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: str) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode a plain ``open()`` would: safetensors
    writes through a temporary file of mode 0o600, so weights, checkpoints and caches written under
    umask 022 would be unreadable to the other users of a shared folder."""
    mode = new_file_mode()
    files = [path] if os.path.isfile(path) else [os.path.join(root, name) for root, _, names in os.walk(path)
                                                   for name in names]
    for file in files:
        if (os.stat(file).st_mode & 0o777) == 0o600 and mode != 0o600:
            os.chmod(file, mode)


@contextlib.contextmanager
def written_atomically(path: str, suffix: str = "") -> Iterator[str]:
    """``with written_atomically(path) as temporary: <write temporary>``: the file is written beside
    ``path`` under a hidden temporary name and renamed into place only when the block succeeds, with the
    mode a plain ``open()`` would give; a failure leaves ``path`` as it was and no temporary behind.
    ``suffix`` keeps the extension that writers such as ``numpy.savez`` or PIL read the format from."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json_atomically(path: str, data: Any, sort_keys: bool = True) -> None:
    """``data`` as indented JSON at ``path``, written aside and renamed (values JSON cannot hold as text)."""
    with written_atomically(path, ".json") as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=sort_keys, default=str)
        handle.write("\n")


def write_text_atomically(path: str, text: str) -> None:
    """``text`` (UTF-8) at ``path``, written aside and renamed."""
    with written_atomically(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def save_grid_atomically(images, path: str, nrow: int) -> None:
    """Write a grid of ``images`` (B, 3, H, W in [0, 1]) as a PNG at ``path``, aside and renamed."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    with written_atomically(path, ".png") as temporary:
        save_image(grid, temporary, format="PNG")
