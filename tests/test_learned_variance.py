"""Learned variance: L_vlb against an independent computation, training and distilling the variance
channels, sampling with them; guidance intervals and DiT's 3-channel guidance."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import tiny_nala
from safetensors.torch import load_file
from test_train import base_args, data, train  # noqa: F401  (the tiny ImageFolder fixture)

from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTPipeline, NaLaDiTTransformer2DModel
from nala_diffusion.diffusion.learned_variance import vlb_terms


def test_vlb_equals_an_independent_gaussian_kl_and_decoder_nll():
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 1, 500, 999])
    xt = scheduler.add_noise(x0, noise, t)
    epsilon = noise + 0.1 * torch.randn(x0.shape, generator=generator)  # an imperfect prediction
    v = torch.rand(x0.shape, generator=generator) * 2 - 1
    got = vlb_terms(scheduler, x0, xt, t, epsilon, v)

    betas, abar = scheduler.betas.double(), scheduler.alphas_cumprod.double()
    expected = []
    for i, step in enumerate(t.tolist()):
        prev = abar[step - 1] if step > 0 else torch.tensor(1.0, dtype=torch.float64)
        post_var = betas[step] * (1 - prev) / (1 - abar[step])
        post_var_clipped = betas[1] * (1 - abar[0]) / (1 - abar[1]) if step == 0 else post_var
        true_mean = (prev.sqrt() * betas[step] * x0[i].double() + (1 - betas[step]).sqrt() * (1 - prev) * xt[i].double()) \
            / (1 - abar[step])
        x0_hat = (xt[i].double() - (1 - abar[step]).sqrt() * epsilon[i].double()) / abar[step].sqrt()
        mean = (prev.sqrt() * betas[step] * x0_hat + (1 - betas[step]).sqrt() * (1 - prev) * xt[i].double()) / (1 - abar[step])
        frac = (v[i].double() + 1) / 2
        log_var = frac * betas[step].log() + (1 - frac) * post_var_clipped.log()
        model = torch.distributions.Normal(mean, (0.5 * log_var).exp())
        if step == 0:  # decoder: probability of the 1/127.5-wide bin around x0 (edges open)
            x = x0[i].double()
            upper = torch.where(x > 0.999, torch.ones_like(x), model.cdf(x + 1 / 255))
            lower = torch.where(x < -0.999, torch.zeros_like(x), model.cdf(x - 1 / 255))
            expected.append(float(-(upper - lower).log().mean() / math.log(2)))
        else:
            true = torch.distributions.Normal(true_mean, post_var.sqrt().expand_as(true_mean))
            expected.append(float(torch.distributions.kl_divergence(true, model).mean() / math.log(2)))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def learned_sigma_model(tmp_path_factory):
    """A tiny pixel-space NaLa DiT with learned variance (3 mean + 3 variance channels), saved."""
    folder = tmp_path_factory.mktemp("learned") / "model"
    model = tiny_nala(sample_size=16, in_channels=3, out_channels=6, num_classes=3, norm_scale_mode="fixed")
    model.save_pretrained(folder)
    return folder


def variance_rows(weights, channels=3, out_channels=6):
    """proj_out_2's weight and bias rows that produce the variance channels (layout p, p, C_out)."""
    rows = torch.arange(weights["proj_out_2.bias"].numel()) % out_channels >= channels
    return weights["proj_out_2.weight"][rows], weights["proj_out_2.bias"][rows]


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_training_changes_the_variance_channels_only_with_vlb(data, learned_sigma_model, tmp_path):  # noqa: F811
    initial = variance_rows(load_file(learned_sigma_model / "diffusion_pytorch_model.safetensors"))
    finals = {}
    for loss in ("vlb", "none"):
        out = tmp_path / loss
        train(base_args(data, out, steps=30, checkpointing_steps=100, init_from=learned_sigma_model,
                        variance_loss=loss))
        finals[loss] = variance_rows(load_file(out / "transformer" / "diffusion_pytorch_model.safetensors"))
        with open(out / "log.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert all(bool(row["loss_vlb"]) == (loss == "vlb") for row in rows if row["loss"])
    assert all(torch.equal(a, b) for a, b in zip(finals["none"], initial))  # untouched, bit for bit
    assert not torch.equal(finals["vlb"][0], initial[0]) and not torch.equal(finals["vlb"][1], initial[1])
    assert json.loads((tmp_path / "none" / "args.json").read_text())["variance_loss"] == "none"


def test_distillation_of_both_halves_starts_at_zero(data, learned_sigma_model, tmp_path):  # noqa: F811
    out = tmp_path / "distill"
    train(base_args(data, out, steps=2, init_from=learned_sigma_model, teacher=learned_sigma_model))
    with open(out / "log.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    # 0 up to round-off: the student runs NaLa's training path (autograd), the teacher its sampling path
    assert float(first["loss_distill"]) < 1e-9 and float(first["loss_distill_variance"]) < 1e-9
    assert float(first["loss_target"]) > 1e-3
    assert float(first["loss_vlb"]) > 0  # learned variance: vlb by default


def test_vlb_on_a_model_without_learned_variance_is_refused(data, tmp_path):  # noqa: F811
    result = train(base_args(data, tmp_path / "plain", steps=2, variance_loss="vlb"), check=False)
    assert result.returncode == 2 and "needs a model with learned variance" in result.stderr


def sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 6, "guidance_scale": 3.0, "output_type": "np", **kwargs}
    return pipe([0, 2], height=16, width=16, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                **kwargs).images


class CountPasses:
    """Counts the unconditional images the transformer is asked for (labels = the null class)."""

    def __init__(self, model):
        self.unconditional = 0
        model.register_forward_pre_hook(self.hook, with_kwargs=True)
        self.null = model.null_class_label

    def hook(self, module, args, kwargs):
        self.unconditional += int((kwargs["class_labels"] == self.null).sum())


@pytest.mark.parametrize("cls", [NaLaDiTPipeline, NaLaDiTHighResPipeline])
def test_guidance_interval_all_none_and_part(cls):
    pipe = cls(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler())
    counter = CountPasses(pipe.transformer)
    today = sample(pipe)
    assert counter.unconditional == 2 * 6
    assert np.array_equal(sample(pipe, guidance_interval=(0, 999)), today)  # every step inside: today's images
    sigmas = ((1 - pipe.scheduler.alphas_cumprod) / pipe.scheduler.alphas_cumprod).sqrt()
    assert np.array_equal(sample(pipe, guidance_interval=(0, float(sigmas.max()) + 1), guidance_interval_unit="sigma"),
                          today)
    counter.unconditional = 0
    # an interval that would turn guidance off is refused, not sampled unguided under a guidance scale
    for interval, unit in (((2000, 3000), "timestep"), ((800, 100), "timestep"), ((-5, -1), "timestep"),
                           ((float(sigmas.max()) + 1, float(sigmas.max()) + 2), "sigma")):
        with pytest.raises(ValueError, match="would turn guidance off"):
            sample(pipe, guidance_interval=interval, guidance_interval_unit=unit)
    with pytest.raises(ValueError, match="holds none of the 6 sampled steps"):
        sample(pipe, guidance_interval=(510, 520))  # inside the schedule, between two of the 6 steps
    assert counter.unconditional == 0  # refused before any pass
    empty = sample(pipe, guidance_scale=1.0)
    pipe.scheduler.set_timesteps(6)
    inside = [int(t) for t in pipe.scheduler.timesteps if 300 <= int(t) <= 700]
    counter.unconditional = 0
    part = sample(pipe, guidance_interval=(300, 700))
    assert counter.unconditional == 2 * len(inside) and 0 < len(inside) < 6
    assert not np.array_equal(part, today) and not np.array_equal(part, empty)


def test_guidance_channels_reproduce_dits_three_channel_guidance():
    model = tiny_nala(sample_size=16, num_classes=3, in_channels=4)
    pipe = NaLaDiTPipeline(model, DDIMScheduler())
    every = sample(pipe, output_type="latent")
    assert torch.equal(sample(pipe, output_type="latent", guidance_channels=4), every)
    assert not torch.equal(sample(pipe, output_type="latent", guidance_channels=3), every)
    # one DDIM step acts channel by channel: channels 0-2 are the guided ones, channel 3 the conditional one
    one = dict(output_type="latent", num_inference_steps=1)
    three, every, conditional = (sample(pipe, **one, **extra) for extra in
                                 ({"guidance_channels": 3}, {}, {"guidance_scale": 1.0}))
    # (the conditional branch alone runs a batch half the size, whose products may round differently)
    assert torch.equal(three[:, :3], every[:, :3])
    torch.testing.assert_close(three[:, 3], conditional[:, 3], atol=1e-6, rtol=0)
    assert (every[:, 3] - conditional[:, 3]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_channels must be 'all' or a channel count in 1..4"):
        sample(pipe, guidance_channels=5, output_type="latent")


def test_learned_variance_sampling():
    model = tiny_nala(sample_size=16, num_classes=3, out_channels=6)
    learned = NaLaDiTPipeline(model, DDPMScheduler(variance_type="learned_range"))
    fixed = NaLaDiTPipeline(model, DDPMScheduler(variance_type="fixed_small"))
    with_variance = sample(learned, use_learned_variance=True)
    assert not np.allclose(with_variance, sample(fixed), atol=1e-3)
    # a model whose variance channels say v = -1 (the lower end, beta~_t) samples as fixed_small does
    with torch.no_grad():
        rows = torch.arange(model.proj_out_2.bias.numel()) % 6 >= 3
        model.proj_out_2.weight[rows] = 0
        model.proj_out_2.bias[rows] = -1
    np.testing.assert_allclose(sample(learned, use_learned_variance=True), sample(fixed), atol=1e-5)
    with pytest.raises(ValueError, match="variance_type is 'learned_range', which needs the model's variance"):
        sample(learned)
    with pytest.raises(ValueError, match="needs a scheduler that samples with it"):
        sample(fixed, use_learned_variance=True)
    plain = NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDPMScheduler(variance_type="learned_range"))
    with pytest.raises(ValueError, match="needs a model with learned variance"):
        sample(plain, use_learned_variance=True)


def test_command_line_guidance_variance_and_the_dit_protocol(learned_sigma_model, tmp_path, capsys):
    from nala_diffusion.eval.fid import cli as fid_cli
    from nala_diffusion.pipelines.sample import main as sample_main

    transformer = NaLaDiTTransformer2DModel.from_pretrained(learned_sigma_model)
    NaLaDiTHighResPipeline(transformer, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    common = ["--model", str(tmp_path / "pipe"), "--labels", "0", "1", "--steps", "3"]
    grids = {}
    assert sample_main([*common, "--guidance-interval", "800", "100", "--out", str(tmp_path / "reversed.png")]) == 2
    assert "would turn guidance off" in capsys.readouterr().err and not (tmp_path / "reversed.png").exists()
    for name, extra in (("unguided", ["--guidance", "1"]),
                        ("all", ["--guidance_interval", "0", "999"]), ("default", []),
                        ("learned", ["--learned-variance", "--steps", "3"])):
        out = tmp_path / f"{name}.png"
        assert sample_main([*common, *extra, "--out", str(out)]) == 0, name
        grids[name] = out.read_bytes()
    assert grids["all"] == grids["default"] != grids["unguided"]
    assert grids["learned"] != grids["default"]
    assert sample_main([*common, "--learned-variance", "--scheduler", "ddim", "--out", str(tmp_path / "x.png")]) == 2
    assert "samples with DDPM" in capsys.readouterr().err

    out = tmp_path / "fid"
    args = ["sample", "--model", str(tmp_path / "pipe"), "--num_samples", "2", "--out", str(out), "--batch_size", "2"]
    assert fid_cli([*args, "--protocol", "dit", "--steps", "10"]) == 2
    assert "--protocol dit fixes --steps 250" in capsys.readouterr().err
    assert fid_cli([*args, "--protocol", "dit"]) == 0
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["protocol"] == "dit" and fingerprint["use_learned_variance"] is True
    assert fingerprint["guidance_channels"] == 3 and fingerprint["steps"] == 250 and fingerprint["guidance"] == 1.5
    # other guidance settings are other samples: refused, naming the field
    assert fid_cli([*args, "--protocol", "dit", "--guidance_interval", "0", "500"]) == 2
    assert "guidance_interval" in capsys.readouterr().err
