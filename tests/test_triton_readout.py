"""The Triton readout: which path runs where (default set, no Triton needed), and its forward and gradients
against the float64 reference and the torch readout in Triton's interpreter (slow set, in a subprocess so
that TRITON_INTERPRET=1 is set before Triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nala_diffusion import NaLaDiTTransformer2DModel, nala_attention, set_attention_backend
from nala_diffusion.ops import linear_attention
from nala_diffusion.ops.readout import split_readout, uses_triton
from nala_diffusion.ops.triton_support import unsupported_reason

HERE = Path(__file__).resolve().parent


def without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_on_a_cpu_auto_runs_torch_and_triton_says_why_it_cannot(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    parts = (q.relu(),), (k.relu(),)
    assert not uses_triton("auto", *parts, v, 1e-6, None)
    assert torch.equal(split_readout(*parts, v, 1e-6, backend="auto"), split_readout(*parts, v, 1e-6, backend="torch"))
    assert torch.equal(nala_attention(q, k, v, backend="auto"), nala_attention(q, k, v, backend="torch"))
    for call in (lambda: nala_attention(q, k, v, backend="triton"), lambda: linear_attention(q, k, v, backend="triton")):
        with pytest.raises(RuntimeError, match="runs on CUDA tensors and these are on cpu.*TRITON_INTERPRET=1"):
            call()
    with pytest.raises(ValueError, match="backend must be one of"):
        nala_attention(q, k, v, backend="cuda")


def test_inputs_the_kernels_do_not_take_are_named_and_go_to_torch():
    def reason(width=64, dim=64, dtype=torch.float32, rope=None, tokens=8, keys=8, parts=2):
        q = [torch.rand(1, 2, tokens, width, dtype=dtype)] * parts
        k = [torch.rand(1, 2, keys, width, dtype=dtype)] * parts
        return unsupported_reason(q, k, torch.rand(1, 2, keys, dim, dtype=dtype), 1e-6, rope)

    assert reason() is None and reason(width=128, dim=128) is None and reason(parts=1) is None
    assert "wider than 128" in reason(width=160)
    assert "wider than 128" in reason(dim=256)
    assert "float64" in reason(dtype=torch.float64)
    assert "callable" in reason(rope=lambda x: x)
    tables = (torch.ones(8, 64), torch.zeros(8, 64))
    assert reason(rope=tables) is None
    assert "different query and key token counts" in reason(rope=tables, keys=9)
    assert "one (tokens, width) table" in reason(rope=(torch.ones(2, 8, 64), torch.zeros(2, 8, 64)))


def test_the_backend_is_a_run_time_switch_of_the_linear_processors():
    model = NaLaDiTTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                      sample_size=8, patch_size=2, num_classes=2, norm_num_groups=1,
                                      attention_types=["nala", "softmax"])
    assert set_attention_backend(model, "torch") == 1  # the softmax layer has no readout
    with pytest.raises(ValueError, match="backend must be one of"):
        set_attention_backend(model, "fast")
    assert "backend" not in model.config


@pytest.mark.slow
def test_triton_forward_and_gradients_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(HERE / "triton_checks.py")], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == 11, result.stdout  # every readout case, ReLU linear, the whole DiT, compiled
