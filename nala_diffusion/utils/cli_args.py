"""argparse types shared by the command-line tools: a bad value is a usage error (exit status 2)
that names the option, never a traceback later on."""

import argparse
import os
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help already says it or the default
    is None (whose meaning the help text gives)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _our_roots():
    """The folders of this project's code: the package, and the tool folders installed into it."""
    import importlib.util

    roots = []
    for name in ("nala_diffusion", "nala_diffusion.pipelines", "nala_diffusion.train", "nala_diffusion.eval"):
        spec = importlib.util.find_spec(name)
        roots += [os.path.abspath(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return tuple(roots)


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is one of this project's own refusals: raised by a ``raise`` statement in its
    code (a message meant for the user), not by a library or a builtin failing inside it (a bug)."""
    import linecache

    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    filename = os.path.abspath(frame.tb_frame.f_code.co_filename)
    if not filename.startswith(tuple(root + os.sep for root in _our_roots())):
        return False
    return linecache.getline(filename, frame.tb_lineno).lstrip().startswith("raise")


def exit_on_input_error(prog: str, error: BaseException) -> int:
    """For a CLI's ``except ValueError``: one line and exit status 2 for the user's mistakes; anything
    else is re-raised with its traceback, so that bugs are not hidden behind a one-liner."""
    if not is_input_error(error):
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
