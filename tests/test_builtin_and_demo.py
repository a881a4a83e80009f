"""The built-in dataset, the shipped domain classifier and the shipped demo pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import nala_diffusion
from nala_diffusion import DomainClassifier, NaLaDiTPipeline
from nala_diffusion.data.datasets import load_dataset


@pytest.fixture(scope="module")
def photos():
    return load_dataset("builtin:photos", 32, split="train"), load_dataset("builtin:photos", 32, split="test")


def test_builtin_photos_is_deterministic_and_split(photos):
    train, test = photos
    assert len(train.classes) == 10 and len(train) == 3000 and len(test) == 1000
    assert train[0][0].shape == (3, 32, 32) and -1 <= train.images.min() and train.images.max() <= 1
    assert torch.bincount(train.labels).tolist() == [300] * 10
    again = load_dataset("builtin:photos", 32, split="train")
    assert torch.equal(again.images, train.images)
    # no test crop equals a training crop
    flat_train = {bytes(x.numpy().tobytes()) for x in train.images[::7]}
    assert not any(bytes(x.numpy().tobytes()) in flat_train for x in test.images)
    assert load_dataset("builtin:photos", 16).images.shape[-1] == 16


def test_builtin_photos_export(photos, tmp_path):
    _, test = photos
    assert test.export(tmp_path) == 1000
    assert sorted(os.listdir(tmp_path)) == sorted(test.classes)
    first = np.asarray(PIL.Image.open(tmp_path / test.classes[0] / "00000.png"))
    assert first.shape == (32, 32, 3)


def test_shipped_classifier_beats_its_reported_accuracy_minus_a_margin(photos):
    _, test = photos
    path = nala_diffusion.demo_classifier_path()
    reported = json.load(open(os.path.join(path, "metrics.json")))["test_accuracy"]
    classifier = DomainClassifier.from_pretrained(path).eval()
    with torch.no_grad():
        predictions = classifier((test.images + 1) / 2).argmax(-1)
    accuracy = (predictions == test.labels).float().mean().item()
    assert accuracy >= reported - 0.02 and accuracy > 0.5
    assert classifier.features(torch.rand(2, 3, 64, 64)).shape == (2, classifier.feature_dim)


def test_quality_tool_reports_accuracy_and_fid_ratio(tmp_path, capsys):
    from diffusers import DDIMScheduler

    from nala_diffusion import NaLaDiTTransformer2DModel
    from nala_diffusion.eval import quality

    torch.manual_seed(0)
    transformer = NaLaDiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                            sample_size=32, patch_size=8, num_classes=10, norm_num_groups=1)
    NaLaDiTPipeline(transformer, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    assert quality.main(["--model", str(tmp_path / "pipe"), "--classifier", nala_diffusion.demo_classifier_path(),
                         "--num_samples", "20", "--untrained_samples", "10", "--steps", "2",
                         "--out", str(tmp_path / "q")]) == 0
    result = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert 0 <= result["class_accuracy"]["accuracy"] <= 1 and len(result["class_accuracy"]["per_class"]) == 10
    assert result["fid_trained"] > 0 and result["fid_untrained"] > 0 and result["untrained_samples"] == 10
    assert len(os.listdir(tmp_path / "q" / "untrained" / "samples")) == 10
    # a rerun with fewer samples scores exactly the first ones (not the 20 on disk): the FID
    # recomputed here from those 10 images' features with scipy's matrix square root
    assert quality.main(["--model", str(tmp_path / "pipe"), "--classifier", nala_diffusion.demo_classifier_path(),
                         "--num_samples", "10", "--untrained_samples", "10", "--steps", "2",
                         "--out", str(tmp_path / "q")]) == 0
    rerun = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert rerun["num_samples"] == 10 and len(os.listdir(tmp_path / "q" / "trained" / "samples")) == 20
    from scipy import linalg

    from nala_diffusion.metrics import features

    extractor = features.classifier_extractor(nala_diffusion.demo_classifier_path(), torch.device("cpu"))
    first = [str(tmp_path / "q" / "trained" / "samples" / f"{i:06d}.png") for i in range(10)]
    fake = features.folder_features(str(tmp_path / "q" / "trained" / "samples"), extractor, "cpu", verbose=False, files=first)
    real = features.folder_features(str(tmp_path / "q" / "real"), extractor, "cpu", verbose=False)
    mu1, mu2 = fake.mean(0), real.mean(0)
    s1, s2 = np.cov(fake, rowvar=False), np.cov(real, rowvar=False)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert rerun["fid_trained"] == pytest.approx(expected, rel=1e-3)
    # the rest of the suite on the same features: precision/recall against the 1,000 real images, IS
    from nala_diffusion.metrics import scores

    assert (rerun["precision_trained"], rerun["recall_trained"]) == pytest.approx(scores.precision_recall(fake, real))
    assert rerun["is_mean_trained"] is None  # 10 samples over 10 splits: one image a split always scores 1
    with pytest.raises(ValueError, match="needs at least 20 samples"):
        scores.inception_score(extractor.logits(fake))
    twenty = features.folder_features(str(tmp_path / "q" / "trained" / "samples"), extractor, "cpu", verbose=False)
    assert result["is_mean_trained"] == pytest.approx(scores.inception_score(extractor.logits(twenty))[0])
    assert result["is_mean_trained"] > 1.05
    assert rerun["num_real"] == len(real) == 1000 and 0 <= rerun["precision_untrained"] <= 1
    # and other settings in the same folder are refused
    assert quality.main(["--model", str(tmp_path / "pipe"), "--classifier", nala_diffusion.demo_classifier_path(),
                         "--num_samples", "10", "--steps", "3", "--out", str(tmp_path / "q")]) == 2
    assert "steps: 2 -> 3" in capsys.readouterr().err


def test_quality_tool_samples_both_models_with_the_scheduler_asked_for(tmp_path, capsys):
    from diffusers import DDIMScheduler

    from nala_diffusion import NaLaDiTTransformer2DModel
    from nala_diffusion.eval import quality

    torch.manual_seed(0)
    transformer = NaLaDiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                            sample_size=32, patch_size=8, num_classes=10, norm_num_groups=1)
    NaLaDiTPipeline(transformer, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    common = ["--model", str(tmp_path / "pipe"), "--classifier", nala_diffusion.demo_classifier_path(),
              "--num_samples", "10", "--steps", "2"]
    assert quality.main(common + ["--out", str(tmp_path / "ddim")]) == 0
    assert quality.main(common + ["--scheduler", "ddpm", "--out", str(tmp_path / "ddpm")]) == 0
    assert json.loads((tmp_path / "ddim" / "quality.json").read_text())["scheduler"] == "DDIMScheduler"
    assert json.loads((tmp_path / "ddpm" / "quality.json").read_text())["scheduler"] == "DDPMScheduler"
    for model in ("trained", "untrained"):  # both models sampled by DDPM: other images from the same seeds
        first = [np.asarray(PIL.Image.open(tmp_path / run / model / "samples" / "000000.png")) for run in ("ddim", "ddpm")]
        assert (first[0] != first[1]).mean() > 0.1
    # samples of one sampler are not mixed with another's, and a flow sampler on a DDPM model is refused
    assert quality.main(common + ["--scheduler", "ddpm", "--out", str(tmp_path / "ddim")]) == 2
    assert 'scheduler: "DDIMScheduler" -> "DDPMScheduler"' in capsys.readouterr().err
    assert quality.main(common + ["--scheduler", "flow_euler", "--out", str(tmp_path / "flow")]) == 2
    assert "FlowMatchEulerDiscreteScheduler" in capsys.readouterr().err


def test_shipped_demo_pipeline_loads_and_samples():
    pipe = NaLaDiTPipeline.from_pretrained(nala_diffusion.demo_pipeline_path())
    assert pipe.num_classes == 10 and pipe.labels["cat"] == 1
    images = pipe(["cat", "rocket"], num_inference_steps=4, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_main_command_writes_a_grid_from_any_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nala_diffusion.pipelines.sample", "--steps", "4", "--out", "grid.png"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.size == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2)  # 10 classes, 8 per row, 2-px padding


@pytest.mark.slow
def test_shipped_demo_samples_are_recognised_by_the_classifier():
    """A small-sample check of the shipped model's class accuracy at its recorded sampler settings."""
    pipe = NaLaDiTPipeline.from_pretrained(nala_diffusion.demo_pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling_settings() == {"num_inference_steps": 25, "guidance_scale": 2.0}
    labels = [c for c in range(10) for _ in range(3)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
    images = pipe(labels, generator=generators, output_type="pt").images
    classifier = DomainClassifier.from_pretrained(nala_diffusion.demo_classifier_path()).eval()
    with torch.no_grad():
        predictions = classifier((images * 255).round() / 255).argmax(-1)  # as the PNGs hold them
    assert (predictions == torch.tensor(labels)).float().mean().item() >= 0.8


def test_quality_tool_on_a_latent_pipeline_with_a_vae(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler

    from nala_diffusion import NaLaDiTTransformer2DModel
    from nala_diffusion.eval import quality

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=32).eval()
    transformer = NaLaDiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            sample_size=16, patch_size=4, num_classes=10, norm_num_groups=1)
    NaLaDiTPipeline(transformer, DDIMScheduler(), vae=vae).save_pretrained(tmp_path / "pipe")
    assert quality.main(["--model", str(tmp_path / "pipe"), "--classifier", nala_diffusion.demo_classifier_path(),
                         "--num_samples", "10", "--steps", "2", "--out", str(tmp_path / "q")]) == 0
    result = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert result["fid_trained"] > 0 and result["num_real"] == 1000
    image = PIL.Image.open(tmp_path / "q" / "trained" / "samples" / "000000.png")
    assert image.size == (32, 32)  # pixels: 16 latent x the VAE's factor 2, the real crops' size
    assert PIL.Image.open(next((tmp_path / "q" / "real").rglob("*.png"))).size == (32, 32)
