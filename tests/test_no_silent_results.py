"""Defects found by an adversarial trial of the newer features (hybrids, IS/PR/sFID, learned variance,
guidance schedules, locks, EMA), each refused or right now, never silently wrong."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import TINY, tiny_nala
from PIL import Image

from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTPipeline, NaLaDiTTransformer2DModel, set_attention
from nala_diffusion.eval.fid import cli as fid_cli
from nala_diffusion.metrics import features
from nala_diffusion.train.train_nala_dit import cli as train_cli

TINY_CONFIG = {k: v for k, v in TINY.items() if k != "sample_size"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Grey crops as 8-bit and as 16-bit (x 257) PNGs, a tiny classifier, a tiny pipeline, a train folder."""
    root = tmp_path_factory.mktemp("round3")
    rng = np.random.default_rng(0)
    for name in ("g8", "g16"):
        (root / name).mkdir()
    for i in range(24):
        grey = rng.integers(40, 200, (16, 16), dtype=np.uint8)
        Image.fromarray(grey, mode="L").save(root / "g8" / f"{i}.png")
        Image.fromarray(grey.astype(np.uint16) * 257).save(root / "g16" / f"{i}.png")  # mode I;16
    torch.manual_seed(0)
    from nala_diffusion import DomainClassifier

    DomainClassifier(num_classes=3, image_size=16, widths=(8, 16)).save_pretrained(root / "classifier")
    NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler()).save_pretrained(root / "pipe")
    for c in range(3):
        (root / "data" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((16, 16, 3)) * 80 + c * 80).astype("uint8")).save(root / "data" / f"class{c}" / f"{i}.png")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return root


def train_args(root, out, *extra):
    return ["--train_data_dir", str(root / "data"), "--resolution", "16", "--model_config", str(root / "tiny.json"),
            "--train_batch_size", "4", "--max_train_steps", "2", "--output_dir", str(out), "--checkpointing_steps", "2",
            "--report_to", "none", *extra]


