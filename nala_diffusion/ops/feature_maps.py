"""NaLa's feature maps, written once, and the kernel features of the linear baselines.

Every path (the reference, autograd, inference, compiled, the analysis tools) builds its features
from the functions here: :func:`query_power` (the power), ``direction_power`` (|u|^p),
``key_power_signed`` (k'), ``sign_halves`` (relu_split) and ``angle_halves`` (cosine). Each feature
map is kept as its two d-wide halves; only the reference concatenates them.

    r = |q|, u = q / max(r, eps), p(r) = power_scale * (power_offset + tanh(r / norm_scale))
    relu_split: phi_q = [relu(u)^p, relu(-u)^p],          phi_k = [relu(k'), relu(-k')],  k' = sign(k) |k|^gamma
    cosine:     phi_q = |u|^p * [cos t(u), sin t(u)],     phi_k = |k|^gamma * [cos t(k), sin t(k)],
                t(x) = (pi / 4) * tanh(s * x / |x|)
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

from nala_diffusion.ops.common import needs_grad
from nala_diffusion.ops.params import INHIBIT_MODES, KERNEL_DEFAULTS, NaLaParams, per_head

FEATURE_MAPS = ("relu", "elu")


def query_power(
    norm: torch.Tensor,
    power_scale: Union[float, torch.Tensor] = KERNEL_DEFAULTS.power_scale,
    power_offset: float = KERNEL_DEFAULTS.power_offset,
    norm_scale: Union[float, torch.Tensor] = KERNEL_DEFAULTS.norm_scale,
) -> torch.Tensor:
    """The norm-aware power p(r) = lambda * (tau + tanh(r / sigma)), for query norms ``r``.

    The one definition every path of the kernel uses. ``power_scale`` (lambda) and ``norm_scale``
    (sigma) are floats or tensors broadcastable to ``norm`` (per head); sigma = 1 is NaLaFormer's
    official formula, bit for bit (``r / 1.0`` is exact).
    """
    return power_scale * (power_offset + torch.tanh(norm / norm_scale))


def power_sensitivity(
    norm: torch.Tensor,
    power_scale: Union[float, torch.Tensor] = KERNEL_DEFAULTS.power_scale,
    norm_scale: Union[float, torch.Tensor] = KERNEL_DEFAULTS.norm_scale,
) -> torch.Tensor:
    """dp / d(log r) = lambda * (r / sigma) * sech^2(r / sigma): how much the power changes for a
    relative change of the query norm (scale-free, unlike dp/dr). Near 0 where tanh has saturated."""
    x = norm / norm_scale
    return power_scale * x * (1 - torch.tanh(x).square())


def angle(direction: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Per-coordinate angle in (-pi/4, pi/4): its sign is the coordinate's sign."""
    return (math.pi / 4) * torch.tanh(sharpness * direction)


