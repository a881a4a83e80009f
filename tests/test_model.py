import json

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from helpers import dit_inputs, randomize, tiny_nala

from nala_diffusion import DIT_PRESETS, NaLaAttnProcessor, NaLaDiTTransformer2DModel, preset_config
from nala_diffusion.models.processors import ELULinearAttnProcessor, ReLULinearAttnProcessor, SoftmaxAttnProcessor


def run(model, x, t=None, y=None, **kwargs):
    t = torch.full((x.shape[0],), 500) if t is None else t
    y = torch.arange(x.shape[0]) % model.config.num_classes if y is None else y
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y, **kwargs).sample


def test_non_square_pixel_space_and_learned_sigma():
    x = torch.randn(1, 3, 16, 24)
    assert run(tiny_nala(), x).shape == (1, 3, 16, 24)
    assert run(tiny_nala(out_channels=6), x).shape == (1, 6, 16, 24)
    latent = tiny_nala(in_channels=4, out_channels=8)
    assert run(latent, torch.randn(2, 4, 8, 12)).shape == (2, 8, 8, 12)


def test_non_square_token_order_matches_the_image():
    # Each output patch depends on its own input patch: zeroing one input patch moves the output most there.
    model = tiny_nala(attention_type="relu_linear")
    x = torch.randn(1, 3, 8, 12)
    base = run(model, x)
    x2 = x.clone()
    x2[:, :, 2:4, 8:10] += 5.0
    diff = (run(model, x2) - base).abs().sum(1)[0]  # (8, 12)
    assert divmod(int(diff.argmax()), 12)[0] in (2, 3) and divmod(int(diff.argmax()), 12)[1] in (8, 9)


@pytest.mark.parametrize(
    "attention_type,cls",
    [("nala", NaLaAttnProcessor), ("softmax", SoftmaxAttnProcessor), ("relu_linear", ReLULinearAttnProcessor), ("elu_linear", ELULinearAttnProcessor)],
)
def test_attention_type_selects_processor(attention_type, cls):
    model = tiny_nala(attention_type=attention_type)
    assert all(isinstance(b.attn1.processor, cls) for b in model.transformer_blocks)
    assert torch.isfinite(run(model, torch.randn(2, 3, 8, 10))).all()


@pytest.mark.parametrize(
    "config",
    [
        dict(attention_type="nala", inhibit="cosine", use_lepe=True, use_gate=True, learnable_power=True, use_rope=True),
        dict(attention_type="elu_linear", use_lepe=True),
        dict(attention_type="softmax"),
    ],
)
def test_save_and_load_round_trip(tmp_path, config):
    model = tiny_nala(**config)
    randomize(model)
    x = torch.randn(2, 3, 8, 12)
    before = run(model, x)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "NaLaDiTTransformer2DModel" and saved["attention_type"] == config["attention_type"]
    loaded = NaLaDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert type(loaded.transformer_blocks[0].attn1.processor) is type(model.transformer_blocks[0].attn1.processor)
    assert torch.equal(run(loaded, x), before)


def test_position_embedding_extend_and_interpolate():
    model = tiny_nala()
    n = model.config.sample_size // model.config.patch_size
    extended = model._position_table(2 * n, 3 * n, "extend", "cpu")[0].view(2 * n, 3 * n, -1)
    training = model.pos_embed.pos_embed[0].view(n, n, -1)
    torch.testing.assert_close(extended[:n, :n], training)  # extending keeps the training positions
    x = torch.randn(1, 3, 16, 24)
    # interpolation is the default; extend is selectable per call and per config
    assert model.config.position_embedding == "interpolate"
    assert torch.equal(run(model, x), run(model, x, position_embedding="interpolate"))
    assert not torch.allclose(run(model, x), run(model, x, position_embedding="extend"))
    extending = tiny_nala(position_embedding="extend")
    assert torch.equal(run(extending, x), run(model, x, position_embedding="extend"))
    # interpolate is diffusers' PatchEmbed table, each axis squeezed into the training range
    table = get_2d_sincos_pos_embed(model.inner_dim, (8, 12), base_size=n, output_type="pt")
    patches = model.pos_embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model._embed_patches(x, "interpolate"), patches + table.float())


def test_bad_inputs_raise():
    model = tiny_nala()
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        run(model, torch.randn(1, 3, 9, 8))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        run(model, torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="position_embedding"):
        run(model, torch.randn(1, 3, 8, 8), position_embedding="crop")
    with pytest.raises(ValueError, match="attention_type"):
        tiny_nala(attention_type="flash")


def test_null_class_and_no_random_label_drop():
    model = tiny_nala()
    assert model.null_class_label == 10
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    x, t, _ = dit_inputs(channels=3)
    null = torch.full((2,), model.null_class_label)
    assert torch.isfinite(run(model, x, t, null)).all()
    y = torch.tensor([1, 2])
    model.train()
    train_out = run(model, x, t, y)
    model.eval()
    assert torch.equal(train_out, run(model, x, t, y))  # no label was dropped in train mode


def test_gradient_checkpointing_gives_same_gradients():
    x, t, y = dit_inputs(channels=3)
    grads = []
    for checkpointing in (False, True):
        model = tiny_nala(use_lepe=True).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, timestep=t, class_labels=y).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_presets():
    assert {"S/2", "B/2", "L/2", "XL/2", "S/8"} <= set(DIT_PRESETS)
    config = preset_config("S/2", sample_size=16)
    assert config["num_layers"] == 12 and config["num_attention_heads"] * config["attention_head_dim"] == 384
    assert preset_config("DiT-XL/2")["attention_head_dim"] == 72
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("M/3")
    model = NaLaDiTTransformer2DModel.from_preset("S/8", sample_size=16, in_channels=3, num_classes=5)
    assert model.inner_dim == 384 and model.config.num_classes == 5
