import subprocess
import sys

import pytest
import torch
from helpers import LargestAllocation
from reference import linear_reference, nala_reference, softmax_reference

from nala_diffusion import linear_attention, nala_attention, nala_attention_explicit, rope_2d_tables, softmax_attention

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
    # NaLaFormer's RoPE: each d-wide feature half turned on its own, adjacent pairs, numerator only;
    # every path (autograd, dense and gather inference, explicit) against the float64 reference
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    rope = rope_2d_tables((3, 4), 8, dtype=torch.float64)
    expected = nala_reference(q, k, v, inhibit=inhibit, rope=rope)
    with torch.no_grad():
        for gather in (True, False):
            assert rel_err(nala_attention(q, k, v, inhibit=inhibit, rope=rope, gather=gather), expected) < 1e-10
    graph = nala_attention(q.clone().requires_grad_(), k, v, inhibit=inhibit, rope=rope)
    assert rel_err(graph.detach(), expected) < 1e-10
    assert rel_err(nala_attention_explicit(q, k, v, inhibit=inhibit, rope=rope), expected) < 1e-10
    assert rel_err(expected, nala_attention(q, k, v, inhibit=inhibit)) > 1e-3  # the rotation does something


def test_rope_tables_turn_adjacent_pairs_and_are_cached():
    cos, sin = rope_2d_tables((2, 3), 8)
    assert cos.shape == (6, 8)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])
    # pairs 0, 1 turn with the row, pairs 2, 3 with the column (tokens in row-major order)
    assert torch.equal(cos[0, :4], cos[2, :4]) and not torch.equal(cos[0, :4], cos[3, :4])
    assert torch.equal(cos[3, 4:], cos[0, 4:]) and not torch.equal(cos[0, 4:], cos[1, 4:])
    assert rope_2d_tables((2, 3), 8)[0] is cos  # cached per grid, dim, base, device, dtype
    assert rope_2d_tables((2, 3), 8, dtype=torch.float64)[0].dtype == torch.float64


