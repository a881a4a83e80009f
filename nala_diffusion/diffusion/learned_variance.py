"""Learned variance (improved DDPM, Nichol & Dhariwal 2021), as DiT trains and samples it.

A model with ``out_channels = 2 x in_channels`` predicts the noise (its first half, the mean) and an
interpolation v in [-1, 1] (its second half) between the two standard variances of the reverse step:
log sigma^2 = (v + 1) / 2 log beta_t + (1 - v) / 2 log beta~_t ("learned_range", the variance type
of diffusers' ``DDPMScheduler`` that samples with it). It is trained by L_vlb, the KL between the true
posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian (at t = 0 the discretized decoder NLL), in
bits per dimension, with the mean's gradient stopped so that L_simple alone trains the mean. The
formulas follow improved DDPM's ``gaussian_diffusion.py`` (as DiT ships it): the posterior log variance
is clipped at t = 0 to its value at t = 1.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

VARIANCE_LOSSES = ("vlb", "none")


def has_learned_variance(model) -> bool:
    """Whether a DiT-family model predicts a variance half (``out_channels == 2 * in_channels``)."""
    return model.out_channels == 2 * model.config.in_channels


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over ``like`` (B, C, H, W), in float64."""
    return values.to(device=t.device, dtype=torch.float64)[t].reshape(-1, *([1] * (like.ndim - 1)))


def schedule_terms(scheduler) -> Dict[str, torch.Tensor]:
    """The per-timestep terms of a DDPM schedule (diffusers ``betas``/``alphas_cumprod``), float64."""
    betas = scheduler.betas.double()
    alphas_cumprod = scheduler.alphas_cumprod.double()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        # log beta~_t, clipped: beta~_0 = 0, so t = 0 takes beta~_1
        "posterior_log_variance": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        "posterior_mean_x0": betas * previous.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_xt": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }


def gaussian_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp log_var1) || N(mean2, exp log_var2)), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 levels under N(mean, exp(log_scale)^2), elementwise."""
    centred = x - mean
    inverse_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inverse_std * (centred + 1.0 / 255.0))
    cdf_minus = _standard_normal_cdf(inverse_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def model_log_variance(terms: Dict[str, torch.Tensor], v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log sigma^2 of the learned range: v in [-1, 1] interpolates log beta~_t (v = -1) and log beta_t (v = 1)."""
    min_log = _gather(terms["posterior_log_variance"], t, v)
    max_log = _gather(terms["betas"].log(), t, v)
    fraction = (v.double() + 1) / 2
    return fraction * max_log + (1 - fraction) * min_log


def vlb_terms(scheduler, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, epsilon: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
    """L_vlb per sample, (B,) in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
    t > 0, the discretized decoder NLL at t = 0. The model's mean comes from ``epsilon`` (pass it
    detached: the mean's gradient is stopped) and its variance from ``v`` (the variance half)."""
    terms = schedule_terms(scheduler)
    x0, xt, epsilon = x0.double(), xt.double(), epsilon.double()
    alpha_bar = _gather(terms["alphas_cumprod"], t, xt)
    coef_x0, coef_xt = _gather(terms["posterior_mean_x0"], t, xt), _gather(terms["posterior_mean_xt"], t, xt)
    true_mean = coef_x0 * x0 + coef_xt * xt
    true_log_variance = _gather(terms["posterior_log_variance"], t, xt).expand_as(xt)
    predicted_x0 = (xt - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()
    mean = coef_x0 * predicted_x0 + coef_xt * xt
    log_variance = model_log_variance(terms, v, t)
    dims = tuple(range(1, xt.ndim))
    kl = gaussian_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=dims) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).mean(dim=dims) / math.log(2.0)
    return torch.where(t == 0, nll, kl).float()


def epsilon_from_prediction(scheduler, prediction: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                            prediction_type: str) -> torch.Tensor:
    """The noise a mean prediction implies: itself for ``epsilon``, sqrt(a) v + sqrt(1 - a) x_t for ``v_prediction``."""
    if prediction_type == "epsilon":
        return prediction
    alpha_bar = _gather(scheduler.alphas_cumprod.double(), t, xt).to(prediction.dtype)
    return alpha_bar.sqrt() * prediction + (1 - alpha_bar).sqrt() * xt
