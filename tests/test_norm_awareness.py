"""The query-norm scale sigma of NaLa's power, its calibration, and the saturation diagnostics."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import dit_inputs, tiny_dit, tiny_nala
from reference import nala_reference

from nala_diffusion import (
    NaLaDiTPipeline,
    calibrate_norm_scale,
    convert_dit_to_nala,
    demo_pipeline_path,
    nala_attention,
    nala_attention_explicit,
    saturation_report,
    set_nala_attention,
)
from nala_diffusion.eval import attention_entropy as E
from nala_diffusion.models.norm_awareness import nala_processors
from nala_diffusion.ops import NaLaParams

INHIBITS = ["relu_split", "cosine"]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("inhibit", INHIBITS)
def test_sigma_one_is_the_official_kernel_bit_for_bit(inhibit):
    q, k, v = (torch.randn(2, 3, 33, 16) * 3 for _ in range(3))
    with torch.no_grad():
        assert torch.equal(nala_attention(q, k, v, inhibit=inhibit, norm_scale=1.0), nala_attention(q, k, v, inhibit=inhibit))
    graph = nala_attention(q.requires_grad_(), k, v, inhibit=inhibit, norm_scale=1.0)
    assert torch.equal(graph, nala_attention(q, k, v, inhibit=inhibit))


@pytest.mark.parametrize("inhibit", INHIBITS)
@pytest.mark.parametrize("sigma", [4.0, 12.0, [2.0, 9.0]])
def test_other_sigmas_match_float64_reference_on_every_path(inhibit, sigma):
    q = torch.randn(2, 2, 21, 8) * 4  # norms ~ 11: saturated at sigma = 1, not at 9
    k, v = torch.randn(2, 2, 25, 8), torch.randn(2, 2, 25, 8)
    q[1, 0, 4] = 0.0
    kernel_sigma = torch.tensor(sigma) if isinstance(sigma, list) else sigma
    expected = nala_reference(q, k, v, inhibit=inhibit, norm_scale=sigma)
    with torch.no_grad():
        assert rel_err(nala_attention(q, k, v, inhibit=inhibit, norm_scale=kernel_sigma), expected) < 1e-5
        assert rel_err(nala_attention(q.double(), k.double(), v.double(), inhibit=inhibit, norm_scale=kernel_sigma),
                       expected) < 1e-10
    graph = nala_attention(q.clone().requires_grad_(), k, v, inhibit=inhibit, norm_scale=kernel_sigma)
    assert rel_err(graph.detach(), expected) < 1e-5
    assert rel_err(nala_attention_explicit(q, k, v, inhibit=inhibit, norm_scale=kernel_sigma), expected) < 1e-5
    # sigma changes the result where the norms sit (else the comparison above would prove nothing)
    assert rel_err(nala_reference(q, k, v, inhibit=inhibit), expected) > 1e-3


def test_compiled_kernel_takes_per_head_sigma():
    q = torch.randn(1, 2, 19, 8) * 4
    k, v = torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    with torch.no_grad():
        fused = nala_attention(q, k, v, norm_scale=torch.tensor([2.0, 9.0]), compile=True)
    assert rel_err(fused, nala_reference(q, k, v, norm_scale=[2.0, 9.0])) < 1e-5


def test_learnable_sigma_gets_finite_gradients_including_at_zero_query():
    q = torch.randn(1, 2, 9, 8, dtype=torch.float64) * 3
    q[0, 0, :3] = 0.0  # zero queries
    k, v = torch.randn(1, 2, 9, 8, dtype=torch.float64), torch.randn(1, 2, 9, 8, dtype=torch.float64)
    sigma = torch.tensor([2.0, 5.0], dtype=torch.float64, requires_grad=True)
    for inhibit in INHIBITS:
        out = nala_attention(q, k, v, norm_scale=sigma, inhibit=inhibit)
        (grad,) = torch.autograd.grad(out.square().sum(), sigma)
        assert torch.isfinite(grad).all() and (grad != 0).all()
    assert torch.autograd.gradcheck(lambda s: nala_attention(q[:, :, 3:], k, v, norm_scale=s), (sigma,))


def test_invalid_sigma_is_refused():
    q = torch.randn(1, 2, 4, 8)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="norm_scale"):
            nala_attention(q, q, q, norm_scale=bad)
    with pytest.raises(ValueError, match="norm_scale_mode"):
        tiny_nala(norm_scale_mode="sometimes")


@pytest.mark.parametrize("mode", ["fixed", "learnable", "calibrated"])
def test_saved_sigma_reloads_with_the_same_outputs(tmp_path, mode):
    model = tiny_nala(norm_scale=2.5, norm_scale_mode=mode)
    x, t, y = dit_inputs(channels=3)
    if mode != "fixed":
        sigmas = calibrate_norm_scale(model, x, timestep=t, class_labels=y, quantile=0.3)
        assert all(len(v) == 2 and min(v) > 0 for v in sigmas.values())
        assert not torch.allclose(model.transformer_blocks[0].attn1.processor.resolved_norm_scale(), torch.tensor(2.5))
    NaLaDiTPipeline(model, DDIMScheduler()).save_pretrained(tmp_path)
    loaded = NaLaDiTPipeline.from_pretrained(tmp_path).transformer
    assert loaded.config.norm_scale_mode == mode and loaded.config.norm_scale == 2.5
    with torch.no_grad():
        assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample)
    if mode == "learnable":
        assert any(n.endswith("log_norm_scale") for n, _ in loaded.named_parameters())


def test_conversion_calibrates_sigma_from_the_teachers_queries():
    dit = tiny_dit()
    x, t, y = dit_inputs()
    # the teacher's own query norms, captured independently of the library
    norms = {}
    for i, block in enumerate(dit.transformer_blocks):
        block.attn1.to_q.register_forward_hook(
            lambda m, a, out, i=i: norms.__setitem__(i, out.view(*out.shape[:2], 2, -1).norm(dim=-1)))
    with torch.no_grad():
        dit(x, timestep=t, class_labels=y)
    model = convert_dit_to_nala(dit, calibration_inputs={"hidden_states": x, "timestep": t, "class_labels": y})
    assert model.config.norm_scale_mode == "calibrated"
    for i, block in enumerate(model.transformer_blocks):
        expected = np.percentile(norms[i].reshape(-1, 2).numpy(), 50, axis=0)
        np.testing.assert_allclose(block.attn1.processor.resolved_norm_scale().numpy(), expected, rtol=1e-5)
    official = convert_dit_to_nala(dit, norm_scale_mode="fixed")
    assert official.transformer_blocks[0].attn1.processor.resolved_norm_scale() == 1.0


def test_diagnostics_on_the_shipped_demo_and_with_the_official_sigma():
    pipe = NaLaDiTPipeline.from_pretrained(demo_pipeline_path())
    from nala_diffusion.data.datasets import load_dataset

    test = load_dataset("builtin:photos", 32, split="test")
    x0, labels = test.images[::100], test.labels[::100]
    t = torch.full((len(x0),), 500)
    noisy = pipe.scheduler.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), t)
    model = pipe.transformer

    def report():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = saturation_report(model, noisy, timestep=t, class_labels=labels)
        return result, any("saturated" in str(w.message) for w in caught)

    shipped, warned = report()
    assert len(shipped) == model.config.num_layers
    for layer in shipped.values():
        assert set(layer["norm"]) == set(layer["power"]) == {"p5", "p50", "p95"}
        assert len(layer["heads"]) == model.config.num_attention_heads
        assert layer["norm"]["p5"] <= layer["norm"]["p50"] <= layer["norm"]["p95"]
    if model.config.norm_scale_mode == "fixed":  # a demo trained with the official sigma = 1
        assert warned and all(layer["saturated"] for layer in shipped.values())
    else:
        assert not warned and all(layer["responding_fraction"] > 0.9 for layer in shipped.values())
    # the same trained layers with sigma = 1: the power is the constant 4.5 and the report says so
    for processor in nala_processors(model).values():
        processor.norm_scale_mode, processor.norm_scale = "fixed", 1.0
    official, warned = report()
    assert warned and all(layer["saturated"] and layer["power"]["p5"] > 4.49 for layer in official.values())


def test_diagnostics_on_a_diffusers_dit_after_set_nala_attention():
    dit = tiny_dit()
    x, t, y = dit_inputs()
    set_nala_attention(dit)
    with pytest.warns(UserWarning, match="saturated"):
        official = saturation_report(dit, x, timestep=t, class_labels=y)
    set_nala_attention(dit, norm_scale_mode="calibrated")
    calibrate_norm_scale(dit, x, timestep=t, class_labels=y)
    calibrated = saturation_report(dit, x, timestep=t, class_labels=y)
    for name in official:
        assert official[name]["responding_fraction"] < 0.5 < calibrated[name]["responding_fraction"]
        assert calibrated[name]["power"]["p95"] - calibrated[name]["power"]["p5"] > 10 * (
            official[name]["power"]["p95"] - official[name]["power"]["p5"])


def test_entropy_uses_each_layers_own_options():
    q, k = torch.randn(1, 2, 30, 8) * 3, torch.randn(1, 2, 30, 8)
    first = NaLaParams(power_scale=3.0, norm_scale=torch.tensor([1.0, 1.0]), inhibit="relu_split")
    second = NaLaParams(power_scale=torch.tensor([1.0, 6.0]), norm_scale=torch.tensor([4.0, 8.0]), inhibit="cosine",
                        angle_sharpness=5.0)
    a, b = E.attention_weights("nala", q, k, first), E.attention_weights("nala", q, k, second)
    assert torch.allclose(a.sum(-1), torch.ones(1, 2, 30, dtype=torch.float64), atol=1e-4)
    assert (a - b).abs().max() > 1e-2
    # the layer of a model: its options reach the weights
    model = tiny_nala(norm_scale=4.0)
    options = model.transformer_blocks[0].attn1.processor.kernel_params()
    assert bool((torch.as_tensor(options.norm_scale) == 4.0).all())  # the start value of every head
    assert not torch.allclose(E.attention_weights("nala", q, k, options), E.attention_weights("nala", q, k))


def test_entropy_kinds_norm_cancelling_and_elu():
    q, k = E.random_inputs(400, 16, 2, seed=0)
    stats = E.summarise(q, k)
    assert set(stats) == {"softmax", "relu_linear", "elu_linear", "nala", "norm_cancelling"}
    assert abs(stats["norm_cancelling"]["spearman"]) <= 0.1  # the norm factor cancels
    assert stats["norm_cancelling"]["norm_effect"] == pytest.approx(0, abs=1e-9)
    assert stats["relu_linear"]["norm_effect"] == pytest.approx(0, abs=1e-4)  # 0 but for the readout's eps
    assert stats["nala"]["norm_effect"] < -0.01 and stats["softmax"]["norm_effect"] < -0.01
    elu = E.attention_weights("elu_linear", q, k)
    expected = torch.where(q > 0, q + 1, q.exp()).double() @ torch.where(k > 0, k + 1, k.exp()).double().mT
    torch.testing.assert_close(elu, expected / (expected.sum(-1, keepdim=True) + k.shape[-2] * 1e-6))  # the readout's eps


def test_norm_effect_is_zero_for_a_saturated_layer_and_negative_once_calibrated():
    q, k = torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)  # norms ~ 8, as in a DiT
    saturated = E.norm_effect("nala", q, k, NaLaParams(norm_scale=1.0))
    calibrated = E.norm_effect("nala", q, k, NaLaParams(norm_scale=8.0))
    assert abs(saturated) < 1e-3 < -calibrated


@pytest.mark.parametrize("kind", ["nala", "softmax", "relu_linear"])
def test_applied_weights_are_the_kernels_own_with_and_without_rope(kind):
    from nala_diffusion.models.norm_awareness import applied_attention_weights
    from nala_diffusion.models.processors import ATTENTION_PROCESSORS as PROCESSORS
    from nala_diffusion.ops import apply_rope
    from nala_diffusion.ops.attention_weights import attention_weights
    from nala_diffusion.ops.rope import rope_2d_tables

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8) * 2 for _ in range(3))
    plain = PROCESSORS[kind](num_heads=2)
    weights = applied_attention_weights(plain, q, k)
    options = plain.kernel_params()
    assert torch.allclose(weights, attention_weights(kind, q, k, options), atol=1e-5)

    rotated = PROCESSORS[kind](num_heads=2, use_rope=True)
    with pytest.raises(ValueError, match="token grid"):
        applied_attention_weights(rotated, q, k)
    weights = applied_attention_weights(rotated, q, k, (4, 4))
    rope = rope_2d_tables((4, 4), 8)
    # the weights the kernel applies: the layer's output is these weights times the values
    assert torch.allclose(weights.float() @ v, rotated.attend(q, k, v, rope=rope), atol=1e-4)
    assert not torch.allclose(weights, attention_weights(kind, q, k, options), atol=1e-2)  # RoPE changes them
    if kind == "softmax":
        assert torch.allclose(weights, attention_weights(kind, apply_rope(q, rope), apply_rope(k, rope)), atol=1e-5)


@pytest.mark.parametrize("kind", ["nala", "softmax", "relu_linear"])
def test_distribution_inputs_give_the_distribution_each_kernel_attends_with(kind):
    from nala_diffusion.models.norm_awareness import applied_attention_weights, distribution_inputs
    from nala_diffusion.models.processors import ATTENTION_PROCESSORS as PROCESSORS
    from nala_diffusion.ops.attention_weights import attention_weights

    torch.manual_seed(1)
    q, k = (torch.randn(2, 2, 16, 8) * 2 for _ in range(2))
    plain = PROCESSORS[kind](num_heads=2)
    assert distribution_inputs(plain, q, k) == (q, k)  # without RoPE the captured pair is the kernel's own
    rotated = PROCESSORS[kind](num_heads=2, use_rope=True)
    options = rotated.kernel_params()
    rq, rk = distribution_inputs(rotated, q, k, (4, 4))
    if kind == "softmax":
        with pytest.raises(ValueError, match="token grid"):
            distribution_inputs(rotated, q, k)
        # rotated in the logits: the distribution is exactly the weights the layer applies
        assert torch.allclose(attention_weights(kind, rq, rk), applied_attention_weights(rotated, q, k, (4, 4)),
                              atol=1e-5)
        assert not torch.allclose(rq, q)
        torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps the norms
    else:  # RoPE turns the numerator only; the normaliser's distribution is the unrotated pair's
        assert rq is q and rk is k
        sums = attention_weights(kind, rq, rk, options).sum(-1)  # a distribution per row (ReLU: or all zero)
        assert (((sums - 1).abs() < 1e-4) | (sums == 0)).all() and (sums > 0).any()  # under 1 by the readout's eps
