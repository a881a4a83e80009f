"""Flow matching: the objective's formulas against diffusers' own, nala-train --objective flow end to end
(saved scheduler, sampling, exact resume, the refused mixtures), and a SiT checkpoint as --init_from."""

import json
from pathlib import Path

import numpy as np
import pytest
import test_train
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file
from sit_reference import random_sit
from test_train import base_args, train

from nala_diffusion import NaLaDiTPipeline
from nala_diffusion.diffusion.objectives import model_timestep, to_scheduler_velocity, training_objective

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train" / "train_nala_dit.py")
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2, norm_num_groups=1)


data = test_train.data  # the training tests' image folder, as a fixture here too


def args_for(data, out, steps=4, **extra):
    return base_args(data, out, steps=steps, checkpointing_steps=2, **extra)


def test_flow_objective_is_diffusers_flow_path():
    objective = training_objective({"objective": "flow"}, weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.7)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    sigmas = objective.draw(6, torch.Generator().manual_seed(0), "cpu")
    # the density is diffusers' compute_density_for_timestep_sampling, drawn from the same generator
    expected = compute_density_for_timestep_sampling("logit_normal", 6, logit_mean=0.3, logit_std=0.7,
                                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigmas, expected)
    noisy, timesteps = objective.noised(x0, noise, sigmas)
    scheduler = FlowMatchEulerDiscreteScheduler()
    for i in range(6):  # scale_noise looks sigma up by timestep: compare one image at a time
        scheduler.set_timesteps(sigmas=[float(sigmas[i])])
        reference = scheduler.scale_noise(x0[i: i + 1], scheduler.timesteps[:1], noise[i: i + 1])
        torch.testing.assert_close(noisy[i: i + 1], reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    torch.testing.assert_close(objective.target(x0, noise, sigmas), noise - x0)
    # SiT's convention: time 1 - sigma, velocity x0 - noise; the pipelines' translation undoes both
    sit = training_objective({"objective": "flow", "flow_convention": "sit"})
    _, sit_time = sit.noised(x0, noise, sigmas)
    torch.testing.assert_close(sit_time, 1 - sigmas)
    torch.testing.assert_close(sit.target(x0, noise, sigmas), x0 - noise)
    config = {"objective": "flow", "flow_convention": "sit"}
    torch.testing.assert_close(model_timestep(config, sigmas * 1000), 1 - sigmas)
    torch.testing.assert_close(to_scheduler_velocity(config, x0 - noise), noise - x0)
    # a timestep range is a sigma range for flow: [LOW, HIGH) / 1000
    ranged = training_objective({"objective": "flow"}, timestep_range=(0, 500)).draw(
        1000, torch.Generator().manual_seed(1), "cpu")
    assert 0 <= ranged.min() and ranged.max() < 0.5 and ranged.mean() == pytest.approx(0.25, abs=0.03)


def test_ddpm_objective_draws_and_noises_as_before():
    objective = training_objective({}, timestep_range=(10, 500))
    generator, again = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    times = objective.draw(8, generator, "cpu")
    assert torch.equal(times, torch.randint(10, 500, (8,), generator=again))
    x0, noise = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    noisy, timesteps = objective.noised(x0, noise, times)
    assert torch.equal(noisy, objective.scheduler.add_noise(x0, noise, times)) and torch.equal(timesteps, times)
    assert torch.equal(objective.target(x0, noise, times), noise)


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_nala_train_objective_flow(data, tmp_path):
    out = tmp_path / "flow"
    result = train(args_for(data, out, steps=4, objective="flow", weighting_scheme="logit_normal", use_ema=True,
                            validation_steps=4, validation_inference_steps=3))
    assert "objective: flow" in result.stderr
    pipe = NaLaDiTPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.objective == "flow"
    assert (out / "samples" / "step-000004.png").exists()
    for scheduler in (pipe.scheduler, FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)):
        pipe.scheduler = scheduler
        images = pipe(["class1", "class2"], num_inference_steps=3, output_type="np",
                      generator=torch.manual_seed(0)).images
        assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 0.01
    # the objective is part of the run: resuming with another one is refused, and nothing is touched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    refused = train(args_for(data, out, steps=6, objective="ddpm", resume_from_checkpoint="latest"), check=False)
    assert refused.returncode == 2 and "model objective: checkpoint 'flow', this run 'ddpm'" in refused.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # a DDPM teacher for a flow student predicts another thing
    ddpm = tmp_path / "ddpm"
    train(args_for(data, ddpm, steps=1))
    refused = train(args_for(data, tmp_path / "mixed", steps=1, objective="flow", teacher=ddpm), check=False)
    assert refused.returncode == 2 and "trained with the 'ddpm' objective and the student trains with 'flow'" in refused.stderr


