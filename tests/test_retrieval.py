"""The retrieval-denoising task (builtin:pairs) and its measures."""
import json

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import tiny_nala

from nala_diffusion import NaLaDiTPipeline
from nala_diffusion.data.builtin_pairs import HALF, SIZE, TILE, partner_tokens
from nala_diffusion.data.datasets import load_dataset
from nala_diffusion.eval import retrieval


@pytest.fixture(scope="module")
def pairs():
    return {mode: load_dataset(f"builtin:{name}", 32, split="test")
            for mode, name in (("paired", "pairs"), ("unpaired", "pairs_unpaired"), ("mixed", "pairs_mixed"))}


def test_each_bottom_half_is_its_top_half_shifted_by_the_recorded_offset(pairs):
    data = pairs["paired"]
    assert data.images.shape[1:] == (3, SIZE, SIZE) and len(data.classes) == 10
    assert (data.offsets % 4 == 0).all() and data.offsets.min() >= 4 and data.offsets.max() <= 28
    assert len(set(data.offsets.tolist())) == 7  # the offset depends on the image
    for image, offset in zip(data.images, data.offsets):
        top, bottom = image[:, :HALF], image[:, HALF:]
        assert torch.equal(bottom, torch.roll(top, int(offset), dims=-1))
    # the control has the same tops, and its bottoms are other crops
    control = pairs["unpaired"]
    assert torch.equal(control.images[:, :, :HALF], data.images[:, :, :HALF])
    for image, offset in zip(control.images, control.offsets):
        assert not torch.equal(image[:, HALF:], torch.roll(image[:, :HALF], int(offset), dims=-1))
    # the mixed set alternates; the splits are disjoint and deterministic
    mixed = pairs["mixed"]
    assert mixed.paired[::2].all() and not mixed.paired[1::2].any()
    train = load_dataset("builtin:pairs", 32, split="train")
    assert len(train) == 3000 and len(data) == 600
    assert torch.equal(load_dataset("builtin:pairs", 32, split="test").images, data.images)
    with pytest.raises(ValueError, match="32 x 32"):
        load_dataset("builtin:pairs", 64)


def tiles(half: torch.Tensor) -> torch.Tensor:
    """(3, HALF, SIZE) -> (tiles, 3 * TILE * TILE), row-major."""
    return half.unfold(1, TILE, TILE).unfold(2, TILE, TILE).permute(1, 2, 0, 3, 4).reshape(-1, 3 * TILE * TILE)


def test_tiles_layout_is_a_mosaic_of_unrelated_tiles_and_crops_layout_one_crop(pairs):
    # tiles: neighbouring tiles differ far more than neighbouring 4-px columns of a crop do, and every
    # tile is a 4 x 4 crop of its photograph (checked on one image against the photograph itself)
    import numpy as np

    from nala_diffusion.data.builtin_photos import PHOTOS, load_photo

    mosaic = pairs["paired"].images[:, :, :HALF]
    crops = load_dataset("builtin:pairs_crops", 32, split="test")
    crop = crops.images[:, :, :HALF]

    def edge_jump(half):  # mean |difference| across the vertical tile borders against inside the tiles
        across = (half[..., TILE::TILE] - half[..., TILE - 1:-1:TILE]).abs().mean()
        inside = (half[..., 1::TILE] - half[..., 0::TILE]).abs().mean()
        return float(across / inside)

    assert edge_jump(mosaic) > 2 * edge_jump(crop)
    photo = torch.from_numpy(np.asarray(load_photo(list(PHOTOS.values())[0]))).permute(2, 0, 1).float() / 127.5 - 1
    windows = photo.unfold(1, TILE, 1).unfold(2, TILE, 1)  # (3, H', W', TILE, TILE): every 4 x 4 crop
    windows = windows.permute(1, 2, 0, 3, 4).reshape(-1, 3 * TILE * TILE)
    for tile in tiles(mosaic[0])[:6]:
        assert (windows - tile).abs().amax(-1).min() < 1e-5
    # the crops layout keeps the former task: bottom halves are their top halves shifted, the control not
    for image, offset in zip(crops.images[:20], crops.offsets[:20]):
        assert torch.equal(image[:, HALF:], torch.roll(image[:, :HALF], int(offset), dims=-1))
    control = load_dataset("builtin:pairs_crops_unpaired", 32, split="test")
    assert torch.equal(control.images[:, :, :HALF], crop)
    assert not torch.equal(control.images[0, :, HALF:], torch.roll(crop[0], int(control.offsets[0]), dims=-1))
    with pytest.raises(ValueError, match="layout"):
        from nala_diffusion.data.builtin_pairs import BuiltinPairs
        BuiltinPairs("test", layout="stripes")


