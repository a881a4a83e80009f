"""SiT's network and its Euler ODE sampler, written from the formulas of SiT's released code
(github.com/willisma/SiT: models.py, transport/path.py ICPlan, transport/integrators.py ode), in plain
torch (SiT imports timm's PatchEmbed, Attention and Mlp; their computations are written out here). Shares
no code with nala_diffusion. Parameter names are SiT's, so ``state_dict()`` is a SiT checkpoint."""

import math

import numpy as np
import torch
from torch import nn


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed (SiT's fixed position table)."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):  # timm's: qkv, softmax(q k^T / sqrt(d)) v, proj
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = (q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class SiT(nn.Module):
    def __init__(self, input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                 num_classes=5, learn_sigma=True):
        super().__init__()
        self.learn_sigma, self.in_channels, self.patch = learn_sigma, in_channels, patch_size
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # + the null class (dropout 0.1)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(hidden_size, grid)).float().unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder.mlp(timestep_embedding(t, 256)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        c_out, p = self.out_channels, self.patch
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c_out))
        x = x.reshape(x.shape[0], c_out, h * p, w * p)
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


@torch.no_grad()
def sit_euler_sample(model, noise, labels, num_steps, cfg_scale=1.0, null_class=None):
    """SiT's ODE sampler with method "euler" (torchdiffeq's fixed grid): t = linspace(0, 1, num_steps + 1)
    from noise to data, x <- x + (t_next - t) v(x, t); with cfg_scale > 1, SiT's sample.py doubles the batch
    with the null class and uses forward_with_cfg. Returns the last state."""
    t_grid = torch.linspace(0, 1, num_steps + 1)
    x = noise
    if cfg_scale > 1:
        x = torch.cat([x, x])
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
    for t, t_next in zip(t_grid[:-1], t_grid[1:]):
        t_batch = torch.ones(x.shape[0]) * t
        v = model.forward_with_cfg(x, t_batch, labels, cfg_scale) if cfg_scale > 1 else model(x, t_batch, labels)
        x = x + (t_next - t) * v
    return x[: len(noise)]


def random_sit(seed=0, **kwargs):
    """A SiT whose every weight is random (SiT zero-initialises its adaLN and output layers, which would
    hide a wrong mapping)."""
    torch.manual_seed(seed)
    model = SiT(**kwargs)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.normal_(0, 0.2 if parameter.ndim > 1 else 0.1)
    return model.eval()
