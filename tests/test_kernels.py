import math
import subprocess
import sys

import pytest
import torch

from nala_diffusion import linear_attention, nala_attention, nala_attention_explicit, rope_2d_tables, softmax_attention
from helpers import LargestAllocation
from reference import linear_reference, nala_reference, softmax_reference

INHIBITS = ["relu_split", "cosine"]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("inhibit", INHIBITS)
@pytest.mark.parametrize("n,d", [(1, 8), (7, 13), (64, 32), (300, 72)])
def test_nala_matches_float64_reference(inhibit, n, d):
    q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
    expected = nala_reference(q, k, v, inhibit=inhibit)
    assert rel_err(nala_attention(q, k, v, inhibit=inhibit), expected) < 1e-4
    assert rel_err(nala_attention(q.double(), k.double(), v.double(), inhibit=inhibit), expected) < 1e-10


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_nala_options_and_cross_lengths_match_reference(inhibit):
    q = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 9, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64)
    opts = dict(power_offset=0.2, key_power=5, angle_sharpness=7.0, inhibit=inhibit)
    got = nala_attention(q, k, v, power_scale=torch.tensor([2.0, 4.0], dtype=torch.float64), **opts)
    assert rel_err(got, nala_reference(q, k, v, power_scale=[2.0, 4.0], **opts)) < 1e-10


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_nala_rope_on_numerator_matches_reference(inhibit):
    q, k, v = (torch.randn(1, 1, 12, 8, dtype=torch.float64) for _ in range(3))
    rope = rope_2d_tables((3, 4), 16, dtype=torch.float64)
    got = nala_attention(q, k, v, inhibit=inhibit, rope=rope)
    assert rel_err(got, nala_reference(q, k, v, inhibit=inhibit, rope=rope)) < 1e-10
    assert rel_err(got, nala_attention(q, k, v, inhibit=inhibit)) > 1e-3  # the rotation does something


def test_norm_changes_sharpness():
    # Scaling a query changes its NaLa output (the norm is not cancelled), unlike ReLU linear attention.
    q, k, v = (torch.randn(1, 1, 16, 8, dtype=torch.float64) for _ in range(3))
    small, large = nala_attention(q * 0.1, k, v), nala_attention(q * 10, k, v)
    assert rel_err(small, large) > 1e-2
    assert rel_err(linear_attention(q * 0.1, k, v, eps=0), linear_attention(q * 10, k, v, eps=0)) < 1e-10


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_gradcheck(inhibit):
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lam = torch.tensor([2.5, 3.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, lam: nala_attention(q, k, v, power_scale=lam, inhibit=inhibit), (q, k, v, lam)
    )


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_finite_for_zero_query_and_large_inputs(inhibit):
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    q[:, :, :4] = 0
    q[:, 0, 4:5, :3] = 0  # zero coordinates, where a learnable power's gradient needs care
    lam = torch.tensor([3.0, 3.0], requires_grad=True)
    out = nala_attention(q, k, v, inhibit=inhibit, power_scale=lam)
    assert torch.isfinite(out).all() and out[:, :, :4].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(lam.grad).all()
    big = nala_attention(q * 1e3, k * 1e3, v * 1e3, inhibit=inhibit)
    assert torch.isfinite(big).all()
    assert rel_err(big / 1e3, nala_reference(q * 1e3, k * 1e3, v, inhibit=inhibit)) < 1e-4


@pytest.mark.parametrize("inhibit", INHIBITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(inhibit, dtype):
    q, k, v = (torch.randn(2, 2, 33, 16) for _ in range(3))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = nala_attention(q, k, v, inhibit=inhibit)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, nala_reference(q, k, v, inhibit=inhibit)) < 1e-2
    huge = nala_attention(q * 200, k * 200, v, inhibit=inhibit)  # |k|^3 ~ 1e7 overflows float16
    assert torch.isfinite(huge).all()


def test_float64_stays_float64():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    assert nala_attention(q, q, q).dtype == torch.float64
    assert linear_attention(q, q, q).dtype == torch.float64


@pytest.mark.parametrize("feature_map", ["relu", "elu"])
def test_linear_baselines_match_reference(feature_map):
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    got = linear_attention(q, k, v, feature_map=feature_map)
    assert rel_err(got, linear_reference(q, k, v, feature_map)) < 1e-4


def test_softmax_baseline_matches_reference():
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    assert rel_err(softmax_attention(q, k, v), softmax_reference(q, k, v)) < 1e-5


def test_bad_arguments_raise():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="inhibit"):
        nala_attention(q, q, q, inhibit="sigmoid")
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map="tanh")
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        nala_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="one per head"):
        nala_attention(q, q, q, power_scale=torch.ones(3))
    for name, bad in [("power_scale", 0.0), ("power_scale", float("nan")), ("key_power", -1.0), ("eps", 0.0)]:
        with pytest.raises(ValueError, match=name):
            nala_attention(q, q, q, **{name: bad})
    with pytest.raises(TypeError, match="floating-point"):
        nala_attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="same batch and heads"):
        nala_attention(q, torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8))


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_value_head_dim_may_differ_and_empty_queries_give_empty_output(inhibit):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4)
    expected = nala_reference(q, k, v, inhibit=inhibit)
    with torch.no_grad():
        assert rel_err(nala_attention(q, k, v, inhibit=inhibit), expected) < 1e-5
        assert rel_err(nala_attention(q, k, v, inhibit=inhibit, compile=True), expected) < 1e-4
    assert rel_err(nala_attention(q.requires_grad_(), k, v, inhibit=inhibit).detach(), expected) < 1e-5
    with torch.no_grad():
        assert nala_attention(q[:, :, :0], k, v, inhibit=inhibit).shape == (1, 2, 0, 4)




