"""Hybrid layouts: softmax in chosen blocks, NaLa (or another kernel) in the rest."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import TINY, LargestAllocation, dit_inputs, randomize, tiny_dit, tiny_nala

from nala_diffusion import (
    NaLaAttnProcessor,
    NaLaDiTHighResPipeline,
    NaLaDiTPipeline,
    NaLaDiTTransformer2DModel,
    ReLULinearAttnProcessor,
    SoftmaxAttnProcessor,
    convert_dit_to_nala,
    preset_config,
    restore_attention,
    saturation_report,
    set_attention,
    set_nala_attention,
)
from nala_diffusion.models.norm_awareness import calibrate_norm_scale
from nala_diffusion.models.options import layer_attention_types
from nala_diffusion.models.sharpness import resolution_sharpness, softmax_sharpness_rule

KIND_CLASSES = {"nala": NaLaAttnProcessor, "softmax": SoftmaxAttnProcessor, "relu_linear": ReLULinearAttnProcessor}


def kinds_of(model):
    return [type(block.attn1.processor) for block in model.transformer_blocks]


def four_block_hybrid(**config):
    return tiny_nala(**{"num_layers": 4, "attention_types": ["nala", "nala", "relu_linear", "softmax"], **config})


def test_layout_expansion_and_its_errors():
    assert layer_attention_types(4) == ["nala"] * 4
    assert layer_attention_types(4, softmax_layers=[-1, 0]) == ["softmax", "nala", "nala", "softmax"]
    assert layer_attention_types(3, "relu_linear", softmax_layers=[1]) == ["relu_linear", "softmax", "relu_linear"]
    with pytest.raises(ValueError, match="3 entries but the model has 4 blocks"):
        layer_attention_types(4, attention_types=["nala"] * 3)
    with pytest.raises(ValueError, match=r"attention_types\[1\] is 'flash'"):
        layer_attention_types(2, attention_types=["nala", "flash"])
    with pytest.raises(ValueError, match="index 4 is out of range .* 4 blocks"):
        layer_attention_types(4, softmax_layers=[4])
    with pytest.raises(ValueError, match="index -5 is out of range"):
        layer_attention_types(4, softmax_layers=[-5])
    with pytest.raises(ValueError, match="not both"):
        layer_attention_types(2, attention_types=["nala", "nala"], softmax_layers=[0])
    with pytest.raises(ValueError, match="attention_types must be a list"):
        layer_attention_types(2, attention_types="nala")


def test_model_builds_each_block_with_its_kind_and_validates():
    model = four_block_hybrid(use_lepe=True, inhibit="cosine")
    assert kinds_of(model) == [NaLaAttnProcessor, NaLaAttnProcessor, ReLULinearAttnProcessor, SoftmaxAttnProcessor]
    assert model.layer_attention_types == ["nala", "nala", "relu_linear", "softmax"]
    # options reach the kinds that take them: LePE everywhere, the inhibit only where NaLa runs
    assert all(block.attn1.processor.use_lepe for block in model.transformer_blocks)
    assert model.transformer_blocks[0].attn1.processor.inhibit == "cosine"
    assert not hasattr(model.transformer_blocks[3].attn1.processor, "inhibit")
    # a model without attention_types is unchanged: every block runs attention_type
    assert tiny_nala().config.attention_types is None and kinds_of(tiny_nala()) == [NaLaAttnProcessor] * 2
    with pytest.raises(ValueError, match="attention_types has 3 entries but the model has 2 blocks"):
        NaLaDiTTransformer2DModel(**TINY, attention_types=["nala"] * 3)
    with pytest.raises(ValueError, match=r"attention_types\[0\] is 'sdpa'"):
        NaLaDiTTransformer2DModel(**TINY, attention_types=["sdpa", "nala"])


def test_from_preset_softmax_layers_expand_into_attention_types():
    model = NaLaDiTTransformer2DModel.from_preset("S/2", num_layers=4, sample_size=8, in_channels=3, softmax_layers=[-1])
    assert model.config.attention_types == ["nala", "nala", "nala", "softmax"]
    assert kinds_of(model) == [NaLaAttnProcessor] * 3 + [SoftmaxAttnProcessor]
    assert preset_config("S/2", softmax_layers=[0, -1])["attention_types"] == ["softmax"] + ["nala"] * 10 + ["softmax"]
    with pytest.raises(ValueError, match="index 12 is out of range for a model with 12 blocks"):
        preset_config("S/2", softmax_layers=[12])


def test_hybrid_saves_and_loads_with_identical_outputs(tmp_path):
    model = four_block_hybrid(norm_scale_mode="calibrated")
    x, t, y = dit_inputs(channels=3)
    calibrate_norm_scale(model, x, timestep=t, class_labels=y)
    model.save_pretrained(tmp_path / "hybrid")
    saved = json.loads((tmp_path / "hybrid" / "config.json").read_text())
    assert saved["attention_types"] == ["nala", "nala", "relu_linear", "softmax"]
    loaded = NaLaDiTTransformer2DModel.from_pretrained(tmp_path / "hybrid").eval()
    assert kinds_of(loaded) == kinds_of(model)
    torch.testing.assert_close(loaded.transformer_blocks[0].attn1.processor.log_norm_scale,
                               model.transformer_blocks[0].attn1.processor.log_norm_scale, rtol=0, atol=0)
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=y).sample
        got = loaded(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the hybrid differs from both of its pure layouts, so the layout is what was loaded
    for kind in ("nala", "softmax"):
        pure = NaLaDiTTransformer2DModel.from_config({**dict(model.config), "attention_types": None,
                                                      "attention_type": kind})
        pure.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            assert not torch.allclose(pure.eval()(x, timestep=t, class_labels=y).sample, expected, atol=1e-4)


def test_set_nala_attention_on_chosen_blocks_of_a_diffusers_dit_and_restore_exactly():
    dit = tiny_dit()
    dit_4 = type(dit)(**{**dict(dit.config), "num_layers": 4})
    dit = randomize(dit_4).eval()
    x, t, y = dit_inputs()
    with torch.no_grad():
        original = dit(x, timestep=t, class_labels=y).sample
    previous = set_nala_attention(dit, layers=[0, 1])
    assert sorted(previous) == ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]
    assert [type(b.attn1.processor) for b in dit.transformer_blocks] == [NaLaAttnProcessor] * 2 + [AttnProcessor2_0] * 2
    with torch.no_grad():
        assert not torch.allclose(dit(x, timestep=t, class_labels=y).sample, original, atol=1e-4)
    restore_attention(dit, previous)
    with torch.no_grad():
        assert torch.equal(dit(x, timestep=t, class_labels=y).sample, original)

    # negative indices, block names and module names choose the same layers
    for layers in ([-1], ["transformer_blocks.3"], ["transformer_blocks.3.attn1"]):
        previous = set_attention(dit, "relu_linear", layers=layers)
        assert list(previous) == ["transformer_blocks.3.attn1.processor"]
        restore_attention(dit, previous)
    with pytest.raises(ValueError, match="index 4 is out of range for a model with 4 blocks"):
        set_nala_attention(dit, layers=[4])
    with pytest.raises(ValueError, match="no self-attention layer named 'transformer_blocks.9'"):
        set_nala_attention(dit, layers=["transformer_blocks.9"])
    assert all(type(b.attn1.processor) is AttnProcessor2_0 for b in dit.transformer_blocks)  # refusals swap nothing


def test_conversion_keeps_softmax_layers_exactly():
    dit = tiny_dit(num_classes=10)
    dit = randomize(type(dit)(**{**dict(dit.config), "num_layers": 3})).eval()
    x, t, y = dit_inputs()
    with torch.no_grad():
        original = dit(x, timestep=t, class_labels=y).sample
    # softmax everywhere, declared per layer: the DiT itself
    all_softmax = convert_dit_to_nala(dit, attention_type="softmax", softmax_layers=[0, 2])
    assert all_softmax.config.attention_types == ["softmax"] * 3
    with torch.no_grad():
        assert torch.equal(all_softmax(x, timestep=t, class_labels=y).sample, original)

    # NaLa elsewhere: the kept layers compute exactly the DiT's attention on the inputs they get
    hybrid = convert_dit_to_nala(dit, softmax_layers=[-1])
    assert hybrid.config.attention_types == ["nala", "nala", "softmax"]
    assert kinds_of(hybrid) == [NaLaAttnProcessor, NaLaAttnProcessor, SoftmaxAttnProcessor]
    seen = {}
    hook = hybrid.transformer_blocks[2].attn1.register_forward_hook(
        lambda module, args, kwargs, out: seen.update(inputs=args[0].clone(), out=out.clone()), with_kwargs=True)
    with torch.no_grad():
        hybrid(x, timestep=t, class_labels=y)
        hook.remove()
        assert torch.equal(dit.transformer_blocks[2].attn1(seen["inputs"]), seen["out"])
    # sigma calibrated only where NaLa runs, from the DiT's queries
    assert [hasattr(b.attn1.processor, "log_norm_scale") for b in hybrid.transformer_blocks] == [True, True, False]
    assert all(float(b.attn1.processor.log_norm_scale.exp().min()) != 1.0 for b in hybrid.transformer_blocks[:2])


def test_converting_a_hybrid_keeps_its_layout_unless_told_otherwise():
    model = four_block_hybrid()
    again = convert_dit_to_nala(model, use_lepe=True)
    assert again.config.attention_types == model.config.attention_types
    relaid = convert_dit_to_nala(model, softmax_layers=[0])
    assert relaid.config.attention_types == ["softmax", "nala", "nala", "nala"]


def test_tools_measure_each_layer_with_its_own_kernel():
    model = four_block_hybrid(sample_size=16, norm_scale_mode="calibrated")
    x, t, y = dit_inputs(channels=3, height=16, width=16)
    calibrate_norm_scale(model, x, timestep=t, class_labels=y)
    report = saturation_report(model, x, timestep=t, class_labels=y, warn=False)
    assert sorted(report) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]

    # resolution-aware sharpness: softmax by the rule, NaLa calibrated, ReLU linear left at 1
    big = torch.randn(2, 3, 32, 32)
    small = torch.nn.functional.interpolate(big, size=(16, 16), mode="area")
    layers = resolution_sharpness(model, 64, 256, dict(hidden_states=small, timestep=t, class_labels=y),
                                  dict(hidden_states=big, timestep=t, class_labels=y))
    assert [layers[f"transformer_blocks.{i}.attn1"]["attention_type"] for i in range(4)] == ["nala", "nala", "relu_linear",
                                                                                       "softmax"]
    assert layers["transformer_blocks.3.attn1"]["sharpness"] == pytest.approx(softmax_sharpness_rule(64, 256))
    assert layers["transformer_blocks.2.attn1"]["sharpness"] == 1.0
    for name in ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"):
        assert "entropy_train" in layers[name] and layers[name]["sharpness"] != 1.0


@pytest.mark.parametrize("cls", [NaLaDiTPipeline, NaLaDiTHighResPipeline])
def test_pipelines_sample_a_hybrid_at_and_above_the_training_size(cls, tmp_path):
    model = tiny_nala(sample_size=16, num_classes=3, num_layers=3, attention_types=["nala", "nala", "softmax"])
    cls(model, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    pipe = cls.from_pretrained(tmp_path / "pipe")
    assert kinds_of(pipe.transformer) == [NaLaAttnProcessor, NaLaAttnProcessor, SoftmaxAttnProcessor]
    pipe.set_progress_bar_config(disable=True)
    modes = [{}] if cls is NaLaDiTPipeline else [{"highres_mode": "direct"}, {"highres_mode": "progressive"}]
    for size in (16, 32):
        for mode in modes:
            images = pipe([0, 2], height=size, width=size, num_inference_steps=2, output_type="np",
                          generator=torch.manual_seed(0), **mode).images
            assert images.shape == (2, size, size, 3) and np.isfinite(images).all() and images.std() > 0


def test_no_token_by_token_tensor_outside_the_softmax_block():
    # with diffusers' plain AttnProcessor in the softmax block, the N x N scores exist there (the
    # probe sees them: positive control) and nowhere in the NaLa blocks
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_nala(sample_size=64, num_layers=3, attention_types=["nala", "nala", "softmax"])
    model.transformer_blocks[2].attn1.set_processor(AttnProcessor())
    x, t, y = dit_inputs(batch=1, channels=3, height=64, width=64)
    tokens = (64 // 2) ** 2
    largest = {}

    def probe(index):
        def pre(module, args):
            largest[index] = LargestAllocation()
            largest[index].__enter__()

        def post(module, args, out):
            largest[index].__exit__(None, None, None)
        return pre, post

    for index, block in enumerate(model.transformer_blocks):
        pre, post = probe(index)
        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    assert largest[2].largest >= tokens * tokens
    assert max(largest[0].largest, largest[1].largest) < tokens * tokens / 4


def test_command_line_tools_sample_a_hybrid(tmp_path):
    from nala_diffusion.eval.fid import cli as fid_cli
    from nala_diffusion.pipelines.sample import main as sample_main

    model = tiny_nala(sample_size=16, num_classes=3, num_layers=3, attention_types=["nala", "softmax", "nala"])
    NaLaDiTHighResPipeline(model, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    for size, mode in ((16, "direct"), (32, "direct"), (32, "progressive")):
        out = tmp_path / f"grid-{size}-{mode}.png"
        assert sample_main(["--model", str(tmp_path / "pipe"), "--labels", "0", "2", "--height", str(size),
                            "--width", str(size), "--steps", "2", "--highres-mode", mode, "--out", str(out)]) == 0
        grid = np.asarray(__import__("PIL.Image").Image.open(out))
        assert grid.shape[0] >= size and grid.std() > 0
    out = tmp_path / "fid"
    assert fid_cli(["sample", "--model", str(tmp_path / "pipe"), "--num_samples", "2", "--out", str(out),
                    "--steps", "2", "--height", "32", "--width", "32", "--highres_mode", "progressive"]) == 0
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["000000.png", "000001.png"]
