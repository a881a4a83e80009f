"""A sampling request is one value, built once from either tool's flags or from Python and checked once."""

import subprocess
import sys

import pytest
from diffusers import DDIMScheduler
from helpers import TINY

from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTTransformer2DModel
from nala_diffusion.eval.fid import parse_args as fid_args
from nala_diffusion.pipelines.request import SAMPLING_DEFAULTS, SamplingRequest
from nala_diffusion.pipelines.sample import parse_args as sample_args

SHARED = ["--labels", "3", "1", "--height", "64", "--width", "32", "--steps", "7", "--guidance", "2.5", "--seed", "5",
          "--scheduler", "ddpm", "--highres_mode", "progressive", "--position_embedding", "extend",
          "--attention_sharpness", "auto", "--guidance_interval", "100", "700", "--guidance_interval_unit", "timestep",
          "--guidance_channels", "3", "--learned_variance", "--no_memory_check"]


def test_nala_sample_and_nala_fid_calc_flags_give_one_request():
    from_sample = SamplingRequest.from_flags(sample_args(SHARED))
    from_fid = SamplingRequest.from_flags(fid_args(["calc", "--model", "m", "--num_samples", "8", "--out", "o",
                                                    "--ref", "r", *SHARED]))
    assert from_sample == from_fid
    assert from_sample == SamplingRequest(labels=(3, 1), height=64, width=32, steps=7, guidance=2.5, seed=5,
                                          scheduler="ddpm", highres_mode="progressive", position_embedding="extend",
                                          attention_sharpness="auto", guidance_interval=(100.0, 700.0),
                                          guidance_channels=3, use_learned_variance=True, check_memory=False)
    # the defaults agree too
    plain_fid = fid_args(["sample", "--model", "m", "--num_samples", "8", "--out", "o"])
    assert SamplingRequest.from_flags(sample_args([])) == SamplingRequest.from_flags(plain_fid) == SamplingRequest()


def test_the_sampling_defaults_are_declared_once():
    repo = __file__.rsplit("/tests/", 1)[0]
    found = subprocess.run(["git", "grep", "--untracked", "-n", "SAMPLING_DEFAULTS =", "--", "*.py"], cwd=repo, capture_output=True,
                           text=True).stdout.strip().splitlines()
    assert [line.split(":")[0] for line in found if not line.startswith("tests/")] == ["pipelines/request.py"]
    assert SAMPLING_DEFAULTS == {"num_inference_steps": 50, "guidance_scale": 4.0}


@pytest.mark.parametrize("changes, message", [
    ({"highres_mode": "tiled"}, "highres_mode must be one of"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
    ({"scheduler": "lms"}, "unknown scheduler 'lms'"),
    ({"scheduler": "ddim", "use_learned_variance": True}, "samples with DDPM"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"protocol": "adm"}, "protocol must be one of"),
])
def test_a_request_checks_its_own_values_when_made(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplingRequest(**changes)


def test_resolved_fills_in_the_pipelines_choices_and_checks_them_once():
    transformer = NaLaDiTTransformer2DModel(**{**TINY, "in_channels": 3, "num_classes": 10})
    pipe = NaLaDiTHighResPipeline(transformer, DDIMScheduler(), sampling_defaults={"num_inference_steps": 9})
    resolved = SamplingRequest(labels=[0]).resolved(pipe)
    assert (resolved.height, resolved.width, resolved.steps, resolved.guidance) == (
        pipe.default_sample_size, pipe.default_sample_size, 9, 4.0)
    assert resolved.resolved(pipe) == resolved
    with pytest.raises(ValueError, match="must be a positive multiple"):
        SamplingRequest(height=pipe.default_sample_size + 1).resolved(pipe)
    with pytest.raises(ValueError, match="out of range"):
        SamplingRequest(labels=[99]).resolved(pipe)
    with pytest.raises(ValueError, match="guidance_channels"):
        SamplingRequest(guidance_channels=7).resolved(pipe)


def test_the_dit_protocol_fixes_its_choices_and_refuses_others():
    request = SamplingRequest().with_dit_protocol(learned_variance=True)
    assert (request.steps, request.scheduler, request.guidance, request.guidance_channels, request.protocol,
            request.use_learned_variance) == (250, "ddpm", 1.5, 3, "dit", True)
    assert SamplingRequest(steps=250).with_dit_protocol(False).use_learned_variance is False
    with pytest.raises(ValueError, match="--protocol dit fixes --steps 250"):
        SamplingRequest(steps=50).with_dit_protocol(True)
    with pytest.raises(ValueError, match="no variance channels"):
        SamplingRequest(use_learned_variance=True).with_dit_protocol(False)


def test_the_tools_flags_module_imports_no_diffusers():
    code = ("import sys, nala_diffusion.pipelines.sampler_flags; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