# 1
def test_16_bit_pngs_score_as_the_same_8_bit_pixels(folders, tmp_path):
    classifier = ["--feature_extractor", str(folders / "classifier")]
    assert fid_cli(["compare", str(folders / "g8"), str(folders / "g16"), *classifier, "--json",
                    str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["fid"] < 1e-6  # clean-fid's own reader clips 16-bit values to white: FID 5-90
    assert Image.open(folders / "g16" / "0.png").mode.startswith("I")


# 2
def test_out_inside_the_reference_folder_is_refused_before_sampling(folders, capsys):
    code = fid_cli(["calc", "--model", str(folders / "pipe"), "--num_samples", "4", "--steps", "2", "--out",
                    str(folders / "g8" / "fid"), "--ref", str(folders / "g8"), "--feature_extractor",
                    str(folders / "classifier")])
    assert code == 2 and "inside the --ref folder" in capsys.readouterr().err
    assert not (folders / "g8" / "fid").exists()


# 3
def test_init_from_our_own_run_keeps_its_sigma_unless_asked(folders, tmp_path):
    first = tmp_path / "first"
    assert train_cli(train_args(folders, first)) == 0
    sigma = {k: v for k, v in NaLaDiTTransformer2DModel.from_pretrained(first / "transformer").state_dict().items()
             if k.endswith("log_norm_scale")}
    assert sigma
    with torch.no_grad():  # a trained sigma that calibration would not give
        model = NaLaDiTTransformer2DModel.from_pretrained(first / "transformer")
        for name, tensor in model.state_dict().items():
            if name.endswith("log_norm_scale"):
                tensor.add_(0.5)
        model.save_pretrained(first / "transformer")
    moved = {k: v + 0.5 for k, v in sigma.items()}
    second = tmp_path / "second"
    assert train_cli(train_args(folders, second, "--init_from", str(first), "--learning_rate", "0")) == 0
    kept = NaLaDiTTransformer2DModel.from_pretrained(second / "transformer").state_dict()
    for name, value in moved.items():
        assert torch.equal(kept[name], value), name
    third = tmp_path / "third"
    assert train_cli(train_args(folders, third, "--init_from", str(first), "--learning_rate", "0",
                                "--recalibrate_norm_scale")) == 0
    again = NaLaDiTTransformer2DModel.from_pretrained(third / "transformer").state_dict()
    assert any(not torch.equal(again[name], value) for name, value in moved.items())


# 4
def test_set_attention_on_a_nala_dit_keeps_its_config_true(tmp_path):
    model = tiny_nala()
    previous = set_attention(model, "softmax", layers=[1])
    assert model.layer_attention_types == ["nala", "softmax"] and model.config.attention_types == ["nala", "softmax"]
    model.save_pretrained(tmp_path / "m")
    loaded = NaLaDiTTransformer2DModel.from_pretrained(tmp_path / "m")
    assert type(loaded.transformer_blocks[1].attn1.processor).__name__ == "SoftmaxAttnProcessor"
    x, t, y = torch.randn(1, 3, 8, 8), torch.tensor([3]), torch.tensor([1])
    with torch.no_grad():
        # the same function (a wrong processor or layout is off by O(1)); loaded weights may sit at other
        # alignments, whose vectorised sums round differently
        torch.testing.assert_close(loaded(x, timestep=t, class_labels=y).sample,
                                   model(x, timestep=t, class_labels=y).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one set of nala options"):
        set_attention(model, "nala", layers=[0], inhibit="cosine")  # the config could not say it
    from nala_diffusion import restore_attention

    restore_attention(model, previous)
    assert model.layer_attention_types == ["nala", "nala"] and model.config.attention_types is None


# 5: in tests/test_learned_variance.py (test_guidance_interval_all_none_and_part and the command line)


# 6: in tests/test_metrics.py and tests/test_builtin_and_demo.py (IS needs 20 samples)


# 7
def test_entropy_timesteps_outside_the_schedule_are_refused(tmp_path, capsys):
    from nala_diffusion.eval import attention_entropy

    pipe = NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=10), DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    for timestep in ("-1", "1000"):
        code = attention_entropy.main(["--model", str(tmp_path / "pipe"), "--data", "builtin:photos", "--timestep",
                                       timestep, "--images", "1"])
        assert code == 2 and "outside the noise schedule: integers 0 .. 999" in capsys.readouterr().err


# 8
def test_every_processor_that_takes_the_grid_gets_it():
    model = tiny_nala(use_lepe=True, sample_size=8)
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())  # block 0 takes no grid
    x, t, y = torch.randn(1, 3, 4, 16), torch.tensor([3]), torch.tensor([1])  # a 2 x 8 grid (patch 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "grid_size is not expected" for block 0
        out = model(x, timestep=t, class_labels=y).sample
        grid = model(x, timestep=t, class_labels=y, cross_attention_kwargs={"grid_size": (2, 8)}).sample
    assert torch.equal(out, grid)  # a 4 x 4 reading of the 16 tokens would move the LePE output


# 9
def test_dit_protocol_refuses_flags_it_would_override(folders, tmp_path, capsys):
    common = ["sample", "--model", str(folders / "pipe"), "--num_samples", "2", "--out", str(tmp_path / "s"),
              "--protocol", "dit"]
    assert fid_cli([*common, "--guidance_channels", "all"]) == 2
    assert "--protocol dit fixes --guidance_channels 3" in capsys.readouterr().err
    assert fid_cli([*common, "--learned_variance"]) == 2
    assert "no variance channels" in capsys.readouterr().err and not (tmp_path / "s").exists()


# 10
def test_fp16_on_a_cpu_is_refused_not_recorded(folders, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the runs above set float32 in this process
    try:
        assert train_cli(train_args(folders, tmp_path / "run", "--mixed_precision", "fp16")) == 2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later in-process runs set up their own
    assert "use bf16 or no" in capsys.readouterr().err
    assert not (tmp_path / "run" / "args.json").exists()


# 11
def test_auto_sharpness_is_calibrated_once_per_fid_set_and_recorded(folders, tmp_path):
    out = tmp_path / "auto"
    assert fid_cli(["sample", "--model", str(folders / "pipe"), "--num_samples", "4", "--batch_size", "2", "--steps",
                    "2", "--height", "32", "--width", "32", "--attention_sharpness", "auto", "--labels", "0", "1", "2",
                    "--out", str(out)]) == 0
    recorded = json.loads((out / "fingerprint.json").read_text())["attention_sharpness"]
    assert isinstance(recorded, dict) and len(recorded) == 2 and all(v > 0 for v in recorded.values())
    # the batches [0, 1] and [2, 0] would each have calibrated on their own labels: one factor set serves both
    pipe = NaLaDiTPipeline.from_pretrained(folders / "pipe")
    report = pipe.set_resolution_sharpness("auto", 32, 32, torch.tensor([0, 1]), 2)
    assert recorded == {name: layer["sharpness"] for name, layer in report["layers"].items()}
    other = pipe.set_resolution_sharpness("auto", 32, 32, torch.tensor([2, 0]), 2)
    assert other["layers"] != report["layers"]  # what per-batch calibration mixed


# 12
def test_changing_a_nala_models_attention_drops_sigma_and_says_so():
    from nala_diffusion import convert_dit_to_nala

    model = tiny_nala(norm_scale_mode="calibrated")
    with pytest.warns(UserWarning, match="log_norm_scale"):
        softmax = convert_dit_to_nala(model, attention_type="softmax")
    assert softmax.layer_attention_types == ["softmax", "softmax"]
    with pytest.warns(UserWarning, match="leave their processor weights behind"):
        hybrid = convert_dit_to_nala(model, softmax_layers=[0])
    assert hybrid.layer_attention_types == ["softmax", "nala"]


# 13
def test_a_run_that_failed_before_sampling_does_not_block_the_corrected_rerun(folders, tmp_path, capsys):
    out = tmp_path / "f"
    base = ["sample", "--model", str(folders / "pipe"), "--num_samples", "2", "--steps", "2", "--out", str(out)]
    assert fid_cli([*base, "--height", "17"]) == 2  # not a multiple of the patch: refused before the fingerprint
    assert "multiple of 2" in capsys.readouterr().err and not (out / "fingerprint.json").exists()
    (out / "samples").mkdir(parents=True)
    (out / "fingerprint.json").write_text(json.dumps({"steps": 99}))  # left by a run that died before any image
    assert fid_cli(base) == 0 and len(list((out / "samples").glob("*.png"))) == 2


# 14
@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((4, 16, 16, 3), np.float32)}, "float32"),
    ({"arr_0": np.zeros((4, 3, 16, 16), np.uint8)}, "channels-first"),
    ({"arr_0": np.zeros((4, 16, 16, 4), np.uint8)}, "RGBA"),
    ({"mu": np.zeros(16)}, "without sigma"),
    ({"mu": np.zeros(8), "sigma": np.eye(8)}, "do not fit"),
])
def test_bad_references_are_refused_before_sampling(folders, tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "ref.npz", **arrays)
    code = fid_cli(["calc", "--model", str(folders / "pipe"), "--num_samples", "4", "--steps", "2", "--out",
                    str(tmp_path / "o"), "--ref", str(tmp_path / "ref.npz"), "--feature_extractor",
                    str(folders / "classifier"), "--metrics", "fid"])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_missing_reference_and_one_rewritten_during_calc_are_refused(folders, tmp_path, capsys, monkeypatch):
    classifier = ["--feature_extractor", str(folders / "classifier")]
    base = ["calc", "--model", str(folders / "pipe"), "--num_samples", "4", "--steps", "2", "--metrics", "fid"]
    assert fid_cli([*base, "--out", str(tmp_path / "o"), "--ref", str(tmp_path / "nope.npz"), *classifier]) == 2
    assert "no such file or folder" in capsys.readouterr().err and not (tmp_path / "o").exists()
    stats = tmp_path / "stats.npz"
    assert fid_cli(["ref", "--images", str(folders / "g8"), "--out", str(stats), *classifier]) == 0
    from nala_diffusion.eval import fid as fid_module

    sampling = fid_module.run_sampling

    def rewritten_meanwhile(args, state):
        info = sampling(args, state)
        assert fid_cli(["ref", "--images", str(folders / "g16"), "--out", str(stats), *classifier]) == 0
        return info

    monkeypatch.setattr(fid_module, "run_sampling", rewritten_meanwhile)
    assert fid_cli([*base, "--out", str(tmp_path / "c"), "--ref", str(stats), *classifier]) == 2
    assert "changed while the samples were made" in capsys.readouterr().err