def test_partner_tokens_point_to_the_shifted_source_token():
    partners = partner_tokens(6, patch=2)  # 16 x 16 tokens, shift 3 columns (any whole patch count works)
    assert (partners[: 8 * 16] == -1).all()
    assert int(partners[8 * 16 + 5]) == 0 * 16 + 2  # bottom row 0, column 5 <- top row 0, column 2
    assert int(partners[15 * 16 + 1]) == 7 * 16 + 14  # cyclic: column 1 - 3 = -2 -> 14
    with pytest.raises(ValueError, match="patches"):
        partner_tokens(3, patch=2)


@pytest.mark.parametrize("window", [0, 1])
def test_window_mass_is_one_for_attention_on_the_partner_and_window_over_n_for_uniform(window):
    side, partners = 16, partner_tokens(10, patch=2)
    n = side * side
    on_partner = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.nonzero(partners >= 0).flatten()
    on_partner[rows, partners[rows]] = 1.0
    assert torch.allclose(retrieval.window_mass(on_partner, partners, side, window),
                          torch.ones(len(rows), dtype=torch.float64))
    uniform = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    mass = retrieval.window_mass(uniform, partners, side, window)
    assert torch.allclose(mass, torch.full_like(mass, (2 * window + 1) / n))
    # the baseline window (another offset) sees none of the partner attention
    assert retrieval.window_mass(on_partner, partner_tokens(20, patch=2), side, window).max() == 0
    # attention on the partner's neighbour counts only with a window
    beside = torch.zeros(n, n, dtype=torch.float64)
    beside[rows, (partners[rows] // side) * side + (partners[rows] % side + 1) % side] = 1.0
    assert float(retrieval.window_mass(beside, partners, side, window).min()) == float(window)


def test_measures_run_on_a_pipeline_folder_and_write_json(tmp_path):
    model = tiny_nala(sample_size=32, num_classes=10, patch_size=2)
    NaLaDiTPipeline(model, DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "retrieval.json"
    assert retrieval.main(["--model", str(tmp_path / "pipe"), "--json", str(out), "--gain_images", "8",
                           "--mass_images", "2", "--timesteps", "500"]) == 0
    result = json.loads(out.read_text())
    gain = result["gain"]
    assert gain["images"] == 8 and set(gain["gain"]) == {"500"}
    assert gain["gain"]["500"] == pytest.approx(gain["unpaired"]["500"] - gain["paired"]["500"])
    assert len(result["mass"]) == model.config.num_layers and result["layout"] == "tiles"
    for layer in result["mass"].values():
        assert 0 <= layer["mass"] <= 1 and 0 <= layer["baseline"] <= 1 and layer["uniform"] == pytest.approx(1 / 256)
    crops = retrieval.measure(str(tmp_path / "pipe"), timesteps=(250,), gain_images=4, mass_images=2, layout="crops")
    assert crops["layout"] == "crops" and next(iter(crops["mass"].values()))["uniform"] == pytest.approx(3 / 256)
    tiles_250 = retrieval.measure(str(tmp_path / "pipe"), timesteps=(250,), gain_images=4, mass_images=2)
    assert crops["gain"]["paired"]["250"] != tiles_250["gain"]["paired"]["250"]  # another test set
    with pytest.raises(SystemExit):
        retrieval.main(["--model", str(tmp_path / "pipe"), "--json", str(out), "--layout", "stripes"])


def test_a_hybrid_model_is_measured_layer_by_layer_with_each_layers_kernel(tmp_path):
    # the same weights as softmax-then-NaLa and as pure NaLa: block 0 sees the same queries and keys in
    # both, so its mass differs only by the kernel it is measured with
    hybrid = tiny_nala(sample_size=32, num_classes=10, attention_types=["softmax", "nala"])
    pure = tiny_nala(sample_size=32, num_classes=10)
    loaded = pure.load_state_dict(hybrid.state_dict(), strict=False)  # all but block 0's sigma (softmax has none)
    assert loaded.missing_keys == ["transformer_blocks.0.attn1.processor.log_norm_scale"] and not loaded.unexpected_keys
    results = {}
    for name, model in (("hybrid", hybrid), ("pure", pure)):
        NaLaDiTPipeline(model, DDPMScheduler()).save_pretrained(tmp_path / name)
        results[name] = retrieval.measure(str(tmp_path / name), timesteps=(250,), gain_images=2, mass_images=2)
    first, second = "transformer_blocks.0.attn1", "transformer_blocks.1.attn1"
    assert [results["hybrid"]["mass"][n]["kind"] for n in (first, second)] == ["softmax", "nala"]
    assert results["pure"]["mass"][first]["kind"] == "nala"
    assert results["hybrid"]["mass"][first]["mass"] != pytest.approx(results["pure"]["mass"][first]["mass"], rel=1e-3)