def test_flow_refuses_ddpm_only_options(data, tmp_path):
    for extra, message in (({"variance_loss": "vlb"}, "--variance_loss vlb is DDPM's variational bound"),
                           ({"prediction_type": "v_prediction"}, "--prediction_type is DDPM's choice")):
        result = train(args_for(data, tmp_path / "x", objective="flow", **extra), check=False)
        assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_flow_run_resumes_exactly_and_distils_from_a_flow_teacher(data, tmp_path):
    reference, parts = tmp_path / "reference", tmp_path / "parts"
    train(args_for(data, reference, steps=4, objective="flow", weighting_scheme="mode", use_ema=True))
    train(args_for(data, parts, steps=2, objective="flow", weighting_scheme="mode", use_ema=True))
    train(args_for(data, parts, steps=4, objective="flow", weighting_scheme="mode", use_ema=True,
                   resume_from_checkpoint="latest"))
    weights = [load_file(run / "transformer" / "diffusion_pytorch_model.safetensors") for run in (reference, parts)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    student = tmp_path / "student"
    train(args_for(data, student, steps=2, objective="flow", teacher=reference, attention_type="relu_linear"))
    log = (student / "log.csv").read_text()
    assert "loss_distill" in log.splitlines()[0]


@pytest.mark.slow
def test_nala_train_init_from_a_sit_checkpoint(data, tmp_path):
    # SiT-S's width and depth (12 blocks of 384: 6 heads from SiT's size table), pixel space, 16 px, patch 8
    sit = random_sit(input_size=16, patch_size=8, in_channels=3, hidden_size=384, depth=12, num_heads=6,
                     num_classes=3, learn_sigma=True)
    checkpoint = tmp_path / "SiT-S-8.pt"
    torch.save(sit.state_dict(), checkpoint)
    out = tmp_path / "from_sit"
    result = train(args_for(data, out, steps=2, init_from=checkpoint, class_embedding="new", validation_steps=2,
                            validation_inference_steps=2))
    # the SiT itself as the teacher of its NaLa conversion (its own classes: the data's three)
    distilled = tmp_path / "distilled"
    train(args_for(data, distilled, steps=1, init_from=checkpoint, teacher=checkpoint))
    assert "loss_distill" in (distilled / "log.csv").read_text().splitlines()[0]
    assert "objective: flow" in result.stderr
    pipe = NaLaDiTPipeline.from_pretrained(out)
    config = pipe.transformer.config
    assert (config.attention_type, config.objective, config.flow_convention, config.timestep_freq_shift) == \
        ("nala", "flow", "sit", 0)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    images = pipe(["class0"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_progressive_high_resolution_renoises_on_the_flow_path(monkeypatch):
    import torch.nn.functional as F

    import nala_diffusion.pipelines.pipeline_nala_dit_highres as highres
    from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTTransformer2DModel

    model = NaLaDiTTransformer2DModel(**TINY, in_channels=3, sample_size=8, num_classes=3, objective="flow",
                                      attention_type="softmax").eval()
    pipe = NaLaDiTHighResPipeline(model, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    noises, stages = [], []
    real_randn, real_denoise = highres.randn_tensor, pipe.denoise

    def recording_randn(*args, **kwargs):
        noises.append(real_randn(*args, **kwargs))
        return noises[-1]

    def recording_denoise(latents, class_ids, timesteps, *args, **kwargs):
        out = real_denoise(latents, class_ids, timesteps, *args, **kwargs)
        stages.append((latents.clone(), timesteps.clone(), out.clone()))
        return out

    monkeypatch.setattr(highres, "randn_tensor", recording_randn)
    monkeypatch.setattr(pipe, "denoise", recording_denoise)
    pipe([1], height=16, width=16, highres_mode="progressive", num_inference_steps=4, strength=0.5,
         output_type="latent", generator=torch.manual_seed(0), guidance_scale=1.0)
    (_, _, first), (start, timesteps, _) = stages
    sigma = float(timesteps[0]) / 1000
    assert 0 < sigma < 1
    upsampled = F.interpolate(first, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(start, (1 - sigma) * upsampled + sigma * noises[-1])


@pytest.fixture(scope="module")
def flow_pipe(tmp_path_factory):
    """A tiny flow pipeline in SiT's conventions, saved, its sigma calibrated."""
    from nala_diffusion import NaLaDiTTransformer2DModel, calibrate_norm_scale

    torch.manual_seed(0)
    model = NaLaDiTTransformer2DModel(**TINY, in_channels=3, sample_size=8, num_classes=3, objective="flow",
                                      flow_convention="sit", timestep_freq_shift=0).eval()
    calibrate_norm_scale(model, torch.randn(4, 3, 8, 8), timestep=torch.rand(4), class_labels=torch.tensor([0, 1, 2, 0]))
    folder = tmp_path_factory.mktemp("flowpipe") / "pipe"
    NaLaDiTPipeline(model, FlowMatchEulerDiscreteScheduler(), id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(folder)
    return folder


def test_measurement_tools_noise_on_the_models_own_path(flow_pipe):
    from nala_diffusion.diffusion.noising import noised_copies
    from nala_diffusion.diffusion.objectives import noise_schedule_for

    pipe = NaLaDiTPipeline.from_pretrained(flow_pipe)
    config = pipe.transformer.config
    x0 = torch.randn(2, 3, 8, 8)
    scheduler = noise_schedule_for(config, pipe.scheduler)
    noisy, noise, steps = noised_copies(scheduler, x0, [100, 700], torch.Generator().manual_seed(0), config)
    torch.testing.assert_close(noisy[:2], 0.9 * x0 + 0.1 * noise[:2])
    torch.testing.assert_close(noisy[2:], 0.3 * x0 + 0.7 * noise[2:])
    torch.testing.assert_close(steps, torch.tensor([0.9, 0.9, 0.3, 0.3]))  # SiT's time, 1 - sigma
    # the resolution-aware sharpness calibration samples and noises through the same path
    report = pipe.set_resolution_sharpness("auto", 16, 16, torch.tensor([0]), num_inference_steps=2)
    assert report and all(np.isfinite(v["sharpness"]) and v["sharpness"] > 0 for v in report["layers"].values())


def test_command_line_tools_refuse_the_other_objectives_sampler(flow_pipe, tmp_path, capsys):
    from nala_diffusion.eval.fid import cli as fid_cli
    from nala_diffusion.pipelines.sample import main as sample_main

    out = tmp_path / "samples"
    assert fid_cli(["sample", "--model", str(flow_pipe), "--num_samples", "2", "--out", str(out), "--protocol", "dit"]) == 2
    assert "--protocol dit is DiT's DDPM evaluation" in capsys.readouterr().err
    assert sample_main(["--model", str(flow_pipe), "--scheduler", "ddim", "--out", str(tmp_path / "x.png")]) == 2
    assert "the scheduler DDIMScheduler samples a 'ddpm' model" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.png").exists()
    capsys.readouterr()
    assert sample_main(["--model", str(flow_pipe), "--scheduler", "flow_heun", "--steps", "2", "--labels", "a",
                        "--out", str(tmp_path / "heun.png")]) == 0
    said = capsys.readouterr().out  # the steps asked for, and what Heun evaluates, once
    assert ": 2 steps (3 model evaluations)" in said and "2 steps, guidance" in said and "3 steps" not in said
    assert fid_cli(["sample", "--model", str(flow_pipe), "--num_samples", "2", "--out", str(out), "--steps", "2"]) == 0
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["objective"] == "flow" and fingerprint["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_quality_held_out_loss_scores_a_flow_model_on_its_velocity(flow_pipe):
    from types import SimpleNamespace

    from nala_diffusion.eval.studies.quality import heldout_loss

    pipe = NaLaDiTPipeline.from_pretrained(flow_pipe)
    test = SimpleNamespace(images=torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5)),
                           labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    generator = torch.Generator().manual_seed(0)  # the draws heldout_loss makes, in its order
    t = torch.randint(0, 1000, (6,), generator=generator)
    noise = torch.randn(test.images.shape, generator=generator)
    sigma = (t.float() / 1000)[:, None, None, None]
    with torch.no_grad():  # SiT's conventions: time 1 - sigma, velocity x0 - noise
        prediction = pipe.transformer((1 - sigma) * test.images + sigma * noise, timestep=1 - t.float() / 1000,
                                      class_labels=test.labels).sample[:, :3]
    expected = float((prediction - (test.images - noise)).square().mean())
    assert heldout_loss(pipe, test) == pytest.approx(expected, rel=1e-5)


def test_objective_study_records_rebuild_their_table_and_were_trained_with_its_flags(tmp_path):
    import shutil

    from nala_diffusion.eval.studies.objective import ATTENTION, OBJECTIVE_KINDS, tables
    from nala_diffusion.eval.study import main as study_main
    from nala_diffusion.train.run_config import flags_of

    records = REPO / "docs" / "results" / "objective"
    results = json.loads((records / "results.json").read_text())
    assert set(results["runs"]) == set(OBJECTIVE_KINDS)
    for name, runs in results["runs"].items():
        assert [run["seed"] for run in runs] == [0, 1]
        assert all(run["arguments"] == flags_of({**ATTENTION.settings(), **OBJECTIVE_KINDS[name]}) for run in runs), name
    assert tables(results) == (records / "results.md").read_text()
    # --report_only rebuilds the same tables from the records alone: nothing trained, sampled or exported
    copy = tmp_path / "objective"
    shutil.copytree(records, copy)
    (copy / "results.md").unlink()
    assert study_main(["--study", "objective", "--out", str(copy), "--report_only"]) == 0
    rebuilt = (copy / "results.md").read_text().splitlines()[1:]  # the first line is the command
    assert rebuilt == (records / "results.md").read_text().splitlines()[1:]
    assert not (copy / "real").exists() and not (copy / "samples").exists()


def test_stochastic_sampler_table_of_the_objective_study_is_its_records():
    """docs/results.md's table of the DDPM models sampled with DDPMScheduler holds the means and sample
    sds of the nala-quality records beside it, as the studies format them."""
    from nala_diffusion.eval.studies.common import mean_std

    records = REPO / "docs" / "results" / "objective" / "stochastic_ddpm"
    text = (REPO / "docs" / "results.md").read_text()
    for steps in (10, 25, 50, 100):
        runs = [json.loads((records / f"ddpm_s{seed}_steps{steps}.json").read_text()) for seed in (0, 1)]
        assert {run["scheduler"] for run in runs} == {"DDPMScheduler"} and {run["steps"] for run in runs} == {steps}
        assert all(run["num_samples"] == 200 and run["guidance"] == 2.0 for run in runs)
        cells = []
        for key in ("class_accuracy", "fid_trained", "kid_trained", "is_mean_trained", "precision_trained",
                    "recall_trained"):
            values = [run[key]["accuracy"] if key == "class_accuracy" else run[key] for run in runs]
            cells.append(mean_std(values))
        assert f"| ddpm | DDPMScheduler | {steps} | 2 | " + " | ".join(cells) + " |" in text
