import json

import pytest
import torch
from helpers import dit_inputs, tiny_dit

from nala_diffusion import NaLaDiTTransformer2DModel, convert_dit_to_nala, set_nala_attention

# Extra keys of the legacy Transformer2DModel config that facebook/DiT-XL-2-256 ships.
LEGACY_KEYS = {
    "_class_name": "Transformer2DModel",
    "cross_attention_dim": None,
    "double_self_attention": False,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "use_linear_projection": False,
}


def run(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def save_legacy_dit(model, folder):
    transformer = folder / "transformer"
    model.save_pretrained(transformer)
    config = json.loads((transformer / "config.json").read_text())
    config.update(LEGACY_KEYS)
    (transformer / "config.json").write_text(json.dumps(config))
    return folder


def test_softmax_conversion_is_exact():
    dit, inputs = tiny_dit(out_channels=8), dit_inputs()
    converted = convert_dit_to_nala(dit, attention_type="softmax")
    assert isinstance(converted, NaLaDiTTransformer2DModel)
    assert torch.equal(run(converted, inputs), run(dit, inputs))


def test_nala_conversion_copies_every_weight_and_extras_start_as_identity(tmp_path):
    dit, inputs = tiny_dit(out_channels=8), dit_inputs()
    folder = save_legacy_dit(dit, tmp_path)
    converted = convert_dit_to_nala(folder, inhibit="cosine", use_lepe=True, norm_scale_mode="fixed")
    source = dit.state_dict()
    for name, tensor in converted.state_dict().items():
        if ".processor." in name:
            assert tensor.abs().sum() == 0, name  # LePE zero-initialised
        else:
            assert torch.equal(tensor, source[name]), name
    set_nala_attention(dit, inhibit="cosine")
    assert torch.equal(run(converted, inputs), run(dit, inputs))
    assert converted.config.num_classes == 10 and converted.config.out_channels == 8
    # by default sigma is calibrated from the DiT's queries: the only other new tensor
    calibrated = convert_dit_to_nala(folder, inhibit="cosine", use_lepe=True)
    new = {n for n in calibrated.state_dict() if n not in source and not n.endswith(("lepe.weight", "lepe.bias"))}
    assert new == {f"transformer_blocks.{i}.attn1.processor.log_norm_scale" for i in range(2)}


def test_converted_model_round_trips(tmp_path):
    converted = convert_dit_to_nala(tiny_dit(), use_lepe=True, learnable_power=True)
    converted.save_pretrained(tmp_path)
    loaded = NaLaDiTTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(run(loaded, dit_inputs()), run(converted, dit_inputs()))


def test_conversion_errors(tmp_path):
    with pytest.raises(ValueError, match="use_gate"):
        convert_dit_to_nala(tiny_dit(), use_gate=True)
    with pytest.raises(ValueError, match="neither model_index.json .* nor config.json"):
        convert_dit_to_nala(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not a DiT"):
        convert_dit_to_nala(tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        convert_dit_to_nala(tiny_dit(), num_classes=7)


def test_pickle_weights_are_refused(tmp_path):
    dit = tiny_dit()
    dit.save_pretrained(tmp_path, safe_serialization=False)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="holds no safetensors weights"):
        convert_dit_to_nala(tmp_path)


def test_converting_one_of_our_models_keeps_its_extras_and_their_weights():
    from helpers import tiny_nala

    source = tiny_nala(sample_size=16, num_classes=3, attention_type="softmax", use_lepe=True)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".processor.lepe." in name:
                p.normal_()  # a trained LePE, not the zero init
    converted = convert_dit_to_nala(source, inhibit="cosine")
    assert converted.config.attention_type == "nala" and converted.config.use_lepe
    assert converted.config.inhibit == "cosine"
    target = converted.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(target[name], tensor), name
    with pytest.raises(ValueError, match="use_gate"):
        convert_dit_to_nala(source, use_gate=True)


def test_a_hub_id_on_an_offline_machine_fails_fast_naming_the_way_out(monkeypatch):
    import time

    from nala_diffusion.models import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot be reached .* local Hub cache .* has no copy"):
        sources.load_dit("facebook/DiT-XL-2-256")
    assert time.perf_counter() - start < 10
    from huggingface_hub import constants

    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert sources.hub_reachable() is False
