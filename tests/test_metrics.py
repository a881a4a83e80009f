"""Inception Score, precision/recall and sFID: the formulas against independent computations, and
nala-fid's suite on the domain classifier and on a stand-in TorchScript Inception of the real one's layout."""

import json
from collections import OrderedDict

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_nala
from scipy import linalg
from torch import nn

from nala_diffusion import DomainClassifier, NaLaDiTPipeline
from nala_diffusion.eval.fid import cli
from nala_diffusion.metrics import features, scores


def independent_inception_score(logits, splits=10):
    """Salimans et al.'s formula, written out: splits [i N / splits, (i + 1) N / splits), exp of the mean
    KL, on the samples in torch-fidelity's fixed pseudo-random order (seed 2020)."""
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits[np.random.RandomState(2020).permutation(len(logits))]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    per_split = []
    n = len(probs)
    for part in (probs[i * n // splits:(i + 1) * n // splits] for i in range(splits)):
        marginal = part.mean(0, keepdims=True)
        per_split.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(marginal)), 1))))
    return float(np.mean(per_split)), float(np.std(per_split))


def brute_force_precision_recall(generated, reference, k=3):
    def radii(x):  # distance to the k-th nearest other point
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    cross = np.linalg.norm(generated[:, None] - reference[None], axis=-1)  # (N, M)
    precision = np.mean([(cross[i] <= radii(reference)).any() for i in range(len(generated))])
    recall = np.mean([(cross[:, j] <= radii(generated)).any() for j in range(len(reference))])
    return precision, recall


def test_inception_score_equals_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(203, 30)) * 3  # not a multiple of the 10 splits
    mean, std = scores.inception_score(logits)
    expected_mean, expected_std = independent_inception_score(logits)
    assert mean == pytest.approx(expected_mean, abs=1e-6) and std == pytest.approx(expected_std, abs=1e-6)
    # confident, diverse predictions score near the class count; one class for all scores 1
    assert scores.inception_score(np.eye(10)[np.arange(10000) % 10] * 50)[0] == pytest.approx(10, rel=0.01)
    assert scores.inception_score(np.tile(np.eye(10)[0] * 50, (300, 1)))[0] == pytest.approx(1.0, abs=1e-6)
    # samples sorted by class (a folder of real images) score as the same samples in random order
    classes = np.eye(10)[np.arange(10000) // 1000] * 50
    assert scores.inception_score(classes)[0] == pytest.approx(10, rel=0.01)
    with pytest.raises(ValueError, match="at least 20 samples"):  # 2 a split: with 1, every split scores 1
        scores.inception_score(logits[:19])


@pytest.mark.parametrize("block_rows", [7, 1000])
def test_precision_recall_equal_a_brute_force_knn(block_rows):
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(70, 6))
    generated = rng.normal(size=(50, 6)) * 1.3 + 0.4
    got = scores.precision_recall(generated, reference, block_rows=block_rows)
    expected = brute_force_precision_recall(generated.astype(np.float32).astype(np.float64),
                                            reference.astype(np.float32).astype(np.float64))
    assert got == pytest.approx(expected, abs=1e-6)  # shares of 50 and 70 samples, computed in float32
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # a case where both are informative
    assert scores.precision_recall(reference, reference) == (1.0, 1.0)
    with pytest.raises(ValueError, match="feature sizes differ"):
        scores.precision_recall(generated, reference[:, :5])


# -- a TorchScript network with the layout of clean-fid's inception-2015-12-05.pt ------------------
class Mixed6(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 9, 1)
        self.tower = nn.Conv2d(channels, 3, 1)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], dim=1)


