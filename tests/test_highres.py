"""High-resolution sampling: positions, resolution-aware sharpness, progressive edge cases."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_nala

from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTPipeline, demo_pipeline_path
from nala_diffusion.models.norm_awareness import capture_queries, nala_processors
from nala_diffusion.models.sharpness import (
    attention_sharpness_of,
    resolution_sharpness,
    set_attention_sharpness,
    softmax_sharpness_rule,
)
from nala_diffusion.ops.attention_weights import mean_entropy
from nala_diffusion.pipelines.sample import main as sample_main


def tiny_pipeline(cls=NaLaDiTHighResPipeline, **config):
    return cls(tiny_nala(sample_size=16, num_classes=3, **config), DDIMScheduler())


@pytest.fixture(scope="module")
def demo():
    pipe = NaLaDiTHighResPipeline.from_pretrained(demo_pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def patch_roughness(images: np.ndarray, patch: int = 4) -> np.ndarray:
    """Per 4-px patch, the mean |difference| between neighbouring pixels inside it (a texture
    statistic: high for checker patterns), averaged over images and channels: (rows, cols)."""
    b, h, w, c = images.shape
    dx = np.abs(np.diff(images, axis=2))[:, : h - 1]  # (B, h - 1, w - 1, C)
    dy = np.abs(np.diff(images, axis=1))[:, :, : w - 1]
    rough = ((dx + dy) / 2)[:, : h - patch, : w - patch]  # whole patches only
    rows, cols = rough.shape[1] // patch, rough.shape[2] // patch
    return rough.reshape(b, rows, patch, cols, patch, c).mean(axis=(0, 2, 4, 5))


@pytest.mark.slow
def test_demo_at_twice_the_side_has_no_region_with_other_texture(demo):
    # the training grid covers the top-left 32x32 pixels; extended positions put checker patterns
    # everywhere else (ratio 1.5 on the first demo), interpolated ones must not
    labels = list(range(10))

    def ratio(**kwargs):
        images = demo(labels, height=64, width=64, generator=[torch.Generator().manual_seed(i) for i in labels],
                      output_type="np", **kwargs).images
        rough = patch_roughness(images)  # (15, 15)
        inside, outside = rough[:8, :8].mean(), np.concatenate([rough[8:, :].ravel(), rough[:8, 8:].ravel()]).mean()
        return outside / inside

    assert 0.8 < ratio() < 1.25  # the default: interpolated positions
    assert ratio(position_embedding="extend") > 1.25  # the statistic sees the artefact where it exists


def test_sharpness_rule_and_setting():
    assert softmax_sharpness_rule(64, 64) == 1.0
    assert softmax_sharpness_rule(64, 1024) == pytest.approx((np.log(1024) / np.log(64)) ** 0.5)
    model = tiny_nala()
    assert set_attention_sharpness(model, 2.0) == 2 and set(attention_sharpness_of(model).values()) == {2.0}
    processor = model.transformer_blocks[0].attn1.processor
    assert processor.kernel_params().power_scale == 6.0  # NaLa: lambda times the sharpness
    with pytest.raises(ValueError, match="positive"):
        set_attention_sharpness(model, 0.0)
    with pytest.raises(ValueError, match="no kernel attention layers"):
        set_attention_sharpness(model, {"nowhere": 2.0})


def test_softmax_sharpness_scales_the_logits():
    model = tiny_nala(attention_type="softmax")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        before = model(x, timestep=t, class_labels=y).sample
        set_attention_sharpness(model, 1.5)
        sharper = model(x, timestep=t, class_labels=y).sample
        # the same as scaling the queries by 1.5
        set_attention_sharpness(model, 1.0)
        for block in model.transformer_blocks:
            block.attn1.to_q.weight.mul_(1.5)
            block.attn1.to_q.bias.mul_(1.5)
        scaled = model(x, timestep=t, class_labels=y).sample
    assert not torch.allclose(before, sharper, atol=1e-4)
    torch.testing.assert_close(sharper, scaled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [NaLaDiTPipeline, NaLaDiTHighResPipeline])
def test_auto_sharpness_on_both_pipelines_is_reported_and_reset(cls):
    pipe = tiny_pipeline(cls)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    off = pipe([0], generator=torch.manual_seed(0), **kwargs)
    on = pipe([0], generator=torch.manual_seed(0), attention_sharpness="auto", **kwargs)
    report = on.attention_report if cls is NaLaDiTPipeline else on.stages[-1]["attention_report"]
    assert report["training_grid"] == [8, 8] and report["grid"] == [32, 32]
    assert all(layer["attention_type"] == "nala" and layer["sharpness"] > 0 for layer in report["layers"].values())
    assert not np.allclose(off.images, on.images)
    assert set(attention_sharpness_of(pipe.transformer).values()) == {1.0}  # reset after the call
    with pytest.raises(ValueError, match="attention_sharpness"):
        pipe([0], attention_sharpness="sharp", **kwargs)


def test_auto_sharpness_brings_the_demo_entropy_back_towards_the_training_size(demo):
    # measured on other inputs than the calibration's: the demo's own layers on fresh noise + content
    model = demo.transformer
    labels = torch.tensor([3, 7])
    report = demo.set_resolution_sharpness("auto", 128, 128, labels, num_inference_steps=5)
    factors = {name: layer["sharpness"] for name, layer in report["layers"].items()}
    assert all(f > 1 for f in factors.values())

    generator = torch.Generator().manual_seed(123)
    small = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    large = torch.nn.functional.interpolate(small, size=(128, 128), mode="bicubic", align_corners=False)
    t = torch.tensor([600, 600])

    def entropies(x, sharpness):
        set_attention_sharpness(model, sharpness)
        noisy = demo.scheduler.add_noise(x, torch.randn(x.shape, generator=generator), t)
        with capture_queries(model, keys=True) as captured, torch.no_grad():
            model(noisy, timestep=t, class_labels=labels)
        return {name: mean_entropy("nala", captured[name]["query"], captured[name]["key"], p.kernel_params().detached())
                for name, p in nala_processors(model).items()}

    train = entropies(small, 1.0)
    off, on = entropies(large, 1.0), entropies(large, factors)
    set_attention_sharpness(model, 1.0)
    for name in train:
        assert abs(on[name] - train[name]) < abs(off[name] - train[name])


def test_resolution_sharpness_is_one_at_the_training_size():
    model = tiny_nala(sample_size=16)
    report = resolution_sharpness(model, 64, 64, {}, {})
    assert all(layer["sharpness"] == 1.0 for layer in report.values())


@pytest.mark.parametrize("refine_steps, strength", [(1, 0.6), (4, 0.01), (1, 1.0)])
def test_progressive_mode_with_a_tiny_refinement_still_refines(refine_steps, strength):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe([0, 1], height=32, width=32, highres_mode="progressive", num_inference_steps=2,
               refine_steps=refine_steps, strength=strength, output_type="np", generator=torch.manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    assert [s["steps"] for s in out.stages] == [2, 1]


def test_nala_sample_progressive_with_one_step_and_sharpness(tmp_path, capsys):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "big.png"
    assert sample_main(["--model", str(tmp_path / "pipe"), "--labels", "0", "--height", "32", "--width", "32",
                        "--highres-mode", "progressive", "--steps", "1", "--attention-sharpness", "auto",
                        "--out", str(out)]) == 0
    assert out.exists()
    printed = capsys.readouterr().out
    assert "attention sharpness per layer (grid [16, 16], training grid [8, 8])" in printed
    with pytest.raises(SystemExit):
        sample_main(["--model", str(tmp_path / "pipe"), "--attention-sharpness", "-1", "--out", str(out)])
