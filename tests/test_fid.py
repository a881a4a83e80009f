import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import lock_held_by_a_live_process, tiny_nala
from scipy import linalg

from nala_diffusion import DomainClassifier, NaLaDiTPipeline
from nala_diffusion.eval.fid import cli
from nala_diffusion.metrics import features

REPO = Path(__file__).resolve().parents[1]
JSON_FIELDS = {"fid", "kid", "num_samples", "model", "model_config_hash", "attention_type", "scheduler", "steps",
               "guidance", "seeds", "feature_extractor", "sampling_seconds", "feature_seconds", "reference"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler()).save_pretrained(root / "pipe")
    torch.manual_seed(0)
    DomainClassifier(num_classes=3, image_size=16, widths=(8, 16)).save_pretrained(root / "classifier")
    rng = np.random.default_rng(0)
    (root / "real").mkdir()
    for i in range(24):
        PIL.Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / "real" / f"{i}.png")
    return root


def sample_args(assets, out, n=10):
    return ["--model", str(assets / "pipe"), "--num_samples", str(n), "--out", str(out), "--steps", "2",
            "--batch_size", "4"]


@pytest.mark.slow
def test_one_and_two_processes_write_identical_images(assets, tmp_path):
    assert cli(["sample", *sample_args(assets, tmp_path / "one")]) == 0
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*launcher, str(REPO / "eval" / "fid.py"), "sample", *sample_args(assets, tmp_path / "two")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    one = sorted((tmp_path / "one" / "samples").glob("*.png"))
    assert [p.name for p in one] == [f"{i:06d}.png" for i in range(10)]
    for path in one:
        assert path.read_bytes() == (tmp_path / "two" / "samples" / path.name).read_bytes(), path.name