@pytest.mark.parametrize("inhibit", INHIBITS)
def test_no_tokens_by_tokens_tensor(inhibit):
    n, d = 2048, 16
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    with LargestAllocation() as mode:
        nala_attention(q, k, v, inhibit=inhibit, rope=rope_2d_tables((32, 64), 2 * d)).sum().backward()
    assert mode.largest <= n * 2 * d  # the largest tensor is a (tokens, features) one, far below n * n
    with LargestAllocation() as mode:
        softmax_reference(q.detach()[..., :64, :], k.detach()[..., :64, :], v.detach()[..., :64, :])
    assert mode.largest >= 64 * 64  # the probe does see an N x N matrix when there is one


MEMORY_SCRIPT = """
import resource, torch
from nala_diffusion import nala_attention
torch.manual_seed(0)
nala_attention(*(torch.randn(1, 1, 256, 64) for _ in range(3)))  # warm-up
q, k, v = (torch.randn(1, 1, 65536, 64) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = nala_attention(q, k, v)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(out).all()
print((after - before) * 1024)
"""


def test_65536_tokens_fit_in_one_gib():
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    extra_bytes = int(result.stdout.strip().splitlines()[-1])
    assert extra_bytes < 2**30, f"peak memory grew by {extra_bytes / 2**20:.0f} MiB"


@pytest.mark.parametrize("shape", [(2, 3, 40, 8), (1, 6, 17, 64)])
def test_inference_path_equals_differentiable_path(shape):
    q, k, v = (torch.randn(*shape) for _ in range(3))
    lam = torch.tensor([2.0, 3.0, 4.0, 2.5, 3.5, 3.0][: shape[1]])
    with torch.no_grad():
        fast = nala_attention(q, k, v, power_scale=lam)
    graph = nala_attention(q.requires_grad_(), k, v, power_scale=lam)
    torch.testing.assert_close(fast, graph.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, nala_attention_explicit(q.detach(), k, v, power_scale=lam), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(torch.autograd.grad(graph.sum(), q)[0]).all()


@pytest.mark.parametrize("gather", [True, False])
def test_inference_readouts_match_reference_on_edge_cases(gather):
    # the gather-sum readout (CPU) and the dense one (other devices) on strided inputs, cross lengths,
    # per-head powers, zero and negative-zero coordinates and a zero query
    from nala_diffusion.kernels import _relu_split_inference

    q = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2)  # (2, 3, 5, 8), not contiguous
    k, v = torch.randn(2, 3, 11, 8, dtype=torch.float64), torch.randn(2, 3, 11, 8, dtype=torch.float64)
    q[0, 0, 1, :4] = 0.0
    q[0, 0, 2, :4] = -0.0
    q[1, 2, 0] = 0.0
    lam = torch.tensor([2.0, 3.0, 4.5], dtype=torch.float64)
    got = _relu_split_inference(q, k, v, lam, 0.5, 3, 1e-6, gather=gather)
    assert rel_err(got, nala_reference(q, k, v, power_scale=lam.tolist())) < 1e-10
    assert got[1, 2, 0].abs().max() == 0


@pytest.mark.parametrize("key_power", [3, 2.5])
def test_compilable_feature_functions_equal_the_in_place_ones(key_power):
    # fused.py keeps plain-code twins of the in-place feature functions for torch.compile
    from nala_diffusion import fused, kernels

    q = torch.randn(7, 2, 16).transpose(0, 1)  # (heads, N, d), strided as in the processors
    q[0, 0] = 0.0
    k = torch.randn(2, 9, 16)
    scales = torch.tensor([2.0, 4.0]).view(2, 1, 1)
    sigmas = torch.tensor([1.0, 3.0]).view(2, 1, 1)
    magnitude, index = kernels.relu_split_query_terms(q, scales, 0.5, 1e-6, sigmas)
    plain_magnitude, plain_index = fused.compilable_query_terms(q, scales, 0.5, 1e-6, sigmas)
    torch.testing.assert_close(plain_magnitude, magnitude)
    assert torch.equal(plain_index, index)
    torch.testing.assert_close(fused.compilable_key_features(k, key_power), kernels.relu_split_key_features(k, key_power))


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_compiled_kernel_matches_float64_reference(inhibit):
    q = torch.randn(2, 2, 37, 16)
    k, v = torch.randn(2, 2, 45, 16), torch.randn(2, 2, 45, 16)
    q[0, 0, 3] = 0.0  # a zero query stays finite
    opts = dict(power_offset=0.2, key_power=3, angle_sharpness=7.0, inhibit=inhibit)
    lam = torch.tensor([2.0, 4.0])
    with torch.no_grad():
        fused = nala_attention(q, k, v, power_scale=lam, compile=True, **opts)
    assert torch.isfinite(fused).all()
    assert rel_err(fused, nala_reference(q, k, v, power_scale=[2.0, 4.0], **opts)) < 1e-4
    # with autograd the eager kernel runs, and gradients flow
    graph = nala_attention(q.requires_grad_(), k, v, power_scale=lam, compile=True, **opts)
    torch.testing.assert_close(graph.detach(), fused, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(torch.autograd.grad(graph.sum(), q)[0]).all()