# 15
def test_sampler_switch_channel_counts_and_counts_fail_clearly(tmp_path, capsys):
    from nala_diffusion.pipelines.sample import main as sample_main

    model = tiny_nala(sample_size=16, num_classes=3, in_channels=4, out_channels=8)
    pipe = NaLaDiTPipeline(model, DDPMScheduler(variance_type="learned_range"))
    pipe.save_pretrained(tmp_path / "p")
    common = ["--model", str(tmp_path / "p"), "--labels", "0", "--steps", "2"]
    assert sample_main([*common, "--scheduler", "ddim", "--out", str(tmp_path / "a.png")]) == 0  # was variance_type
    images = pipe([0, 1], num_inference_steps=2, guidance_channels=2.0, use_learned_variance=True,
                  output_type="latent").images  # was a TypeError
    assert images.shape == (2, 4, 16, 16)
    for flag, value in (("--nrow", "-1"), ("--height", "0"), ("--steps", "0")):
        with pytest.raises(SystemExit) as exit_info:
            sample_main([*common, flag, value, "--out", str(tmp_path / "b.png")])
        assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err
    assert sample_main([*common, "--steps", "1001", "--out", str(tmp_path / "b.png")]) == 2
    assert "exceeds the scheduler's 1000" in capsys.readouterr().err
    plain = NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDPMScheduler(variance_type="learned_range"))
    with pytest.raises(ValueError, match="has out_channels 3"):  # not "None"
        plain([0], num_inference_steps=2, use_learned_variance=True)


