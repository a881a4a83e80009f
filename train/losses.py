"""A training step's losses: the denoising target, distillation from a teacher, the learned variance's
L_vlb and attention-output distillation; every random draw from the batch's own generator."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import nala_diffusion.diffusion.learned_variance as learned_variance
from nala_diffusion.train.run_data import clean_latents


def step_generator(seed: int, batch_index: int, process_index: int, device) -> torch.Generator:
    """The random source of one batch: depends on nothing but the run's seed and the batch's position."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch_index) * 1009 + process_index)


def training_losses(config, model, teacher, vae, objective, batch, labels, null_label, channels, generator,
                    distiller=None):
    """MSE to the target (+ distill_weight x MSE to the teacher's mean and, for learned variance, its
    variance channels; + vlb_weight x L_vlb for learned variance; + attention_distillation_weight x the
    attention-output MSE); draws in a fixed order from ``generator``."""
    device = batch.device
    count = len(labels)
    flip = torch.rand(count, generator=generator, device=device) < 0.5 if config.random_flip \
        else torch.zeros(count, dtype=torch.bool, device=device)
    x0 = clean_latents(batch, vae, config.cache_latents, flip, generator)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    times = objective.draw(count, generator, device)  # timesteps (DDPM) or sigmas (flow)
    drop = torch.rand(count, generator=generator, device=device) < config.class_dropout_prob
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    noisy, timesteps = objective.noised(x0, noise, times)
    target = objective.target(x0, noise, times)
    with distiller.capture() if distiller is not None else contextlib.nullcontext():
        output = model(noisy, timestep=timesteps, class_labels=labels).sample  # (B, C or 2C, h, w)
    if distiller is not None:
        losses_attention = distiller.losses()
    prediction, variance = output[:, :channels], output[:, channels:]  # the mean; v of a learned variance
    losses = {"loss_target": F.mse_loss(prediction.float(), target.float())}
    if config.variance_loss == "vlb" and variance.shape[1]:
        epsilon = learned_variance.epsilon_from_prediction(objective.scheduler, prediction.detach(), noisy, timesteps,
                                                           config.prediction_type)
        losses["loss_vlb"] = learned_variance.vlb_terms(objective.scheduler, x0, noisy, timesteps, epsilon,
                                                        variance).mean()
    if teacher is not None:
        losses.update(distillation_losses(teacher, objective, x0, noise, times, noisy, labels, output, channels))
    distill = losses.get("loss_distill", 0.0) + losses.get("loss_distill_variance", 0.0)
    if distiller is not None:
        losses.update(losses_attention)
    losses["loss"] = (losses["loss_target"] + config.distill_weight * distill
                      + config.vlb_weight * losses.get("loss_vlb", 0.0)
                      + config.attention_distillation_weight * losses.get("loss_attention", 0.0))
    return losses


def distillation_losses(teacher, objective, x0, noise, times, noisy, labels, output, channels):
    """The MSE to the teacher's mean, in the common convention, and (LiT) to its learned variance."""
    teacher_model, teacher_objective = teacher
    with torch.no_grad():  # the same noisy input, at the time the teacher reads (its own convention)
        _, teacher_timesteps = teacher_objective.noised(x0, noise, times)
        teacher_output = teacher_model(noisy.to(teacher_model.dtype), timestep=teacher_timesteps,
                                       class_labels=labels).sample
    prediction, variance = output[:, :channels], output[:, channels:]
    teacher_mean = teacher_objective.to_common(teacher_output[:, :channels])
    losses = {"loss_distill": F.mse_loss(objective.to_common(prediction).float(), teacher_mean.float())}
    if variance.shape[1] and teacher_output.shape[1] == output.shape[1] and objective.name == "ddpm":
        losses["loss_distill_variance"] = F.mse_loss(variance.float(), teacher_output[:, channels:].float())
    return losses
