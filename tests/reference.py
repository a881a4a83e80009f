"""Independent float64 O(N^2) implementation of the NaLa layer (docs/method.md), written from the formulas.

The attention weights w_ij = phi_q(q_i) . phi_k(k_j) are built explicitly, one query at a time,
and normalised; nothing here shares code with nala_diffusion.ops.
"""

import math

import torch


def phi_query(q, power_scale=3.0, power_offset=0.5, inhibit="relu_split", s=20.0, eps=1e-6, norm_scale=1.0):
    r = torch.sqrt((q * q).sum())  # tensors all the way, so that gradients can be compared
    u = q / torch.clamp(r, min=eps)
    p = power_scale * (power_offset + torch.tanh(r / norm_scale))
    if inhibit == "relu_split":
        return torch.cat([torch.clamp(u, min=0) ** p, torch.clamp(-u, min=0) ** p])
    theta = (math.pi / 4) * torch.tanh(s * u)
    return torch.cat([u.abs() ** p * torch.cos(theta), u.abs() ** p * torch.sin(theta)])


def phi_key(k, gamma=3, inhibit="relu_split", s=20.0, eps=1e-6):
    if inhibit == "relu_split":
        kp = torch.sign(k) * k.abs() ** gamma
        return torch.cat([torch.clamp(kp, min=0), torch.clamp(-kp, min=0)])
    norm = torch.sqrt((k * k).sum())
    theta = (math.pi / 4) * torch.tanh(s * k / torch.clamp(norm, min=eps))
    return torch.cat([k.abs() ** gamma * torch.cos(theta), k.abs() ** gamma * torch.sin(theta)])


def rotate_pairs(x, cos, sin):
    """Adjacent pairs (x[2i], x[2i+1]) turned by the angle whose cos/sin sit at 2i (and 2i + 1)."""
    out = torch.empty_like(x)
    for i in range(0, len(x), 2):
        c, s_ = cos[i], sin[i]
        out[i] = x[i] * c - x[i + 1] * s_
        out[i + 1] = x[i + 1] * c + x[i] * s_
    return out


def rotate_each_half(features, cos, sin):
    """NaLaFormer's RoPE on 2d-wide features: each d-wide half turned on its own."""
    d = len(features) // 2
    return torch.cat([rotate_pairs(features[:d], cos, sin), rotate_pairs(features[d:], cos, sin)])


def nala_reference(q, k, v, power_scale=3.0, power_offset=0.5, key_power=3, inhibit="relu_split",
                   angle_sharpness=20.0, eps=1e-6, rope=None, norm_scale=1.0):
    """q, k, v: (B, H, N, d) -> (B, H, N, d), float64. power_scale and norm_scale may be lists per head."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, d = q.shape
    M = k.shape[2]
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            lam = power_scale[h] if isinstance(power_scale, (list, tuple)) else power_scale
            sigma = norm_scale[h] if isinstance(norm_scale, (list, tuple)) else norm_scale
            fk = torch.stack([phi_key(k[b, h, j], key_power, inhibit, angle_sharpness, eps) for j in range(M)])
            for i in range(N):
                fq = phi_query(q[b, h, i], lam, power_offset, inhibit, angle_sharpness, eps, sigma)
                weights = fk @ fq / M  # w_ij / M, (M,)
                if rope is None:
                    numerator = weights @ v[b, h]
                else:
                    cos, sin = rope  # (N, d) tables: pairs (2i, 2i + 1) turn by one angle
                    fq_r = rotate_each_half(fq, cos[i].double(), sin[i].double())
                    w_num = torch.stack([rotate_each_half(fk[j], cos[j].double(), sin[j].double()) @ fq_r
                                         for j in range(M)]) / M
                    numerator = w_num @ v[b, h]
                out[b, h, i] = numerator / (weights.sum() + eps)
    return out


def linear_reference(q, k, v, feature_map="relu", eps=1e-6):
    q, k, v = q.double(), k.double(), v.double()
    f = (lambda x: torch.clamp(x, min=0)) if feature_map == "relu" else (lambda x: torch.where(x > 0, x + 1, torch.exp(x)))
    weights = torch.einsum("bhnd,bhmd->bhnm", f(q), f(k)) / k.shape[2]
    return weights @ v / (weights.sum(-1, keepdim=True) + eps)


def softmax_reference(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
