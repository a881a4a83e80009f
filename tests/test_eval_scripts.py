"""The benchmark and entropy scripts run on tiny sizes and write valid JSON and PNG (no timing asserted)."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_nala

from nala_diffusion import NaLaDiTPipeline
from nala_diffusion.eval import attention_entropy, benchmark, timing
from nala_diffusion.eval.studies.norm import NORM_VARIANTS
from nala_diffusion.eval.studies.quality import VARIANTS
from nala_diffusion.eval.studies.retrieval import COST_TOKENS, RETRIEVAL_DEFAULT_KINDS
from nala_diffusion.models.norm_awareness import capture_queries


@pytest.mark.slow
def test_benchmark_writes_json_and_plot(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main(["--tokens", "16", "64", "--repeats", "1", "--preset", "S/8", "--model_tokens", "16",
                           "--train_tokens", "4", "--train_batch", "2", "--diffusers_tokens", "16", "--memory_tokens", "16",
                           "--hybrid_tokens", "16", "64", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["op_level"]) == set(benchmark.KERNELS)
    for name, rows in results["op_level"].items():
        assert rows["64"]["seconds"] > 0, name
        assert rows["64"]["peak_bytes"] is None if name in benchmark.COMPILED else rows["64"]["peak_bytes"] > 0, name
    # the ratios are against the four baselines, and the memory probe sees what each kernel holds:
    # plain attention's scores grow with the square of the tokens, NaLa's state does not
    assert {k for k in results["op_level"]["nala"]["64"] if k.startswith("time_vs_")} == {
        "time_vs_sdpa", "time_vs_relu_linear", "time_vs_relu_linear_sana", "time_vs_nala_explicit"}
    growth = {k: results["op_level"][k]["64"]["peak_bytes"] / results["op_level"][k]["16"]["peak_bytes"]
              for k in ("plain", "nala")}
    assert growth["plain"] > 2 * growth["nala"], growth
    floor = results["matmul_floor"]
    assert floor["tokens"] == 64 and floor["nala_gather_vs_relu_linear"] == pytest.approx(
        floor["nala_gather"]["seconds"] / floor["relu_linear"]["seconds"])
    assert {"forward", "forward_backward"} <= set(results["model_level"])
    assert PIL.Image.open(out / "benchmark.png").size[0] > 100
    hybrid = results["hybrid_level"]["16"]
    assert hybrid["softmax_layers"] == [-1]
    assert hybrid["nala"]["softmax_block_peak_bytes"] is None and hybrid["softmax"]["nala_block_peak_bytes"] is None
    assert len(hybrid["hybrid"]["block_peak_bytes"]) == 12 and hybrid["hybrid"]["softmax_block_peak_bytes"] > 0
    assert hybrid["hybrid_vs_nala"]["time"] == pytest.approx(hybrid["hybrid"]["seconds"] / hybrid["nala"]["seconds"])


def test_benchmark_sections_choose_what_runs(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main(["--sections", "hybrid", "--hybrid_tokens", "16", "--repeats", "1", "--preset", "S/8",
                           "--hybrid_softmax_layers", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "op_level" not in results and "model_level" not in results
    row = results["hybrid_level"]["16"]
    assert row["softmax_layers"] == [0] and all(row[kind]["seconds"] > 0 for kind in benchmark.HYBRID_KINDS)


def test_block_peaks_find_the_block_that_holds_the_scores():
    # positive control: diffusers' plain AttnProcessor in the softmax block materialises heads x N x N
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_nala(sample_size=64, num_layers=3, attention_types=["nala", "softmax", "nala"])
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor())
    x, t, y = torch.randn(1, 3, 64, 64), torch.tensor([500]), torch.tensor([1])
    tokens = 32 * 32
    with torch.no_grad():
        peaks = timing.BlockPeaks(model, torch.device("cpu"))(lambda: model(x, timestep=t, class_labels=y))
    assert peaks.blocks[1] >= 2 * tokens * tokens * 4  # 2 heads of float32 scores
    assert max(peaks.blocks[0], peaks.blocks[2]) < tokens * tokens * 4
    assert peaks.peak >= peaks.blocks[1]


def test_sana_linear_baseline_is_relu_linear_attention():
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    torch.testing.assert_close(benchmark.sana_linear(q, k, v), benchmark.KERNELS["relu_linear"](q, k, v),
                               rtol=1e-4, atol=1e-5)


def test_peak_bytes_sees_the_score_matrix():
    q = torch.randn(1, 1, 512, 8)
    with torch.no_grad():
        plain = timing.peak_memory(lambda: benchmark.KERNELS["plain"](q, q, q), torch.device("cpu"))
        nala = timing.peak_memory(lambda: benchmark.KERNELS["nala"](q, q, q), torch.device("cpu"))
    assert plain >= 512 * 512 * 4 > nala


def test_entropy_on_random_inputs(tmp_path):
    path = tmp_path / "entropy.json"
    assert attention_entropy.main(["--random", "--tokens", "256", "--heads", "2", "--json", str(path),
                                   "--plot", str(tmp_path / "entropy.png")]) == 0
    result = json.loads(path.read_text())
    assert set(result) == {"softmax", "relu_linear", "elu_linear", "nala", "norm_cancelling"}
    assert result["softmax"]["spearman"] < -0.4 and result["nala"]["spearman"] < -0.4
    assert abs(result["relu_linear"]["spearman"]) < 0.15 and abs(result["norm_cancelling"]["spearman"]) < 0.1
    assert result["nala"]["mean_entropy"] < result["relu_linear"]["mean_entropy"]
    assert PIL.Image.open(tmp_path / "entropy.png").size[0] > 100


def test_entropy_of_a_model_per_layer(tmp_path):
    NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=2), DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        PIL.Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(tmp_path / "data" / f"c{c}" / "a.png")
    path = tmp_path / "layers.json"
    assert attention_entropy.main(["--model", str(tmp_path / "pipe"), "--data", str(tmp_path / "data"),
                                   "--json", str(path), "--plot", str(tmp_path / "layers.png")]) == 0
    result = json.loads(path.read_text())
    layers = result["layers"]
    assert sorted(layers) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(set(v) == set(attention_entropy.KINDS) for v in layers.values())
    assert sorted(result["saturation"]) == sorted(layers)  # every NaLa layer gets a saturation report
    assert all(0 <= s["responding_fraction"] <= 1 for s in result["saturation"].values())
    assert set(result["kernels"].values()) == {"nala"}

    # a hybrid: each layer names its own kernel, and only NaLa layers get a saturation report
    hybrid = tiny_nala(sample_size=16, num_classes=2, attention_types=["nala", "softmax"])
    NaLaDiTPipeline(hybrid, DDIMScheduler()).save_pretrained(tmp_path / "hybrid")
    assert attention_entropy.main(["--model", str(tmp_path / "hybrid"), "--data", str(tmp_path / "data"),
                                   "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["kernels"] == {"transformer_blocks.0.attn1": "nala", "transformer_blocks.1.attn1": "softmax"}
    assert sorted(result["saturation"]) == ["transformer_blocks.0.attn1"]


def test_entropy_of_a_softmax_layer_with_rope_is_that_of_the_weights_it_applies(tmp_path):
    from nala_diffusion.models.norm_awareness import applied_attention_weights
    from nala_diffusion.ops.attention_weights import attention_weights, entropy

    model = tiny_nala(sample_size=16, num_classes=2, attention_types=["nala", "softmax"], use_rope=True)
    NaLaDiTPipeline(model, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        PIL.Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(tmp_path / "data" / f"c{c}" / "a.png")
    layers = {name: (q, k) for name, q, k, *_ in
              attention_entropy.model_layers(str(tmp_path / "pipe"), str(tmp_path / "data"), [500], 2, 0)}
    noisy, steps, labels = attention_entropy.noised_batch(NaLaDiTPipeline.from_pretrained(tmp_path / "pipe"),
                                                          str(tmp_path / "data"), [500], images=2, seed=0)
    with capture_queries(model, keys=True) as captured, torch.no_grad():
        model(noisy, timestep=steps, class_labels=labels)
    grid = (noisy.shape[-2] // model.config.patch_size,) * 2
    softmax, nala = "transformer_blocks.1.attn1", "transformer_blocks.0.attn1"
    q, k = layers[softmax]
    applied = applied_attention_weights(model.get_submodule(softmax).processor, captured[softmax]["query"],
                                        captured[softmax]["key"], grid)
    # the entropy reported for the softmax layer is that of the weights it applies, RoPE included
    torch.testing.assert_close(entropy(attention_weights("softmax", q, k)), entropy(applied), atol=1e-5, rtol=1e-5)
    unrotated = entropy(attention_weights("softmax", captured[softmax]["query"], captured[softmax]["key"]))
    assert not torch.allclose(unrotated, entropy(applied), atol=1e-3)  # reading the captured pair would be wrong
    # NaLa rotates its numerator only: its distribution is built from the unrotated pair
    torch.testing.assert_close(layers[nala][0], captured[nala]["query"])


@pytest.mark.slow
def test_study_runs_every_stage_on_a_tiny_budget_and_resumes(tmp_path, capsys):
    from nala_diffusion.eval import study

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 8,
                                  "norm_num_groups": 1, "use_lepe": True}))
    argv = ["--out", str(tmp_path / "study"), "--steps", "5", "--seeds", "0", "--batch_size", "4",
            "--num_samples", "20", "--sample_steps", "2", "--highres_samples", "1", "--crops_per_image", "3",
            "--model_config", str(config)]
    assert study.main(argv) == 0
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert set(results["scratch"]) == set(VARIANTS)
    for runs in results["scratch"].values():
        run = runs[0]
        assert 0 <= run["class_accuracy"] <= 1 and run["fid"] > 0 and run["heldout_loss"] > 0 and run["seconds_per_step"] > 0
        assert 0 <= run["precision"] <= 1 and 0 <= run["recall"] <= 1 and 1 <= run["is_mean"] <= 10
    assert results["conversion"]["nala_from_softmax"]["steps"] == 1
    assert [(r["side"], r["mode"]) for r in results["highres"]["nala_relu_split"]] == [
        (64, "direct"), (64, "progressive"), (128, "direct"), (128, "progressive")]
    assert all(len(layers) == 1 for layers in results["entropy"].values())
    table = (tmp_path / "study" / "results.md").read_text()
    assert "| nala_cosine | 1 |" in table and "convert" not in table.split("| conversion")[0]
    assert "| IS | precision | recall |" in table
    # a rerun reuses every finished stage
    before = {p: p.stat().st_mtime for p in (tmp_path / "study" / "scores").iterdir()}
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime for p in (tmp_path / "study" / "scores").iterdir()} == before
    # other settings in the same folder are refused, naming them, not mixed with these results
    changed = [*argv[:argv.index("--steps") + 1], "6", *argv[argv.index("--steps") + 2:]]
    assert study.main(changed) == 2
    assert "steps: 5 -> 6" in capsys.readouterr().err
    assert {p: p.stat().st_mtime for p in (tmp_path / "study" / "scores").iterdir()} == before


@pytest.mark.slow
def test_norm_study_runs_on_a_tiny_budget(tmp_path):
    from nala_diffusion.eval import study

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 8,
                                  "norm_num_groups": 1, "use_lepe": True}))
    argv = ["--study", "norm", "--out", str(tmp_path / "study"), "--steps", "3", "--seeds", "0", "--batch_size", "4",
            "--num_samples", "10", "--sample_steps", "2", "--model_config", str(config)]
    assert study.main(argv) == 0
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert set(results["scratch"]) == set(NORM_VARIANTS) == set(results["entropy"])
    layer = "transformer_blocks.0.attn1"
    assert "saturation" not in results["entropy"]["softmax"][0][layer]
    official = results["entropy"]["nala_sigma1"][0][layer]["saturation"]
    calibrated = results["entropy"]["nala_calibrated"][0][layer]["saturation"]
    assert calibrated["responding_fraction"] > official["responding_fraction"]
    assert "| nala_learnable | block 0 |" in (tmp_path / "study" / "results.md").read_text()


@pytest.mark.slow
def test_highres_study_scores_every_setting(tmp_path):
    from nala_diffusion.eval import study

    pipe = NaLaDiTPipeline(tiny_nala(sample_size=32, patch_size=8, num_classes=10), DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    argv = ["--study", "highres", "--out", str(tmp_path / "study"), "--highres_models", f"tiny={tmp_path / 'pipe'}",
            "--highres_samples", "2", "--crops_per_image", "2", "--sample_steps", "2"]
    assert study.main(argv) == 0
    rows = json.loads((tmp_path / "study" / "results.json").read_text())["highres"]["tiny"]
    assert [(r["side"], r["mode"], r["sharpness"]) for r in rows] == [(32, "direct", "off")] + [
        (s, m, h) for s in (64, 128) for m in ("direct", "progressive") for h in ("off", "auto")]
    assert all(0 <= r["crop_accuracy"] <= 1 and r["crop_fid"] > 0 and r["seconds_per_image"] > 0 for r in rows)
    assert all(0 <= r["crop_precision"] <= 1 and 0 <= r["crop_recall"] <= 1 for r in rows)  # the suite beside FID
    assert all(len(r["attention_sharpness"]) == 2 for r in rows if r["sharpness"] == "auto")
    # named by the model's NAME and weights hash
    assert len(list((tmp_path / "study" / "highres").glob("tiny_*/4x_progressive_auto.png"))) == 1


@pytest.mark.slow
def test_retrieval_study_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from nala_diffusion.eval import study

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2,
                                  "norm_num_groups": 1}))
    argv = ["--study", "retrieval", "--out", str(tmp_path / "study"), "--steps", "3", "--seeds", "0",
            "--batch_size", "4", "--retrieval_images", "6", "--model_config", str(config)]
    assert study.main(argv) == 0
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert list(results["runs"]) == RETRIEVAL_DEFAULT_KINDS
    for kind, runs in results["runs"].items():
        run = runs[0]
        assert set(run["gain"]["gain"]) == {"50", "100", "250"} and len(run["mass"]) == 2
        assert run["seconds_per_step"] > 0
        kinds = [layer["kind"] for layer in run["mass"].values()]
        assert kinds[-1] == ("softmax" if kind.startswith("hybrid") or kind == "softmax" else kinds[0])
        # the causal norm measure: 0 for ReLU linear attention, but for the readout's eps (the weights are the applied ones)
        assert all(abs(layer["norm_effect"]) < 1e-3 for layer in run["mass"].values() if layer["kind"] == "relu_linear")
        train_args = json.loads((tmp_path / "study" / "runs" / f"retrieval_{kind}_s0" / "args.json").read_text())
        assert train_args["timestep_range"] == [0, 500]  # the calibrated task's training noise levels
    table = (tmp_path / "study" / "results.md").read_text()
    assert "| nala_calibrated | 1 |" in table and "share of the ReLU → softmax gap" in table
    # every kind's forward time at 16k tokens, measured in one run, beside its quality
    seconds = results["forward_cost"]["seconds"]
    assert set(seconds) == set(RETRIEVAL_DEFAULT_KINDS) and all(v > 0 for v in seconds.values())
    assert results["forward_cost"]["tokens"] == COST_TOKENS
    assert "(the partner token;" in table and results["layout"] == "tiles"
    # more seeds or fewer kinds extend the study: the finished run is reused, not retrained
    finished = tmp_path / "study" / "runs" / "retrieval_softmax_s0" / "study_run.json"
    before = finished.stat().st_mtime_ns
    extend = [a for a in argv if a not in ("--seeds", "0")] + ["--seeds", "0", "1", "--kinds", "softmax"]
    assert study.main(extend) == 0
    assert finished.stat().st_mtime_ns == before
    assert [r["seed"] for r in json.loads((tmp_path / "study" / "results.json").read_text())["runs"]["softmax"]] == [0, 1]
    # any other setting is still refused
    assert study.main([*argv, "--pairs_layout", "crops"]) == 2
    assert (tmp_path / "study" / "retrieval_gain.png").exists()


def test_entropy_inputs_of_a_latent_model_are_latents_of_its_size_noised_by_its_schedule(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=32).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear")
    pipe = NaLaDiTPipeline(tiny_nala(in_channels=4, num_classes=2), scheduler, vae=vae)  # 8 x 8 latents, 16 px
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        PIL.Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(tmp_path / "data" / f"c{c}" / "a.png")
    noisy, steps, labels = attention_entropy.noised_batch(pipe, str(tmp_path / "data"), [999], images=2, seed=0)
    assert noisy.shape == (2, 4, 8, 8)  # the model's own latent grid (a doubled VAE factor gave 16 x 16)
    from nala_diffusion.data.datasets import load_dataset

    images = torch.stack([load_dataset(str(tmp_path / "data"), 16, split="test")[i][0] for i in range(2)])
    with torch.no_grad():
        x0 = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    alpha_bar = scheduler.alphas_cumprod[999]
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    # the whole tool on that pipeline: per-layer entropies and the saturation report
    pipe.save_pretrained(tmp_path / "latent_pipe")
    path = tmp_path / "latent.json"
    assert attention_entropy.main(["--model", str(tmp_path / "latent_pipe"), "--data", str(tmp_path / "data"),
                                   "--images", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert sorted(result["saturation"]) == sorted(result["layers"]) == ["transformer_blocks.0.attn1",
                                                                      "transformer_blocks.1.attn1"]


def test_highres_study_results_are_keyed_by_name_and_weights(tmp_path, monkeypatch):
    from nala_diffusion.eval.studies import highres as study

    monkeypatch.setattr(study, "_highres", lambda run, *args: [{"folder": run}])
    folders = {}
    for parent, seed in (("a", 0), ("b", 1)):  # two models in folders both named "pipe"
        folders[parent] = str(tmp_path / parent / "pipe")
        NaLaDiTPipeline(tiny_nala(seed=seed, sample_size=16, num_classes=2), DDIMScheduler()).save_pretrained(folders[parent])
    out = str(tmp_path / "study")
    first = study.highres(folders["a"], out, None, None, None, name="nala")
    second = study.highres(folders["b"], out, None, None, None, name="other")
    assert (first[0]["folder"], second[0]["folder"]) == (folders["a"], folders["b"])
    # the same NAME with other weights is another result too
    assert study.highres(folders["b"], out, None, None, None, name="nala")[0]["folder"] == folders["b"]
    assert study.highres(folders["a"], out, None, None, None, name="nala")[0]["folder"] == folders["a"]  # cached


def test_a_study_folder_is_known_by_its_architecture_not_by_the_path_of_its_model_config(tmp_path, capsys):
    from nala_diffusion.eval import study

    architecture = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 8,
                    "norm_num_groups": 1, "use_lepe": True}
    first, moved = tmp_path / "first.json", tmp_path / "elsewhere" / "model_config.json"
    moved.parent.mkdir()
    first.write_text(json.dumps(architecture))
    moved.write_text(json.dumps(architecture))
    out = tmp_path / "study"

    def report(config):
        return study.main(["--study", "retrieval", "--out", str(out), "--report_only", "--model_config", str(config)])

    assert report(first) == 2 and "no finished retrieval runs" in capsys.readouterr().err
    (out / "runs").mkdir()  # outputs made under the first fingerprint, to protect
    assert report(moved) == 2 and "no finished retrieval runs" in capsys.readouterr().err  # same settings
    moved.write_text(json.dumps({**architecture, "patch_size": 4}))
    assert report(moved) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "architecture" in error and "model_config" not in error


def test_the_gpu_section_needs_cuda_or_a_dry_run(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the section would measure it")
    assert "gpu" not in benchmark.DEFAULT_SECTIONS and "compile_sana" not in benchmark.DEFAULT_SECTIONS
    assert benchmark.main(["--sections", "gpu", "--out", str(tmp_path / "gpu")]) == 2
    assert "measures a CUDA device" in capsys.readouterr().err


@pytest.mark.slow  # torch.compile in this process: later eager runs of the default set may round differently
def test_compile_sana_times_all_four(tmp_path):
    out = tmp_path / "sana"
    assert benchmark.main(["--sections", "compile_sana", "--sana_tokens", "16", "--repeats", "1", "--preset", "S/8",
                           "--diffusers_layers", "1", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["compiled_against_sana"]["16"]
    assert set(row["seconds"]) == {"nala_eager", "sana_eager", "nala_compiled", "sana_compiled"}
    assert row["nala_vs_sana_compiled"] == pytest.approx(row["seconds"]["nala_compiled"] / row["seconds"]["sana_compiled"])


@pytest.mark.slow
def test_the_gpu_sections_dry_run_starts_every_part(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "nala_diffusion.eval.benchmark", "--sections", "gpu", "--dry_run",
                             "--out", str(tmp_path / "dry")], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    gpu = json.loads((tmp_path / "dry" / "results.json").read_text())["gpu"]
    assert gpu["dry_run"] and gpu["started"] == ["checks", "readout", "models"] and gpu["checks"]["triton_checks"] == 0
