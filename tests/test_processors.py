import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from helpers import dit_inputs, randomize, tiny_dit, tiny_pixart

from nala_diffusion import (
    ELULinearAttnProcessor,
    NaLaAttnProcessor,
    ReLULinearAttnProcessor,
    SoftmaxAttnProcessor,
    linear_attention,
    nala_attention,
    restore_attention,
    set_attention,
    set_nala_attention,
)


def run_dit(model, inputs, **kwargs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y, **kwargs).sample


@pytest.mark.parametrize("inhibit", ["relu_split", "cosine"])
def test_swap_into_dit_and_restore_exactly(inhibit):
    model, inputs = tiny_dit(), dit_inputs()
    before = run_dit(model, inputs)
    previous = set_nala_attention(model, inhibit=inhibit)
    assert len(previous) == 2 and all(k.endswith("attn1.processor") for k in previous)
    assert all(isinstance(p, AttnProcessor2_0) for p in previous.values())
    swapped = run_dit(model, inputs)
    assert torch.isfinite(swapped).all() and not torch.allclose(swapped, before, atol=1e-3)
    restore_attention(model, previous)
    assert torch.equal(run_dit(model, inputs), before)


def test_softmax_processor_equals_attn_processor_2_0():
    model, inputs = tiny_dit(), dit_inputs()
    before = run_dit(model, inputs)
    set_attention(model, "softmax")
    assert torch.equal(run_dit(model, inputs), before)


def test_pixart_self_attention_swapped_cross_attention_kept():
    model = tiny_pixart()
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 5, 12)
    t = torch.tensor([500])

    def run():
        with torch.no_grad():
            return model(x, encoder_hidden_states=text, timestep=t).sample

    before = run()
    previous = set_nala_attention(model)
    assert sorted(previous) == ["transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"]
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, NaLaAttnProcessor)
        assert isinstance(block.attn2.processor, AttnProcessor2_0)
    swapped = run()
    assert torch.isfinite(swapped).all() and not torch.allclose(swapped, before, atol=1e-3)
    restore_attention(model, previous)
    assert torch.equal(run(), before)


def attention_module(dim=16, heads=2):
    return randomize(Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True)).eval()


@pytest.mark.parametrize(
    "processor,kernel",
    [
        (NaLaAttnProcessor(inhibit="cosine"), lambda q, k, v: nala_attention(q, k, v, inhibit="cosine")),
        (ReLULinearAttnProcessor(), lambda q, k, v: linear_attention(q, k, v, feature_map="relu")),
        (ELULinearAttnProcessor(), lambda q, k, v: linear_attention(q, k, v, feature_map="elu")),
    ],
)
def test_processor_is_projections_around_the_kernel(processor, kernel):
    attn = attention_module()
    x = torch.randn(2, 12, 16)
    attn.set_processor(processor)
    with torch.no_grad():
        got = attn(x)
        def split(t):
            return t.view(2, 12, 2, 8).transpose(1, 2)

        o = kernel(split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x)))
        expected = attn.to_out[0](o.transpose(1, 2).reshape(2, 12, 16))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_grid_size_reaches_processor_and_non_square_grids_work():
    attn = attention_module()
    x = torch.randn(1, 24, 16)
    attn.set_processor(NaLaAttnProcessor(hidden_size=16, num_heads=2, use_rope=True, use_lepe=True))
    randomize(attn.processor)
    with torch.no_grad():
        a = attn(x, grid_size=(4, 6))
        b = attn(x, grid_size=(6, 4))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)  # the layout matters for LePE and RoPE
    with pytest.raises(ValueError, match="grid_size"):
        attn(x)  # 24 tokens are not a square
    with pytest.raises(ValueError, match="holds 25 tokens"):
        attn(x, grid_size=(5, 5))


def test_image_shaped_input_uses_its_own_grid():
    attn = attention_module()
    attn.set_processor(NaLaAttnProcessor(hidden_size=16, use_lepe=True))
    randomize(attn.processor)
    x = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        image = attn(x)
        tokens = attn(x.flatten(2).transpose(1, 2), grid_size=(3, 5))
    torch.testing.assert_close(image, tokens.transpose(1, 2).reshape(1, 16, 3, 5))


def test_lepe_starts_as_identity():
    attn, x = attention_module(), torch.randn(1, 16, 16)
    attn.set_processor(NaLaAttnProcessor())
    with torch.no_grad():
        plain = attn(x)
        attn.set_processor(NaLaAttnProcessor(hidden_size=16, use_lepe=True))
        assert torch.equal(attn(x), plain)


def test_parameters_live_in_the_state_dict():
    model = tiny_dit()
    set_nala_attention(model, use_lepe=True, use_gate=True, learnable_power=True)
    keys = set(model.state_dict())
    for name in ["lepe.weight", "lepe.bias", "gate_proj.weight", "gate_norm.weight", "log_power_scale"]:
        assert f"transformer_blocks.0.attn1.processor.{name}" in keys
    assert model.transformer_blocks[1].attn1.processor.log_power_scale.shape == (2,)
    model.train()
    x, t, y = dit_inputs()
    model(x, timestep=t, class_labels=y).sample.square().mean().backward()
    assert model.transformer_blocks[0].attn1.processor.log_power_scale.grad.abs().sum() > 0


