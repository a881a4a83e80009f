"""File helpers shared by the tools."""

import os


def new_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file (``mkstemp`` gives 0o600,
    which would hide results in a shared folder from everyone else)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
