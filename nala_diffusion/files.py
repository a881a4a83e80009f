"""File helpers shared by the tools."""

import os
import tempfile


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


def save_grid_atomically(images, path: str, nrow: int) -> None:
    """Write the grid beside ``path`` and rename it into place, so no half-written PNG is left."""
    from torchvision.utils import make_grid, save_image

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".png")
    os.close(handle)
    os.chmod(temporary, new_file_mode())
    try:
        save_image(grid, temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
