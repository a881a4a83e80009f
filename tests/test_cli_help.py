"""Every command-line option says what it does, and --help answers without the heavy imports."""
import argparse
import importlib
import subprocess
import sys

import pytest

CLIS = {
    "nala-sample": "nala_diffusion.pipelines.sample",
    "nala-train": "nala_diffusion.train.train_nala_dit",
    "nala-fid": "nala_diffusion.eval.fid",
    "nala-bench": "nala_diffusion.eval.benchmark",
    "nala-entropy": "nala_diffusion.eval.attention_entropy",
    "nala-quality": "nala_diffusion.eval.quality",
    "nala-study": "nala_diffusion.eval.study",
    "nala-retrieval": "nala_diffusion.eval.retrieval",
}


def parsers_of(module_name, monkeypatch):
    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(module_name).parse_args([])
    parsers, stack = [], list(captured)
    while stack:
        parser = stack.pop()
        parsers.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return parsers


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_every_option_has_help(prog, monkeypatch):
    missing = [f"{parser.prog} {action.option_strings or action.dest}"
               for parser in parsers_of(CLIS[prog], monkeypatch) for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]
    assert not missing, missing


def test_help_does_not_import_diffusers_accelerate_or_clean_fid():
    # every tool's --help in one fresh process: none of them may pull in the heavy libraries
    code = ("import contextlib, importlib, io, sys\n"
            f"for name in {sorted(CLIS.values())!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        importlib.import_module(name).parse_args(['--help'])\n"
            "print([name for name in ('diffusers', 'accelerate', 'cleanfid') if name in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from nala_diffusion.models.options import layer_attention_types
    from nala_diffusion.utils.cli_args import exit_on_input_error

    try:
        layer_attention_types(2, softmax_layers=[5])  # the user's mistake, refused by the project
    except ValueError as error:
        assert exit_on_input_error("nala-x", error) == 2
    assert capsys.readouterr().err.startswith("nala-x: error: softmax_layers index 5 is out of range")
    try:
        int("not a number")  # a ValueError no project code raised on purpose: a bug, shown whole
    except ValueError as error:
        with pytest.raises(ValueError, match="invalid literal"):
            exit_on_input_error("nala-x", error)


def test_flags_are_spelled_alike_across_tools_and_old_dashes_still_work():
    from nala_diffusion.eval.fid import parse_args as fid_args
    from nala_diffusion.pipelines.sample import parse_args as sample_args

    for spelling in ("--highres_mode", "--highres-mode"):
        assert sample_args([spelling, "progressive"]).highres_mode == "progressive"
    shared = ["--highres_mode", "progressive", "--position_embedding", "extend", "--attention_sharpness", "auto",
              "--guidance_interval", "1", "2", "--guidance_channels", "3", "--learned_variance", "--no_memory_check"]
    sample = sample_args(shared)
    fid = fid_args(["sample", "--model", "m", "--num_samples", "1", "--out", "o", *shared])
    for name in ("highres_mode", "position_embedding", "attention_sharpness", "guidance_interval", "guidance_channels",
                 "learned_variance", "memory_check"):
        assert getattr(sample, name) == getattr(fid, name), name
