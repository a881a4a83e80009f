"""One declaration per option, one way down: ops is the bottom room, options reach the kernel and the
analysis functions whole, and sigma has one default."""

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import TINY, tiny_nala

from nala_diffusion import NaLaDiTPipeline, NaLaDiTTransformer2DModel, calibrate_norm_scale
from nala_diffusion.models.options import DEFAULTS, option_names
from nala_diffusion.models.processors import ATTENTION_PROCESSORS
from nala_diffusion.ops import LinearParams, NaLaParams, SoftmaxParams
from nala_diffusion.ops.attention_weights import attention_weights

PACKAGE = Path(__file__).resolve().parents[1] / "nala_diffusion"


def test_ops_is_the_bottom_room():
    code = ("import sys, nala_diffusion.ops; "
            "assert 'nala_diffusion.models' not in sys.modules and 'diffusers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('nala_diffusion', 'diffusers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_kernel_option_is_named_in_few_files():
    # a NaLa option lives in its declaration (ops/params.py), the feature maps that use it and the
    # processor-level list with its help text (models/options.py); nothing else unpacks it
    files = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "key_power" in p.read_text())
    assert len(files) <= 4, files


# every NaLa option away from its default (the learnable power and calibrated sigma make them per-head tensors)
CHANGED = {"power_scale": 2.0, "power_offset": 0.3, "key_power": 2.0, "inhibit": "cosine", "angle_sharpness": 4.0,
           "eps": 1e-3, "norm_scale": 2.5, "norm_scale_mode": "learnable", "learnable_power": True}


def test_every_option_changed_reaches_the_analysis_weights_as_the_processor_applies_them():
    torch.manual_seed(0)
    kernel_fields = set(NaLaParams.names())
    assert kernel_fields <= set(CHANGED), "a new kernel option: change it here too"
    processor = ATTENTION_PROCESSORS["nala"](hidden_size=16, num_heads=2, **CHANGED)
    with torch.no_grad():
        processor.log_power_scale.copy_(torch.tensor([0.5, 1.2]))
        processor.log_norm_scale.copy_(torch.tensor([0.2, 1.5]))
    processor.attention_sharpness = 1.3  # the run-time sharpness multiplies lambda
    params = processor.kernel_params()
    defaults = NaLaParams()
    for name in kernel_fields:  # every kernel parameter differs from its default in what the layer hands down
        value, default = getattr(params, name), getattr(defaults, name)
        same = bool((value == default).all()) if torch.is_tensor(value) else value == default
        assert not same, name
    q, k, v = (torch.randn(2, 2, 12, 8) * 3 for _ in range(3))
    with torch.no_grad():
        applied = processor.attend(q, k, v)
    weights = attention_weights("nala", q, k, params.detached())
    torch.testing.assert_close(weights.float() @ v, applied, rtol=1e-4, atol=1e-5)
    # and the weights are not the defaults' (the test could not pass with options dropped)
    assert not torch.allclose(attention_weights("nala", q, k).float() @ v, applied, atol=1e-2)


@pytest.mark.parametrize("kind", ["relu_linear", "elu_linear", "softmax"])
def test_the_other_kernels_hand_their_parameters_whole(kind):
    torch.manual_seed(1)
    processor = ATTENTION_PROCESSORS[kind](num_heads=2, **({"eps": 0.05} if kind != "softmax" else {}))
    processor.attention_sharpness = 1.7
    params = processor.kernel_params()
    assert isinstance(params, SoftmaxParams if kind == "softmax" else LinearParams)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    with torch.no_grad():
        applied = processor.attend(q, k, v)
    torch.testing.assert_close(attention_weights(kind, q, k, params).float() @ v, applied, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(attention_weights(kind, q, k).float() @ v, applied, atol=1e-3)


def test_params_refuse_unknown_and_bad_values():
    with pytest.raises(TypeError, match="no parameter"):
        NaLaParams.of(None, power=3)
    with pytest.raises(ValueError, match="inhibit"):
        NaLaParams.of(None, inhibit="sigmoid")
    with pytest.raises(ValueError, match="eps"):
        NaLaParams.of(None, eps=0.0)  # NaLa normalises the queries by it
    assert LinearParams.of(None, eps=0.0).eps == 0.0  # the baselines may run without
    replaced = NaLaParams.of(NaLaParams(power_scale=2.0), inhibit="cosine")
    assert (replaced.power_scale, replaced.inhibit) == (2.0, "cosine")


def test_sigma_has_one_default_and_a_model_never_calibrated_says_so(tmp_path):
    assert DEFAULTS.norm_scale_mode == "calibrated"
    preset = NaLaDiTTransformer2DModel.from_preset("S/8", num_layers=1)
    assert preset.config.norm_scale_mode == DEFAULTS.norm_scale_mode
    assert all(name in option_names("nala") for name in ("norm_scale", "norm_scale_mode"))
    model = tiny_nala(in_channels=3)
    processor = model.transformer_blocks[0].attn1.processor
    assert processor.norm_scale_mode == "calibrated" and processor.norm_scale_uncalibrated
    pipe = NaLaDiTPipeline(model, DDIMScheduler())
    with pytest.warns(UserWarning, match="never calibrated"):
        pipe([0], num_inference_steps=1, output_type="np")
    noisy = torch.randn(2, 3, TINY["sample_size"], TINY["sample_size"])
    calibrate_norm_scale(model, noisy, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([0, 1]))
    assert not processor.norm_scale_uncalibrated
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pipe([0], num_inference_steps=1, output_type="np")
    # a config written before the option existed was built with sigma = 1 everywhere, and loads so
    fixed = tiny_nala(in_channels=3, norm_scale_mode="fixed")
    fixed.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"norm_scale_mode": "fixed",', ""))
    assert "norm_scale_mode" not in (tmp_path / "config.json").read_text()
    assert NaLaDiTTransformer2DModel.from_pretrained(tmp_path).config.norm_scale_mode == "fixed"


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        NaLaParams().power_scale = 2.0


def test_no_function_over_80_lines_and_no_file_over_550_outside_tests():
    """Readable rooms: every function (docstring included) fits on a screen, every module in one read."""
    import ast

    repo = PACKAGE.parent
    files = [p for folder in ("nala_diffusion", "pipelines", "train", "eval") for p in (repo / folder).rglob("*.py")]
    assert len(files) > 50
    longest_file = max(files, key=lambda p: len(p.read_text().splitlines()))
    assert len(longest_file.read_text().splitlines()) <= 550, longest_file
    functions = [(node.end_lineno - node.lineno + 1, f"{path.relative_to(repo)}:{node.name}")
                 for path in files for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lines, name = max(functions)
    assert lines <= 80, (name, lines)
    assert len((repo / "pipelines" / "pipeline_nala_dit.py").read_text().splitlines()) <= 450