def test_rerun_regenerates_exactly_the_missing_and_broken_images(assets, tmp_path):
    out = tmp_path / "run"
    assert cli(["sample", *sample_args(assets, out)]) == 0
    paths = {i: out / "samples" / f"{i:06d}.png" for i in range(10)}
    original = {i: p.read_bytes() for i, p in paths.items()}
    paths[3].unlink()
    paths[7].write_bytes(original[7][: len(original[7]) // 2])  # truncated
    untouched = {i: paths[i].stat().st_mtime_ns for i in paths if i not in (3, 7)}
    assert cli(["sample", *sample_args(assets, out)]) == 0
    assert {i: p.read_bytes() for i, p in paths.items()} == original
    assert {i: paths[i].stat().st_mtime_ns for i in untouched} == untouched


def test_folder_against_itself_and_a_direct_frechet_computation(assets, tmp_path, capsys):
    extractor = ["--feature_extractor", str(assets / "classifier")]
    assert cli(["compare", str(assets / "real"), str(assets / "real"), *extractor, "--json", str(tmp_path / "self.json")]) == 0
    assert abs(json.loads((tmp_path / "self.json").read_text())["fid"]) < 1e-3

    assert cli(["sample", *sample_args(assets, tmp_path / "gen", n=20)]) == 0
    assert cli(["compare", str(tmp_path / "gen" / "samples"), str(assets / "real"), *extractor,
                "--json", str(tmp_path / "pair.json")]) == 0
    reported = json.loads((tmp_path / "pair.json").read_text())

    # the same features computed by hand from the PNGs (16x16, the classifier's size: no resize)
    classifier = DomainClassifier.from_pretrained(assets / "classifier").eval()

    def feats(folder):
        images = [np.asarray(PIL.Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png"))]
        batch = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return classifier.features(batch).double().numpy()

    a, b = feats(tmp_path / "gen" / "samples"), feats(assets / "real")
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert reported["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-6) and reported["fid"] > 1e-3
    assert reported["kid"] is not None


def test_calc_writes_every_field_and_stats_files_give_the_same_fid(assets, tmp_path):
    extractor = ["--feature_extractor", str(assets / "classifier")]
    stats = tmp_path / "real.npz"
    assert cli(["ref", "--images", str(assets / "real"), "--out", str(stats), "--keep_features", *extractor]) == 0
    out = tmp_path / "calc"
    with pytest.warns(UserWarning, match="fewer than the feature dimension"):
        assert cli(["calc", *sample_args(assets, out), "--ref", str(assets / "real"), *extractor, "--npz"]) == 0
    result = json.loads((out / "fid.json").read_text())
    assert JSON_FIELDS <= set(result) and result["num_samples"] == 10 and result["attention_type"] == "nala"
    assert np.load(out / "samples.npz")["arr_0"].shape == (10, 16, 16, 3)
    assert cli(["calc", *sample_args(assets, out), "--ref", str(stats), *extractor, "--json", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["fid"] == pytest.approx(result["fid"]) and again["kid"] == pytest.approx(result["kid"])


def test_stats_made_with_another_extractor_are_refused(assets, tmp_path, capsys):
    stats = tmp_path / "real.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), extractor=np.array("inception"), mode=np.array("clean"))
    code = cli(["calc", *sample_args(assets, tmp_path / "c"), "--ref", str(stats),
                "--feature_extractor", str(assets / "classifier")])
    assert code == 2 and "was made with extractor inception" in capsys.readouterr().err


@pytest.mark.skipif(os.path.exists(os.path.join(features.DEFAULT_WEIGHTS_DIR, features.TORCHSCRIPT_WEIGHTS)),
                    reason="Inception weights are present on this machine")
def test_missing_inception_weights_name_the_file(assets, capsys):
    code = cli(["compare", str(assets / "real"), str(assets / "real")])
    error = capsys.readouterr().err
    assert code == 2 and "inception-2015-12-05.pt" in error and "--inception_weights" in error
    assert cli(["compare", str(assets / "real"), str(assets / "real"), "--inception_weights", "/nowhere/x.pt"]) == 2


def test_corrupt_inception_weights_are_refused_and_not_copied(assets, tmp_path, capsys):
    corrupt = tmp_path / "weights.pt"
    corrupt.write_bytes(b"<html>rate limited</html>" * 100)
    copy = os.path.join(features.DEFAULT_WEIGHTS_DIR, "nala-inception", features.TORCHSCRIPT_WEIGHTS)
    before = os.path.getmtime(copy) if os.path.exists(copy) else None
    assert cli(["compare", str(assets / "real"), str(assets / "real"), "--inception_weights", str(corrupt)]) == 2
    error = capsys.readouterr().err
    assert "is not a TorchScript archive" in error and str(corrupt) in error
    assert (os.path.getmtime(copy) if os.path.exists(copy) else None) == before


def test_sample_above_the_training_size_with_positions_and_sharpness(assets, tmp_path):
    out = tmp_path / "big"
    assert cli(["sample", *sample_args(assets, out, n=2), "--height", "32", "--width", "32",
                "--attention_sharpness", "auto", "--position_embedding", "extend"]) == 0
    images = [PIL.Image.open(out / "samples" / f"{i:06d}.png") for i in range(2)]
    assert all(image.size == (32, 32) for image in images)
    plain = tmp_path / "plain"
    assert cli(["sample", *sample_args(assets, plain, n=2), "--height", "32", "--width", "32"]) == 0
    assert not np.array_equal(np.asarray(images[0]), np.asarray(PIL.Image.open(plain / "samples" / "000000.png")))


def test_samples_of_another_model_or_setting_are_refused_not_reused(assets, tmp_path, capsys):
    # defect: a folder sampled by one model was scored as another's
    other = tmp_path / "other"
    model = tiny_nala(sample_size=16, num_classes=3)
    with torch.no_grad():
        model.proj_out_2.bias.add_(0.5)  # other weights, same config
    NaLaDiTPipeline(model, DDIMScheduler()).save_pretrained(other)
    out = tmp_path / "a"
    assert cli(["sample", *sample_args(assets, out, n=6)]) == 0
    first = (out / "samples" / "000000.png").read_bytes()
    extractor = ["--feature_extractor", str(assets / "classifier")]
    code = cli(["calc", "--model", str(other), "--num_samples", "6", "--out", str(out), "--steps", "5",
                "--guidance", "1", "--ref", str(assets / "real"), *extractor])
    err = capsys.readouterr().err
    assert code == 2 and "model_weights_sha256" in err and "steps: 2 -> 5" in err and "guidance" in err
    assert (out / "samples" / "000000.png").read_bytes() == first and not (out / "fid.json").exists()
    # the same settings continue; fewer samples score exactly the first ones
    assert cli(["calc", *sample_args(assets, out, n=4), "--ref", str(assets / "real"), *extractor]) == 0
    assert json.loads((out / "fid.json").read_text())["num_samples"] == 4
    # --overwrite replaces them
    assert cli(["sample", "--model", str(other), "--num_samples", "2", "--out", str(out), "--steps", "2",
                "--overwrite"]) == 0
    assert sorted(os.listdir(out / "samples")) == ["000000.png", "000001.png"]
    assert (out / "samples" / "000000.png").read_bytes() != first
    # images with no fingerprint (made by something else) are not adopted silently
    stray = tmp_path / "stray"
    (stray / "samples").mkdir(parents=True)
    PIL.Image.new("RGB", (16, 16)).save(stray / "samples" / "000000.png")
    assert cli(["sample", *sample_args(assets, stray, n=2)]) == 2
    assert "no fingerprint.json" in capsys.readouterr().err


def test_a_second_writer_is_refused_and_a_dead_holders_lock_blocks_nothing(assets, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    with lock_held_by_a_live_process(out) as pid:
        assert cli(["sample", *sample_args(assets, out, n=2)]) == 2
        assert f"process {pid}" in capsys.readouterr().err
        assert not (out / "samples").exists()
    # the holder died (SIGKILL): its lock went with it, though its file is still there
    assert (out / ".lock").exists()
    assert cli(["sample", *sample_args(assets, out, n=2)]) == 0
    assert not (out / ".lock").exists() and len(os.listdir(out / "samples")) == 2
    (out / ".lock").write_text("")  # what a full disk leaves while writing the holder's name: no obstacle
    assert cli(["sample", *sample_args(assets, out, n=2)]) == 0


def test_compare_on_an_empty_folder_and_a_truncated_png_name_the_problem(assets, tmp_path, capsys):
    extractor = ["--feature_extractor", str(assets / "classifier")]
    (tmp_path / "empty").mkdir()
    assert cli(["compare", str(tmp_path / "empty"), str(assets / "real"), *extractor]) == 2
    assert "holds no images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        PIL.Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(broken / f"{i}.png")
    data = (broken / "1.png").read_bytes()
    (broken / "1.png").write_bytes(data[: len(data) // 2])
    assert cli(["compare", str(broken), str(assets / "real"), *extractor]) == 2
    assert "1.png" in capsys.readouterr().err


def test_overwrite_removes_derived_files_and_calc_holds_its_lock_throughout(assets, tmp_path, monkeypatch):
    extractor = ["--feature_extractor", str(assets / "classifier")]
    out = tmp_path / "calc"
    seen = []
    original = features.folder_features

    def features_while_locked(folder, *args, **kwargs):
        seen.append((out / ".lock").exists())
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(features, "folder_features", features_while_locked)
    assert cli(["calc", *sample_args(assets, out, n=4), "--ref", str(assets / "real"), *extractor, "--npz"]) == 0
    assert seen == [True, True] and not (out / ".lock").exists()
    assert (out / "fid.json").exists() and (out / "samples.npz").exists()
    assert cli(["sample", *sample_args(assets, out, n=4), "--steps", "3", "--overwrite"]) == 0
    assert not (out / "fid.json").exists() and not (out / "samples.npz").exists()


def test_a_domain_extractor_is_known_by_its_weights_not_its_path(assets, tmp_path, capsys):
    import shutil

    stats = tmp_path / "real.npz"
    assert cli(["ref", "--images", str(assets / "real"), "--out", str(stats), "--feature_extractor",
                str(assets / "classifier")]) == 0
    copy = tmp_path / "elsewhere" / "classifier"
    shutil.copytree(assets / "classifier", copy)  # byte-identical weights, another path: accepted
    assert cli(["compare", str(assets / "real"), str(stats), "--feature_extractor", str(copy), "--metrics", "fid"]) == 0
    torch.manual_seed(1)
    DomainClassifier(num_classes=3, image_size=16, widths=(8, 16)).save_pretrained(tmp_path / "other")
    shutil.rmtree(copy)
    shutil.copytree(tmp_path / "other", copy)  # other weights at the same path: refused
    capsys.readouterr()
    assert cli(["compare", str(assets / "real"), str(stats), "--feature_extractor", str(copy), "--metrics", "fid"]) == 2
    assert "was made with extractor domain-classifier:" in capsys.readouterr().err


def test_stats_made_with_a_domain_classifier_are_compared_with_it_unasked(assets, tmp_path, capsys):
    import json
    import shutil

    classifier = tmp_path / "classifier"
    shutil.copytree(assets / "classifier", classifier)
    stats = tmp_path / "real.npz"
    assert cli(["ref", "--images", str(assets / "real"), "--out", str(stats), "--feature_extractor",
                str(classifier)]) == 0
    given = tmp_path / "given.json"
    assert cli(["compare", str(assets / "real"), str(stats), "--feature_extractor", str(classifier), "--metrics", "fid",
                "--json", str(given)]) == 0
    capsys.readouterr()
    unasked = tmp_path / "unasked.json"  # no --feature_extractor: the classifier the stats record, not Inception
    assert cli(["compare", str(assets / "real"), str(stats), "--metrics", "fid", "--json", str(unasked)]) == 0
    assert "using it (--feature_extractor)" in capsys.readouterr().out
    assert json.loads(unasked.read_text())["fid"] == json.loads(given.read_text())["fid"]
    torch.manual_seed(2)
    shutil.rmtree(classifier)
    DomainClassifier(num_classes=3, image_size=16, widths=(8, 16)).save_pretrained(classifier)  # other weights there
    assert cli(["compare", str(assets / "real"), str(stats), "--metrics", "fid"]) == 2
    assert "no longer holds those weights; pass --feature_extractor" in capsys.readouterr().err


def test_a_size_that_cannot_fit_is_refused_before_anything_is_written(assets, tmp_path, capsys):
    from nala_diffusion.pipelines.sample import main as sample_main

    out = tmp_path / "huge"
    assert cli(["sample", *sample_args(assets, out, n=2), "--height", "40000", "--width", "40000"]) == 2
    error = capsys.readouterr().err
    assert "40000x40000 x 2 image(s) needs at least" in error and "--no_memory_check" in error
    assert not (out / "fingerprint.json").exists() and not (out / "samples").exists()
    assert sample_main(["--model", str(assets / "pipe"), "--height", "40000", "--width", "40000",
                        "--out", str(tmp_path / "huge.png")]) == 2
    assert "needs at least" in capsys.readouterr().err and not (tmp_path / "huge.png").exists()


def test_samples_fingerprint_covers_vae_and_batch_size_and_only_the_loaded_weights(assets, tmp_path, capsys):
    import shutil

    from diffusers import AutoencoderKL

    from nala_diffusion.utils.run_guard import pipeline_weights_hash

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=16).eval()
    model = tmp_path / "latent_pipe"
    NaLaDiTPipeline(tiny_nala(in_channels=4, num_classes=3), DDIMScheduler(), vae=vae).save_pretrained(model)
    weights = pipeline_weights_hash(str(model))
    (model / "checkpoint-5").mkdir()
    shutil.copy(model / "transformer" / "diffusion_pytorch_model.safetensors", model / "checkpoint-5" / "model.safetensors")
    assert pipeline_weights_hash(str(model)) == weights  # a checkpoint beside the pipeline is not what it loads
    out = tmp_path / "samples"
    args = ["sample", "--model", str(model), "--num_samples", "2", "--out", str(out), "--steps", "2", "--batch_size", "2"]
    assert cli(args) == 0
    shutil.rmtree(model / "checkpoint-5")
    assert cli(args) == 0  # deleting the checkpoint does not invalidate the samples
    capsys.readouterr()
    assert cli([*args[:-1], "1"]) == 2 and "batch_size" in capsys.readouterr().err
    config = json.loads((model / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.5
    (model / "vae" / "config.json").write_text(json.dumps(config))
    assert cli(args) == 2 and "vae_config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_refused_lock_ends_every_process_of_a_launch(assets, tmp_path):
    out = tmp_path / "busy"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with lock_held_by_a_live_process(out) as pid:
        result = subprocess.run([*launcher, str(REPO / "eval" / "fid.py"), "sample", *sample_args(assets, out, n=2)],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    # rank 0 refuses, naming the holder; the launcher then ends rank 1 instead of leaving it at a barrier
    assert result.returncode != 0 and f"being written by process {pid}" in result.stderr
    assert not (out / "samples").exists()


@pytest.mark.slow
def test_builtin_reference_equals_its_exported_folder_and_the_demo_scores_offline(tmp_path, capsys):
    from nala_diffusion import demo_classifier_path, demo_pipeline_path
    from nala_diffusion.data.datasets import load_dataset

    classifier = demo_classifier_path()
    out = tmp_path / "demo"
    assert cli(["calc", "--model", demo_pipeline_path(), "--ref", "builtin:photos:test", "--num_samples", "10",
                "--steps", "2", "--out", str(out), "--feature_extractor", classifier, "--metrics", "fid", "kid"]) == 0
    result = json.loads((out / "fid.json").read_text())
    assert result["reference"] == "builtin:photos:test" and result["num_reference"] == 1000
    assert result["reference_kind"] == "built-in dataset" and np.isfinite(result["fid"])
    # the same images as the folder an export writes: the same FID
    load_dataset("builtin:photos", 32, split="test").export(str(tmp_path / "exported"))
    assert cli(["compare", str(out / "samples"), str(tmp_path / "exported"), "--feature_extractor", classifier,
                "--json", str(tmp_path / "folder.json")]) == 0
    assert json.loads((tmp_path / "folder.json").read_text())["fid"] == pytest.approx(result["fid"], rel=1e-6)
    assert cli(["calc", "--model", demo_pipeline_path(), "--ref", "builtin:nope", "--num_samples", "10",
                "--out", str(tmp_path / "x"), "--feature_extractor", classifier]) == 2
    assert "unknown built-in dataset" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_uniform_label_draw_is_per_image_and_dit_protocol_takes_it(assets, tmp_path, capsys):
    from nala_diffusion.metrics.samples import uniform_labels

    labels = uniform_labels(3000, 1000, seed=0)
    assert labels[:100] == uniform_labels(100, 1000, seed=0)  # image i's label does not depend on the count
    assert labels != uniform_labels(3000, 1000, seed=1) and 900 < len(set(labels)) < 1000  # random, not a cycle
    assert cli(["sample", *sample_args(assets, tmp_path / "u", n=8), "--label_draw", "uniform"]) == 0
    fingerprint = json.loads((tmp_path / "u" / "fingerprint.json").read_text())
    assert fingerprint["labels"] == "uniform over 3 classes"
    assert cli(["sample", *sample_args(assets, tmp_path / "both", n=8), "--label_draw", "uniform", "--labels", "1"]) == 2
    assert "exclude each other" in capsys.readouterr().err