@pytest.mark.parametrize("grid, dim", [((3, 5), 64), ((4, 4), 8), ((2, 7), 72)])
def test_rope_tables_are_nalaformers_released_rope(grid, dim):
    # NaLaFormer's RoPE (NaLaformer/NALA.py, class RoPE), written from its formula in float64: per pair of
    # adjacent coordinates the angle 1 / 10000 ** linspace(0, 1, d/4); the first d/2 coordinates turn with
    # the row index, the last d/2 with the column index; tokens in row-major order.
    rows, cols = grid
    angle = 1.0 / (10000 ** torch.linspace(0, 1, dim // 4, dtype=torch.float64))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()  # (d/2,): both members of a pair
    h = torch.arange(rows, dtype=torch.float64)[:, None] * angle  # (rows, d/2)
    w = torch.arange(cols, dtype=torch.float64)[:, None] * angle  # (cols, d/2)
    phase = torch.cat([h[:, None, :].expand(rows, cols, -1), w[None, :, :].expand(rows, cols, -1)], -1).flatten(0, 1)
    cos, sin = rope_2d_tables(grid, dim, dtype=torch.float64)
    assert cos.shape == (rows * cols, dim)
    torch.testing.assert_close(cos, phase.cos(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, phase.sin(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_gradients_match_float64_reference_with_and_without_rope(inhibit):
    q, k, v = (torch.randn(1, 2, 12, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lam = torch.tensor([2.5, 3.5], dtype=torch.float64, requires_grad=True)
    for rope in (None, rope_2d_tables((3, 4), 6, dtype=torch.float64)):
        got = torch.autograd.grad(nala_attention(q, k, v, power_scale=lam, inhibit=inhibit, rope=rope).square().sum(),
                                  (q, k, v, lam))
        expected = torch.autograd.grad(
            nala_reference(q, k, v, power_scale=[lam[0], lam[1]], inhibit=inhibit, rope=rope).square().sum(),
            (q, k, v, lam))
        for g, e in zip(got, expected):
            assert rel_err(g, e) < 1e-9


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
@pytest.mark.parametrize("use_rope", [False, True])
def test_no_tokens_by_tokens_tensor_nor_2d_wide_features(inhibit, use_rope):
    from nala_diffusion.ops.gather import readout_table_width

    n, d = 2048, 64
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    rope = rope_2d_tables((32, 64), d) if use_rope else None
    with LargestAllocation() as mode:
        nala_attention(q, k, v, inhibit=inhibit, rope=rope).sum().backward()
    assert mode.largest <= n * d  # the largest tensor is a (tokens, d) one: no 2d-wide features, no n x n
    with torch.no_grad(), LargestAllocation() as mode:
        for gather in (True, False):
            nala_attention(q, k, v, inhibit=inhibit, rope=rope, gather=gather)
    assert mode.largest <= n * readout_table_width(d)  # the gather read (tokens, d + 1 padded): below 2d
    with LargestAllocation() as mode:
        nala_attention_explicit(q.detach(), k.detach(), v.detach(), inhibit=inhibit)
    assert mode.largest >= n * 2 * d  # the probe does see the 2d-wide features when they are built
    with LargestAllocation() as mode:
        softmax_reference(q.detach()[..., :64, :], k.detach()[..., :64, :], v.detach()[..., :64, :])
    assert mode.largest >= 64 * 64  # and an N x N matrix when there is one


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
@pytest.mark.parametrize("inhibit", INHIBITS)
def test_inference_readouts_match_reference_on_edge_cases(gather, inhibit):
    # the gather-sum readout (CPU's default) and the batched dense one (CUDA's default) on strided
    # inputs, cross lengths, per-head powers, zero and negative-zero coordinates and a zero query
    q = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2)  # (2, 3, 5, 8), not contiguous
    k, v = torch.randn(2, 3, 11, 8, dtype=torch.float64), torch.randn(2, 3, 11, 8, dtype=torch.float64)
    q[0, 0, 1, :4] = 0.0
    q[0, 0, 2, :4] = -0.0
    q[1, 2, 0] = 0.0
    lam = torch.tensor([2.0, 3.0, 4.5], dtype=torch.float64)
    with torch.no_grad():
        got = nala_attention(q, k, v, power_scale=lam, inhibit=inhibit, gather=gather)
    assert rel_err(got, nala_reference(q, k, v, power_scale=lam.tolist(), inhibit=inhibit)) < 1e-10
    assert got[1, 2, 0].abs().max() == 0


def test_dense_path_runs_batched_and_chunks_only_when_memory_requires(monkeypatch):
    # the path CUDA takes, forced on CPU: one batched call; by (batch x heads) chunks above the budget
    from nala_diffusion.ops import dense

    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.float64) for _ in range(3))
    expected = nala_reference(q, k, v, power_scale=[2.0, 3.0, 4.0], norm_scale=[1.0, 2.0, 5.0])
    options = dict(power_scale=torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64),
                   norm_scale=torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), gather=False)
    calls = []
    real = dense.dense_nala
    monkeypatch.setattr(dense, "dense_nala", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        assert rel_err(nala_attention(q, k, v, **options), expected) < 1e-10
        assert calls == [q.shape]
        calls.clear()
        monkeypatch.setattr(dense, "DENSE_CHUNK_BYTES", 2 * (40 + 40) * 2 * 8 * 8 * 2)  # two heads per call
        assert rel_err(nala_attention(q, k, v, **options), expected) < 1e-10
    assert len(calls) == 3


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_huge_keys_do_not_overflow(inhibit):
    # |k|^3 overflows float32 above about 7e12; the kernel scales keys per head first
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    k = k * 1e13
    expected = nala_reference(q, k, v, inhibit=inhibit)
    assert torch.isfinite(expected).all()
    with torch.no_grad():
        for gather in (True, False):
            got = nala_attention(q.float(), k.float(), v.float(), inhibit=inhibit, gather=gather)
            assert torch.isfinite(got).all() and rel_err(got, expected) < 1e-4
    got = nala_attention(q.float().requires_grad_(), k.float(), v.float(), inhibit=inhibit)
    assert rel_err(got.detach(), expected) < 1e-4


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


def test_large_training_inputs_keep_no_features_between_forward_and_backward(monkeypatch):
    # above RECOMPUTE_BYTES the backward recomputes the feature halves instead of storing them
    from nala_diffusion.eval.timing import PeakBytes
    from nala_diffusion.ops import dense

    def live_after_forward(threshold):
        monkeypatch.setattr(dense, "RECOMPUTE_BYTES", threshold)
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 4096, 32, requires_grad=True) for _ in range(3))
        with PeakBytes() as probe:
            out = nala_attention(q, k, v)
            held = probe.live
        out.sum().backward()
        return held, q.grad

    lean, lean_grad = live_after_forward(0)
    stored, stored_grad = live_after_forward(2**40)
    assert lean < stored / 2
    torch.testing.assert_close(lean_grad, stored_grad)