class StandInInception(nn.Module):
    """conv .. mixed_10 and pool2 under ``layers``, a 2048 -> 1008 ``output`` layer; 299 x 299 input."""

    def __init__(self):
        super().__init__()
        c = 6
        names = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"] + [f"mixed_{i}" if i else "mixed"
                                                                                   for i in range(6)]
        blocks = OrderedDict()
        for name in names:
            if name.startswith("pool"):
                blocks[name] = nn.MaxPool2d(2)
            else:  # 299 -> 50 at conv, 25 and 12 at the pools: a 12 x 12 mixed_6 (17 x 17 in the real one)
                blocks[name] = nn.Sequential(nn.Conv2d(3 if name == "conv" else c, c, 3, stride=6 if name == "conv" else 1,
                                                       padding=1), nn.ReLU())
        blocks["mixed_6"] = Mixed6(c)
        blocks["mixed_7"] = nn.Conv2d(12, 2048, 1)
        blocks["pool2"] = nn.AdaptiveAvgPool2d(1)
        self.layers = nn.Sequential(blocks)
        self.output = nn.Linear(2048, 1008)

    def forward(self, x, return_features: bool = False):
        pooled = self.layers((x - 128) / 128).flatten(1)
        return pooled if return_features else torch.softmax(self.output(pooled), dim=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    network = StandInInception().eval()
    (root / "inception").mkdir()
    torch.jit.script(network).save(str(root / "inception" / features.TORCHSCRIPT_WEIGHTS))
    torch.manual_seed(0)
    DomainClassifier(num_classes=3, image_size=16, widths=(8, 16)).save_pretrained(root / "classifier")
    NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler()).save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    for name, shift in (("real", 0), ("other", 60)):
        (root / name).mkdir()
        for i in range(24):
            pixels = np.clip(rng.random((16, 16, 3)) * 180 + shift, 0, 255).astype("uint8")
            PIL.Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root, network