# 16
def test_data_handling_details(folders, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    np.save(tmp_path / "imgs" / "labels.npy", np.arange(3))
    assert len(features.image_files(str(tmp_path / "imgs"))) == 3  # the .npy is not an image
    # the progressive mode's first stage is at the training size
    pipe = NaLaDiTHighResPipeline(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler())
    assert pipe.stage_sizes(24, 24) == [(16, 16), (24, 24)] and pipe.stage_sizes(64, 64)[0] == (16, 16)
    # a folder against itself: FID 0, not -0.0000; a negative KID is explained
    classifier = ["--feature_extractor", str(folders / "classifier")]
    assert fid_cli(["compare", str(folders / "g8"), str(folders / "g8"), *classifier, "--json",
                    str(tmp_path / "same.json")]) == 0
    printed = capsys.readouterr().out
    same = json.loads((tmp_path / "same.json").read_text())
    assert 0 <= same["fid"] < 1e-9 and "FID 0.0000" in printed and "-0.0000" not in printed
    assert same["kid"] >= 0 or "read it as 0" in printed
    from cleanfid import fid as cleanfid_fid

    from nala_diffusion.metrics import scores

    f = np.random.default_rng(0).normal(size=(24, 16))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert cleanfid_fid.frechet_distance(mu, sigma, mu, sigma) < 0  # round-off below 0 ...
    assert scores.frechet_distance(mu, sigma, mu, sigma) == 0.0  # ... reported as 0
    # a PNG half written when the run was killed is removed by the next run
    out = tmp_path / "s"
    base = ["sample", "--model", str(folders / "pipe"), "--num_samples", "2", "--steps", "2", "--out", str(out)]
    assert fid_cli(base) == 0
    (out / "samples" / ".tmp-abc.png").write_bytes(b"half")
    assert fid_cli(base) == 0 and not (out / "samples" / ".tmp-abc.png").exists()


def test_resume_takes_the_same_layout_written_another_way(folders, tmp_path):
    out = tmp_path / "hybrid"
    assert train_cli(train_args(folders, out, "--softmax_layers", "1", "--checkpointing_steps", "1")) == 0
    args = train_args(folders, out, "--softmax_layers", "-1", "--checkpointing_steps", "1",
                      "--resume_from_checkpoint", "latest")
    args[args.index("--max_train_steps") + 1] = "3"
    assert train_cli(args) == 0


# 17: in tests/test_hub_journey.py (save_pretrained(variant="fp16") writes and loads the variant)
def test_variant_files_are_written(tmp_path):
    pipe = NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler())
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    assert os.path.isfile(tmp_path / "v" / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
    loaded = NaLaDiTPipeline.from_pretrained(tmp_path / "v", variant="fp16")
    assert torch.equal(next(loaded.transformer.parameters()), next(pipe.transformer.parameters()))
