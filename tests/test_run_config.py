"""A training run is one RunConfig: built from nala-train's flags or from Python, checked once, and the run
it gives is the same either way."""

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
from test_train import data  # noqa: F401 (the tiny ImageFolder fixture)

from nala_diffusion.train.run_config import RunConfig, build_parser, flags_of
from nala_diffusion.train.train_nala_dit import cli, parse_args, train


def test_train_from_python_and_from_the_command_line_give_identical_weights(data, tmp_path):  # noqa: F811
    settings = {"train_data_dir": str(data / "images"), "resolution": 16, "model_config": str(data / "tiny.json"),
                "train_batch_size": 4, "max_train_steps": 3, "checkpointing_steps": 2, "report_to": "none",
                "use_ema": True, "softmax_layers": [-1], "use_lepe": True, "power_scale": 2.0, "learning_rate": 1e-3}
    assert cli([*flags_of(settings), "--output_dir", str(tmp_path / "cli")]) == 0
    assert train(RunConfig(**settings, output_dir=str(tmp_path / "python"))) == 0
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "cli" / weights).read_bytes() == (tmp_path / "python" / weights).read_bytes()
    recorded = [json.loads((tmp_path / run / "args.json").read_text()) for run in ("cli", "python")]
    assert {k: v for k, v in recorded[0].items() if k != "output_dir"} == \
        {k: v for k, v in recorded[1].items() if k != "output_dir"}


def test_the_flags_and_the_fields_are_one_list():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(RunConfig)}
    config = parse_args(["--dataset", "builtin:photos", "--max_train_steps", "5", "--output_dir", "out",
                         "--attention", "relu_linear", "--attention_eps", "0.001", "--no-use_cpe", "--learning_rate", "0"])
    assert (config.attention_type, config.eps, config.use_cpe, config.learning_rate) == ("relu_linear", 1e-3, False, 0.0)
    assert config == RunConfig(dataset="builtin:photos", max_train_steps=5, output_dir="out", attention_type="relu_linear",
                               eps=1e-3, use_cpe=False, learning_rate=0)  # 0 and 0.0 are one rate
    assert config.lr_scheduler == "constant" and config.but(lr_warmup_steps=3, lr_scheduler=None).lr_scheduler == \
        "constant_with_warmup"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1


@pytest.mark.parametrize("settings, message", [
    ({"dataset": "builtin:photos", "train_data_dir": "x"}, "exactly one of --train_data_dir and --dataset"),
    ({"softmax_layers": [-1], "attention_types": ["nala"]}, "not both|not allowed with"),
    ({"max_train_steps": 0}, "max_train_steps.*positive integer"),
    ({"lr_scheduler": "constant", "lr_warmup_steps": 5}, "constant has no warm-up"),
    ({"timestep_range": [500, 100]}, "--timestep_range LOW HIGH"),
    ({"objective": "flow", "prediction_type": "v_prediction"}, "a flow model predicts the velocity"),
])
def test_a_bad_combination_is_refused_from_python_and_from_flags(settings, message, capsys):
    base = {"dataset": "builtin:photos", "max_train_steps": 5, "output_dir": "out"}
    if "train_data_dir" in settings:
        base.pop("dataset")
    with pytest.raises(ValueError, match=message):
        RunConfig(**{**base, **settings})
    with pytest.raises(SystemExit) as usage_error:  # a usage error, as a bad flag is
        cli(flags_of({**base, **settings}))
    assert usage_error.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_every_study_kind_gives_the_run_its_recorded_flags_give():
    """A study trains RunConfig(study settings + the kind's); parsing the flags it records gives the same run."""
    from nala_diffusion.eval.studies.common import run_config
    from nala_diffusion.eval.studies.norm import NORM_VARIANTS
    from nala_diffusion.eval.studies.objective import ATTENTION, OBJECTIVE_KINDS
    from nala_diffusion.eval.studies.quality import VARIANTS
    from nala_diffusion.eval.studies.retrieval import RETRIEVAL_VARIANTS, ConversionArm

    args = SimpleNamespace(architecture={"num_layers": 1}, batch_size=8, learning_rate=5e-4, timestep_range=[0, 500])
    kinds = {**{f"quality {k}": v.settings() for k, v in VARIANTS.items()},
             **{f"norm {k}": v.settings() for k, v in NORM_VARIANTS.items()},
             **{f"objective {k}": {**ATTENTION.settings(), **v} for k, v in OBJECTIVE_KINDS.items()},
             **{f"retrieval {k}": v.settings("anchor") if isinstance(v, ConversionArm) else v.settings()
                for k, v in RETRIEVAL_VARIANTS.items()}}
    assert len(kinds) > 30
    for name, settings in kinds.items():
        config = run_config("runs/x", "/tmp", settings, 10, 1, args, "builtin:pairs")
        flags = ["--dataset", "builtin:pairs", "--resolution", "32", "--model_config", "/tmp/model_config.json",
                 "--max_train_steps", "10", "--train_batch_size", "8", "--learning_rate", "0.0005", "--use_ema",
                 "--ema_decay", "0.995", "--checkpointing_steps", "5", "--checkpoints_total_limit", "1", "--seed", "1",
                 "--report_to", "none", "--output_dir", "runs/x", "--resume_from_checkpoint", "latest",
                 *flags_of(settings), "--timestep_range", "0", "500"]
        assert parse_args(flags) == config, name