def power_in_place(magnitude: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """|x|^p = exp(p log|x|) on a fresh tensor of magnitudes, in place (about twice as fast as
    ``pow`` with a tensor exponent); log 0 = -inf gives exactly 0."""
    return magnitude.log_().mul_(power).exp_()


class MagnitudePower(torch.autograd.Function):
    """:func:`power_in_place` with a backward that gives 0 (not NaN) where x = 0, as ``pow``'s does."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        result = power_in_place(magnitude.clone(), power)
        ctx.save_for_backward(magnitude, power, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        magnitude, power, result = ctx.saved_tensors
        positive = magnitude > 0
        grad_magnitude = grad_power = None
        if ctx.needs_input_grad[0]:
            grad_magnitude = torch.where(positive, grad * power * result / magnitude, 0.0)
        if ctx.needs_input_grad[1]:
            grad_power = torch.where(positive, grad * result * torch.log(magnitude), 0.0)
            grad_power = grad_power.sum_to_size(power.shape)
        return grad_magnitude, grad_power


def direction_power(query: torch.Tensor, params: NaLaParams):
    """(|u|^p(r), u) for queries (..., tokens, d): u = q / max(|q|, eps), p from :func:`query_power`.
    ``params.power_scale`` and ``params.norm_scale`` are floats, per-head tensors ``(heads,)`` or tensors
    that broadcast against (..., tokens, 1)."""
    norm = torch.linalg.vector_norm(query, dim=-1, keepdim=True)  # (..., N, 1)
    direction = query / norm.clamp_min(params.eps)  # (..., N, d), entries in [-1, 1]
    power = query_power(norm, per_head(params.power_scale, query), params.power_offset,
                        per_head(params.norm_scale, query))
    if needs_grad(query, power):
        return MagnitudePower.apply(direction.abs(), power), direction
    return power_in_place(direction.abs(), power), direction


def key_power_signed(key: torch.Tensor, key_power) -> torch.Tensor:
    """k' = sign(k) |k|^gamma, with plain products for odd integer gamma."""
    if float(key_power).is_integer() and int(key_power) % 2 == 1:
        return key.pow(int(key_power))
    return torch.copysign(key.abs().pow(key_power), key)


def sign_halves(signed: torch.Tensor):
    """relu_split: [relu(x), relu(-x)] as two halves; the second is exact since one of them is 0."""
    positive = torch.relu(signed)
    return positive, positive - signed


def angle_halves(magnitude: torch.Tensor, direction: torch.Tensor, sharpness: float):
    """cosine: [m cos t(u), m sin t(u)] as two halves, t(u) = (pi/4) tanh(s u)."""
    turn = angle(direction, sharpness)
    return magnitude * torch.cos(turn), magnitude * torch.sin(turn)


def nala_query_halves(query: torch.Tensor, params: NaLaParams = KERNEL_DEFAULTS):
    """The two d-wide halves of phi_q: [relu(u)^p, relu(-u)^p] or |u|^p [cos t(u), sin t(u)]."""
    magnitude, direction = direction_power(query, params)
    if params.inhibit == "relu_split":
        return sign_halves(torch.copysign(magnitude, direction))
    if params.inhibit == "cosine":
        return angle_halves(magnitude, direction, params.angle_sharpness)
    raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {params.inhibit!r}")


def nala_key_halves(key: torch.Tensor, params: NaLaParams = KERNEL_DEFAULTS):
    """The two d-wide halves of phi_k: [relu(k'), relu(-k')] or |k|^gamma [cos t(k), sin t(k)]."""
    if params.inhibit == "relu_split":
        return sign_halves(key_power_signed(key, params.key_power))
    if params.inhibit == "cosine":
        direction = key / torch.linalg.vector_norm(key, dim=-1, keepdim=True).clamp_min(params.eps)
        return angle_halves(key.abs().pow(params.key_power), direction, params.angle_sharpness)
    raise ValueError(f"inhibit must be one of {INHIBIT_MODES}, got {params.inhibit!r}")


def nala_query_features(query: torch.Tensor, params: NaLaParams = KERNEL_DEFAULTS) -> torch.Tensor:
    """phi_q: (batch, heads, tokens, d) -> (batch, heads, tokens, 2d), non-negative for relu_split."""
    return torch.cat(nala_query_halves(query, params), dim=-1)


def nala_key_features(key: torch.Tensor, params: NaLaParams = KERNEL_DEFAULTS) -> torch.Tensor:
    """phi_k: (batch, heads, tokens, d) -> (batch, heads, tokens, 2d)."""
    return torch.cat(nala_key_halves(key, params), dim=-1)


def scaled_keys(key: torch.Tensor, params: NaLaParams):
    """Keys divided by their largest magnitude per (batch, head), and the denominator's eps in the
    same units: (k / m, eps / m^gamma).

    phi_k is homogeneous of degree gamma in k, so S and z scale by m^-gamma together and the output
    phi_q S / (phi_q z + eps) is unchanged when eps scales with them. In these units k^gamma cannot
    overflow (|k / m| <= 1) for any finite key; where m^gamma itself overflows, eps / m^gamma is 0,
    which is the exact value in float32 anyway.
    """
    largest = key.detach().abs().amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    return key / largest, params.eps / largest.pow(params.key_power)


def kernel_feature_map(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "elu":
        return F.elu(x) + 1.0
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
