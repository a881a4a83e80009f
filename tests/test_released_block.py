"""NaLaFormer's released block as options: LePE 5x5 with its trunc-normal init, and the convolutional
positional encodings (CPE) before the attention and before the FFN, checked against the released
block's formula (NaLaformer/NALA.py, ``Block.forward``):

    x = x + cpe1(x);  x = x + attn(norm1(x));  x = x + cpe2(x);  x = x + ffn(norm2(x))
"""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, dit_inputs, randomize, tiny_dit

from nala_diffusion import NaLaDiTTransformer2DModel, convert_dit_to_nala
from nala_diffusion.models.processors import ATTENTION_PROCESSORS


def conv_on_grid(conv, tokens, rows, cols):
    b, n, c = tokens.shape
    return conv(tokens.transpose(1, 2).reshape(b, c, rows, cols)).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("init", ["zero", "trunc_normal"])
def test_lepe_init_is_zero_or_nalaformers_trunc_normal(init):
    torch.manual_seed(0)
    processor = ATTENTION_PROCESSORS["nala"](hidden_size=64, num_heads=2, use_lepe=True, lepe_kernel_size=5, lepe_init=init)
    weight, bias = processor.lepe.weight, processor.lepe.bias
    assert weight.shape == (64, 1, 5, 5) and bool((bias == 0).all())
    if init == "zero":
        assert bool((weight == 0).all())
    else:  # timm's trunc_normal_(std=.02): bounds +-2 (absolute), i.e. a plain normal at this std
        assert 0.017 < float(weight.std()) < 0.023 and float(weight.abs().max()) < 0.1
    with pytest.raises(ValueError, match="lepe_init"):
        ATTENTION_PROCESSORS["nala"](hidden_size=64, num_heads=2, use_lepe=True, lepe_init="normal")


def test_cpe_places_both_convolutions_where_the_released_block_has_them():
    torch.manual_seed(0)
    model = NaLaDiTTransformer2DModel(**TINY, in_channels=3, num_classes=4, use_cpe=True, use_lepe=True,
                                      lepe_kernel_size=5, lepe_init="trunc_normal")
    randomize(model).eval()
    with torch.no_grad():  # CPE weights large enough to matter
        for cpe in model.conv_positions:
            cpe.cpe1.weight.normal_(0, 0.3)
            cpe.cpe2.weight.normal_(0, 0.3)
    x, t, y = torch.randn(2, 3, 8, 12), torch.tensor([10, 700]), torch.tensor([0, 3])
    rows, cols = 4, 6
    captured = {}
    model.norm_out.register_forward_pre_hook(lambda module, inputs: captured.update(h=inputs[0]))
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
        h = model._embed_patches(x, "interpolate")
        for block, cpe in zip(model.transformer_blocks, model.conv_positions):
            h = h + conv_on_grid(cpe.cpe1, h, rows, cols)
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, t, y, hidden_dtype=h.dtype)
            h = h + gate_msa.unsqueeze(1) * block.attn1(normed, grid_size=(rows, cols))
            h = h + conv_on_grid(cpe.cpe2, h, rows, cols)
            normed = F.layer_norm(h, (h.shape[-1],), eps=block.norm3.eps)  # the FFN's norm, without its hooks
            h = h + gate_mlp.unsqueeze(1) * block.ff(normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
    torch.testing.assert_close(captured["h"], h, rtol=1e-5, atol=1e-5)
    # and the convolutions matter: without them the blocks give something else
    plain = NaLaDiTTransformer2DModel(**TINY, in_channels=3, num_classes=4, use_lepe=True, lepe_kernel_size=5)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("conv_positions.")})
    with torch.no_grad():
        assert not torch.allclose(plain(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample,
                                  atol=1e-3)


def test_a_conversion_with_the_released_extras_starts_exactly_as_the_dit(tmp_path):
    dit = tiny_dit(in_channels=4, num_classes=10)
    x, t, y = dit_inputs()
    converted = convert_dit_to_nala(dit, attention_type="softmax", use_cpe=True, use_lepe=True, lepe_kernel_size=5,
                                    lepe_init="trunc_normal")
    assert converted.config.use_cpe and converted.conv_positions is not None
    assert all(bool((p == 0).all()) for n, p in converted.named_parameters() if "conv_positions" in n or ".lepe." in n)
    with torch.no_grad():
        torch.testing.assert_close(converted(x, timestep=t, class_labels=y).sample, dit(x, timestep=t, class_labels=y).sample)
    converted.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_cpe"] is True
    loaded = NaLaDiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.conv_positions is not None and len(loaded.conv_positions) == TINY["num_layers"]


def test_nala_train_builds_the_released_block_from_its_flags(tmp_path):
    from nala_diffusion.train import train_nala_dit

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "sample_size"}))
    flags = train_nala_dit.parse_args(["--dataset", "builtin:pairs", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                                       "--model_config", str(config), "--use_cpe", "--use_lepe", "--lepe_kernel_size", "5",
                                       "--lepe_init", "trunc_normal", "--use_gate", "--use_rope"])
    model, _ = train_nala_dit.build_model(flags, 3, 16, 4)
    assert model.config.use_cpe and model.conv_positions is not None
    processor = model.transformer_blocks[0].attn1.processor
    assert (processor.lepe_kernel_size, processor.lepe_init, processor.use_gate, processor.use_rope) == (
        5, "trunc_normal", True, True)
    assert float(model.conv_positions[0].cpe1.weight.abs().max()) > 0  # trunc-normal for a new model
