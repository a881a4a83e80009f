"""SiT checkpoints: conversion reproduces SiT's network, and a flow pipeline samples it as SiT's Euler ODE
does (both against tests/sit_reference.py, written from SiT's released code)."""

import argparse

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from sit_reference import random_sit, sit_euler_sample

from nala_diffusion import NaLaDiTPipeline, convert_sit_to_nala, load_sit
from nala_diffusion.models.norm_awareness import nala_processors
from nala_diffusion.models.sit import sit_config

SIT = dict(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=5)


class Payload:
    """An object a pickled checkpoint could carry; loading must refuse it rather than unpickle it."""


@pytest.fixture(scope="module")
def sit():
    return random_sit(**SIT)


@pytest.fixture(scope="module")
def checkpoint(sit, tmp_path_factory):
    path = tmp_path_factory.mktemp("sit") / "sit.pt"
    torch.save(sit.state_dict(), path)
    return path


def test_converted_sit_computes_what_sit_computes(sit, checkpoint):
    model = convert_sit_to_nala(checkpoint, num_attention_heads=2, attention_type="softmax")
    assert (model.config.objective, model.config.flow_convention, model.config.timestep_freq_shift) == ("flow", "sit", 0)
    assert (model.config.num_layers, model.config.patch_size, model.config.sample_size, model.config.num_classes,
            model.config.out_channels) == (2, 4, 16, 5, 8)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=generator)
    labels = torch.tensor([0, 3, 4, 5])  # 5: the null class
    with torch.no_grad():
        for t in (0.0, 0.3, 0.77, 1.0):
            time = torch.full((4,), t)
            ours = model(x, timestep=time, class_labels=labels).sample[:, :4]
            torch.testing.assert_close(ours, sit(x, time, labels), atol=2e-5, rtol=1e-5)
        # the time-embedding frequencies matter: diffusers' shift (1) gives another network
        model.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift = 1
        shifted = model(x, timestep=torch.full((4,), 0.77), class_labels=labels).sample[:, :4]
        assert (shifted - sit(x, torch.full((4,), 0.77), labels)).abs().max() > 1e-3


def test_a_flow_pipeline_samples_a_sit_as_its_euler_ode(sit, checkpoint):
    model = load_sit(checkpoint, num_attention_heads=2)
    pipe = NaLaDiTPipeline(model, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 2])
    steps = 6
    sigmas = list(1 - np.linspace(0, 1, steps + 1)[:-1])  # SiT's grid, t = 0, 1/6, ..., 5/6
    for scale, channels in ((1.0, "all"), (4.0, 3)):  # SiT guides the first 3 channels
        ours = pipe([1, 2], latents=noise.clone(), sigmas=sigmas, guidance_scale=scale, guidance_channels=channels,
                    output_type="latent").images
        theirs = sit_euler_sample(sit, noise.clone(), labels, steps, cfg_scale=scale, null_class=5)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert theirs.abs().mean() > 0.1  # a sample, not zeros
    # the scheduler's own grid (1 .. 1/1000, then 0) is another discretisation of the same ODE
    default = pipe([1, 2], latents=noise.clone(), num_inference_steps=steps, guidance_scale=1.0, output_type="latent").images
    assert not torch.allclose(default, ours)


def test_sit_checkpoint_files_and_refusals(sit, tmp_path):
    state = sit.state_dict()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([0.5]), torch.tensor([2])
    reference = sit(x, t, y)
    # a training checkpoint: its EMA weights, with the arguments SiT's train.py saves beside them
    training = tmp_path / "0010000.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {},
                "args": argparse.Namespace(model="SiT-S/4", path_type="Linear")}, training)
    safetensors_file = tmp_path / "sit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safetensors_file)
    for source in (training, safetensors_file, state):
        model = load_sit(source, num_attention_heads=2)
        with torch.no_grad():
            torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample[:, :4], reference, atol=2e-5, rtol=1e-5)

    hostile = tmp_path / "hostile.pt"
    torch.save({"ema": state, "extra": Payload()}, hostile)  # anything but tensors, containers, arguments: refused
    with pytest.raises(ValueError, match="not a checkpoint of weights only"):
        load_sit(hostile, num_attention_heads=2)
    with pytest.raises(ValueError, match="not a SiT checkpoint"):
        load_sit({"weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="pass num_attention_heads"):
        load_sit(state)  # depth 2, width 64: none of SiT's sizes
    with pytest.raises(ValueError, match="no SiT checkpoint"):
        load_sit(tmp_path / "missing.pt")


def test_sit_sizes_come_from_the_table():
    # SiT-XL/2's shapes (no weights needed): depth 28, width 1152 -> 16 heads; learned sigma; 1000 classes
    shapes = {"x_embedder.proj.weight": (1152, 4, 2, 2), "final_layer.linear.weight": (2 * 2 * 8, 1152),
              "pos_embed": (1, 256, 1152), "blocks.0.mlp.fc1.weight": (4608, 1152),
              "y_embedder.embedding_table.weight": (1001, 1152), "blocks.27.attn.qkv.weight": (3456, 1152)}
    config = sit_config({k: torch.zeros(1).expand(*v) for k, v in shapes.items()})
    assert (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"], config["sample_size"],
            config["out_channels"], config["num_classes"]) == (16, 72, 28, 32, 8, 1000)


def test_converted_sit_to_nala_keeps_its_conventions_and_refuses_ddpm_schedulers(checkpoint):
    model = convert_sit_to_nala(checkpoint, num_attention_heads=2)  # NaLa, sigma calibrated on SiT's own time
    assert model.config.attention_type == "nala" and model.config.flow_convention == "sit"
    processors = nala_processors(model).values()
    assert processors and all(not p.norm_scale_uncalibrated for p in processors)
    sigmas = [p.log_norm_scale.exp() for p in processors]
    assert all(torch.isfinite(s).all() and (s != 1).all() for s in sigmas)  # calibrated, not the starting 1
    with pytest.raises(ValueError, match="'flow' objective, but the scheduler DDIMScheduler"):
        NaLaDiTPipeline(model, DDIMScheduler())([0], num_inference_steps=2, output_type="latent")