def test_self_attention_only_and_masks_refused():
    attn, x = attention_module(), torch.randn(1, 16, 16)
    attn.set_processor(NaLaAttnProcessor())
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=torch.zeros(1, 1, 16))
    attn.set_processor(SoftmaxAttnProcessor())
    assert torch.isfinite(attn(x, attention_mask=torch.zeros(1, 1, 16))).all()


def test_bad_options_raise():
    model = tiny_dit()
    with pytest.raises(ValueError, match="does not take option"):
        set_attention(model, "relu_linear", inhibit="cosine")
    with pytest.raises(ValueError, match="attention_type"):
        set_attention(model, "flash")
    with pytest.raises(ValueError, match="inhibit"):
        NaLaAttnProcessor(inhibit="sign")
    with pytest.raises(ValueError, match="lepe_kernel_size"):
        NaLaAttnProcessor(hidden_size=8, use_lepe=True, lepe_kernel_size=4)
    with pytest.raises(ValueError, match="hidden_size"):
        NaLaAttnProcessor(use_gate=True)
    with pytest.raises(ValueError, match="num_heads"):
        NaLaAttnProcessor(learnable_power=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_finite(dtype):
    model, (x, t, y) = tiny_dit(), dit_inputs()
    set_nala_attention(model, use_lepe=True)
    model.to(dtype)
    with torch.no_grad():
        out = model(x.to(dtype), timestep=t, class_labels=y).sample
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_set_fused_attention_switches_nala_layers_and_keeps_outputs():
    from helpers import tiny_nala

    from nala_diffusion import set_fused_attention

    model = tiny_nala(sample_size=16, num_classes=3).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        eager = model(x, timestep=t, class_labels=y).sample
        assert set_fused_attention(model) == model.config.num_layers
        fused = model(x, timestep=t, class_labels=y).sample
        assert set_fused_attention(model, False) == model.config.num_layers
    assert all(not block.attn1.processor.compile for block in model.transformer_blocks)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)


def test_every_option_is_declared_once_and_reaches_every_consumer():
    import argparse
    import dataclasses
    import inspect

    from nala_diffusion import NaLaDiTTransformer2DModel
    from nala_diffusion.models.options import (
        CONFIG_KEYS,
        DEFAULTS,
        FIELDS,
        AttentionOptions,
        add_option_flags,
        option_names,
    )
    from nala_diffusion.models.processors import ATTENTION_PROCESSORS

    # the model config has a key for every option, with the dataclass default
    signature = inspect.signature(NaLaDiTTransformer2DModel.__init__).parameters
    for name, key in zip(FIELDS, CONFIG_KEYS):
        assert signature[key].default == getattr(DEFAULTS, name), key
    # a flag for every option, of the option's type
    parser = argparse.ArgumentParser()
    names = add_option_flags(parser)
    assert set(names) == set(FIELDS)
    args = parser.parse_args(["--key_power", "5", "--attention_eps", "1e-5", "--use_rope", "--no-use_lepe",
                              "--lepe_kernel_size", "5", "--inhibit", "cosine"])
    assert args.key_power == 5.0 and isinstance(args.key_power, float) and args.eps == 1e-5
    assert args.use_rope is True and args.use_lepe is False and args.lepe_kernel_size == 5 and args.power_scale is None
    # processors take exactly their type's options and keep the dataclass types
    for attention_type, cls in ATTENTION_PROCESSORS.items():
        processor = cls(hidden_size=16, num_heads=2, **{n: getattr(DEFAULTS, n) for n in option_names(attention_type)})
        assert set(processor.options()) == set(option_names(attention_type))
    assert NaLaAttnProcessor(key_power=3).key_power == 3.0 and isinstance(NaLaAttnProcessor(key_power=3).key_power, float)
    with pytest.raises(ValueError, match="does not take option"):
        ATTENTION_PROCESSORS["softmax"](power_scale=2.0)
    for bad in (dict(key_power=float("nan")), dict(eps=-1.0), dict(lepe_kernel_size=4), dict(use_rope="yes"),
                dict(norm_scale_mode="auto"), dict(rope_base=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AttentionOptions(**bad)
    # a model built with every option (config keys) records them and its processors run with them
    model = NaLaDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8,
                                      patch_size=2, in_channels=3, num_classes=2, key_power=5, attention_eps=1e-5,
                                      rope_base=100.0, use_rope=True, angle_sharpness=7.0)
    processor = model.transformer_blocks[0].attn1.processor
    assert (processor.key_power, processor.eps, processor.rope_base, processor.angle_sharpness) == (5.0, 1e-5, 100.0, 7.0)
    assert dataclasses.asdict(AttentionOptions(**processor.options())) == {**dataclasses.asdict(DEFAULTS), **processor.options()}


def test_joint_attention_models_are_refused_naming_the_layers():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
    before = {name: type(module.processor) for name, module in model.named_modules() if hasattr(module, "processor")}
    with pytest.raises(ValueError, match=r"joint-attention layers.*transformer_blocks\.0\.attn"):
        set_nala_attention(model)
    assert before == {name: type(module.processor) for name, module in model.named_modules() if hasattr(module, "processor")}