def folder_array(folder):
    return np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def test_inception_suite_uses_the_output_layer_without_bias_and_mixed_6_conv(assets, tmp_path):
    root, network = assets
    weights = ["--inception_weights", str(root / "inception" / features.TORCHSCRIPT_WEIGHTS)]
    out = tmp_path / "all.json"
    # (FID itself is left out: the square root of a 2048 x 2048 covariance is slow, and unchanged here)
    assert cli(["compare", str(root / "other"), str(root / "real"), *weights, "--metrics", "kid", "is", "pr",
                "sfid", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"] == ["kid", "is", "pr", "sfid"] and result["num_samples"] == 24
    assert "fid" not in result
    # independent: the stand-in network run by hand on clean-fid's resized inputs
    extractor = features.inception_extractor("clean", torch.device("cpu"), weights[1])
    resize = features.ArrayImages(folder_array(root / "other"), "clean")
    batch = torch.stack([resize[i] for i in range(len(resize))])  # (24, 3, 299, 299) in [0, 255]
    with torch.no_grad():
        pooled = network.layers((batch - 128) / 128).flatten(1).double()
        logits = pooled @ network.output.weight.double().T  # no bias
        spatial = network.layers[:13]((batch - 128) / 128)
        spatial = network.layers.mixed_6.conv(spatial)[:, :7].flatten(1).double().numpy()
    assert result["is_mean"] == pytest.approx(independent_inception_score(logits.numpy())[0], rel=1e-6)
    real = features.folder_features(str(root / "real"), extractor, "cpu", verbose=False, spatial=True)
    mu, sigma = np.mean(spatial, 0), np.cov(spatial, rowvar=False)
    mu_r, sigma_r = np.mean(real[1], 0), np.cov(real[1], rowvar=False)
    covmean = linalg.sqrtm(sigma @ sigma_r).real
    sfid = float(np.sum((mu - mu_r) ** 2) + np.trace(sigma + sigma_r - 2 * covmean))
    assert result["sfid"] == pytest.approx(sfid, rel=1e-4)
    assert (result["precision"], result["recall"]) == pytest.approx(
        brute_force_precision_recall(pooled.float().double().numpy(), real[0].astype(np.float32).astype(np.float64)))
    # legacy_pytorch has no class layer, other modes no sFID: refused before any feature is computed
    assert cli(["compare", str(root / "other"), str(root / "real"), *weights, "--mode", "legacy_tensorflow",
                "--metrics", "sfid"]) == 2


def test_domain_classifier_suite_and_evaluator_batches(assets, tmp_path, capsys):
    root, _ = assets
    classifier = ["--feature_extractor", str(root / "classifier")]
    folder_json, batch_json = tmp_path / "folder.json", tmp_path / "batch.json"
    assert cli(["compare", str(root / "other"), str(root / "real"), *classifier, "--metrics", "fid", "kid", "is", "pr",
                "--json", str(folder_json)]) == 0
    printed = capsys.readouterr().out
    by_folder = json.loads(folder_json.read_text())
    for key, label in (("fid", "FID"), ("precision", "precision"), ("recall", "recall"), ("is_mean", "IS")):
        assert f"{label} {by_folder[key]:.4f}" in printed  # the summary shows what the JSON holds
    # IS from the classifier's own logits
    model = DomainClassifier.from_pretrained(root / "classifier").eval()
    images = torch.from_numpy(folder_array(root / "other")).permute(0, 3, 1, 2).float()
    extractor = features.classifier_extractor(str(root / "classifier"), torch.device("cpu"))
    feats = features.folder_features(str(root / "other"), extractor, "cpu", verbose=False)
    weight, bias = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    logits = feats @ weight.T + bias  # the classifier's head, in float64
    assert by_folder["is_mean"] == pytest.approx(independent_inception_score(logits)[0], rel=1e-6)
    assert images.shape[0] == by_folder["num_samples"] == 24

    # the guided-diffusion evaluator's layout: images under arr_0 give what the folder gives
    np.savez(tmp_path / "VIRTUAL_real.npz", arr_0=folder_array(root / "real"))
    assert cli(["compare", str(root / "other"), str(tmp_path / "VIRTUAL_real.npz"), *classifier, "--metrics", "fid",
                "kid", "is", "pr", "--json", str(batch_json)]) == 0
    by_batch = json.loads(batch_json.read_text())
    for key in ("fid", "kid", "is_mean", "precision", "recall"):
        assert by_batch[key] == pytest.approx(by_folder[key], rel=1e-9, abs=1e-12), key
    assert by_batch["reference_kind"] == "evaluator images"

    # statistics without features allow FID only, and say so before sampling anything
    stats = tmp_path / "real.npz"
    assert cli(["ref", "--images", str(root / "real"), "--out", str(stats), *classifier]) == 0
    assert "allows --metrics fid is" in capsys.readouterr().out
    out = tmp_path / "calc"
    code = cli(["calc", "--model", str(root / "pipe"), "--num_samples", "12", "--out", str(out), "--steps", "2",
                "--ref", str(stats), *classifier, "--metrics", "fid", "pr"])
    error = capsys.readouterr().err
    assert code == 2 and "--metrics pr need(s) its features" in error and "allows fid is" in error
    assert not (out / "samples").exists()
    # kept features allow everything but sFID; a count too small is refused before sampling
    assert cli(["ref", "--images", str(root / "real"), "--out", str(stats), *classifier, "--metrics", "fid", "pr"]) == 0
    code = cli(["calc", "--model", str(root / "pipe"), "--num_samples", "1", "--out", str(out), "--steps", "2",
                "--ref", str(stats), *classifier])
    assert code == 2 and "needs at least 2 samples, got 1" in capsys.readouterr().err and not (out / "samples").exists()
    assert cli(["calc", "--model", str(root / "pipe"), "--num_samples", "20", "--out", str(out), "--steps", "2",
                "--ref", str(stats), *classifier, "--metrics", "fid", "kid", "is", "pr"]) == 0
    result = json.loads((out / "fid.json").read_text())
    assert {"fid", "kid", "is_mean", "is_std", "precision", "recall"} <= set(result)
    assert result["num_samples"] == 20 and result["num_reference"] == 24 and result["is_num_samples"] == 20
    code = cli(["calc", "--model", str(root / "pipe"), "--num_samples", "12", "--out", str(out), "--steps", "2",
                "--ref", str(stats), *classifier, "--metrics", "sfid"])
    assert code == 2 and "a domain classifier has none" in capsys.readouterr().err


def test_without_the_inception_file_is_fails_as_fid_does(assets, tmp_path, capsys):
    root, _ = assets
    messages = []
    for metric in ("fid", "is"):
        assert cli(["compare", str(root / "other"), str(root / "real"), "--metrics", metric,
                    "--inception_weights", str(tmp_path / "nowhere" / features.TORCHSCRIPT_WEIGHTS)]) == 2
        messages.append(capsys.readouterr().err)
    assert messages[0] == messages[1] and "inception-2015-12-05.pt" in messages[1]
