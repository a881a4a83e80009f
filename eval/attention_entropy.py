"""nala-entropy: each query's attention entropy against its norm, for softmax, ReLU linear and NaLa.

    nala-entropy --random --json entropy.json --plot entropy.png
    nala-entropy --model RUN --data IMAGE_FOLDER --timestep 500 --json entropy.json

NaLaFormer's observation: in softmax attention a larger query norm gives a sharper (lower-entropy)
distribution; kernel linear attention loses this (its weights do not depend on the norm), and NaLa
restores it. The weights here are built explicitly from each kernel's feature map (N x N, so keep
N to a few thousand) and normalised; the tool reports the Spearman correlation between entropy and
norm, and the mean entropy, per kind (per layer for a model).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from nala_diffusion.kernels import nala_key_features, nala_query_features

KINDS = ("softmax", "relu_linear", "nala")


def attention_weights(kind: str, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(..., N, d), (..., M, d) -> (..., N, M) rows summing to 1 (rows of zeros stay zero)."""
    q, k = q.double(), k.double()
    if kind == "softmax":
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    if kind == "relu_linear":
        scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    elif kind == "nala":
        scores = nala_query_features(q) @ nala_key_features(k).transpose(-1, -2)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)


def entropy(weights: torch.Tensor) -> torch.Tensor:
    return -(weights * torch.log(weights.clamp_min(1e-300))).sum(-1)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties broken by order, fine for continuous values)."""
    rx, ry = (v.argsort().argsort().double() for v in (x.flatten(), y.flatten()))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-300))


def summarise(q: torch.Tensor, k: torch.Tensor) -> Dict[str, dict]:
    """q, k: (heads, N, d). Per kind: Spearman(entropy, |q|), mean entropy, and the points for a plot."""
    norms = q.double().norm(dim=-1)
    out = {}
    for kind in KINDS:
        h = entropy(attention_weights(kind, q, k))
        valid = torch.isfinite(h) & (attention_weights(kind, q, k).sum(-1) > 0)
        out[kind] = {"spearman": spearman(h[valid], norms[valid]), "mean_entropy": float(h[valid].mean()),
                     "_norms": norms[valid], "_entropy": h[valid]}
    return out


def random_inputs(tokens: int, head_dim: int, heads: int, seed: int):
    """Queries with norms spread over (0.05, 3), the range where NaLa's power changes; keys N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(heads, tokens, head_dim, generator=generator), dim=-1)
    norms = 0.05 + 2.95 * torch.rand(heads, tokens, 1, generator=generator)
    return direction * norms, torch.randn(heads, tokens, head_dim, generator=generator)


def model_inputs(model_dir: str, data: str, timestep: int, images: int, seed: int) -> List[tuple]:
    """(layer name, q, k) of every self-attention layer of a trained model on noised real images."""
    from diffusers import DDPMScheduler

    from nala_diffusion import NaLaDiTPipeline, self_attention_modules
    from nala_diffusion.data import load_dataset

    pipe = NaLaDiTPipeline.from_pretrained(model_dir)
    model = pipe.transformer.eval()
    resolution = pipe.default_sample_size
    dataset = load_dataset(data, resolution)
    if len(dataset) == 0:
        raise ValueError(f"{data!r} holds no images")
    batch = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))])
    labels = torch.tensor([dataset[i][1] for i in range(len(batch))])
    with torch.no_grad():
        x0 = batch if pipe.vae is None else pipe.vae.encode(batch).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.full((len(x0),), timestep)
    noisy = DDPMScheduler(beta_schedule="linear").add_noise(x0, noise, t)
    captured, hooks = {}, []
    for name, attn in self_attention_modules(model):
        hooks.append(attn.to_q.register_forward_hook(lambda m, a, o, name=name: captured.setdefault(name, {}).update(q=o.detach())))
        hooks.append(attn.to_k.register_forward_hook(lambda m, a, o, name=name: captured.setdefault(name, {}).update(k=o.detach())))
    with torch.no_grad():
        model(noisy, timestep=t, class_labels=labels)
    for h in hooks:
        h.remove()
    heads = {name: attn.heads for name, attn in self_attention_modules(model)}
    layers = []
    for name, tensors in captured.items():
        b, n, inner = tensors["q"].shape
        split = lambda x: x.view(b, n, heads[name], inner // heads[name]).transpose(1, 2).reshape(-1, n, inner // heads[name])
        layers.append((name, split(tensors["q"]), split(tensors["k"])))
    return layers


def plot(points: Dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(4 * len(KINDS), 3.6), sharex=True)
    for ax, kind in zip(axes, KINDS):
        stats = points[kind]
        ax.scatter(stats["_norms"].numpy(), stats["_entropy"].numpy(), s=2, alpha=0.3)
        ax.set(title=f"{kind}: rho={stats['spearman']:.2f}", xlabel="query norm", ylabel="attention entropy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def public(stats: Dict[str, dict]) -> Dict[str, dict]:
    return {kind: {k: v for k, v in s.items() if not k.startswith("_")} for kind, s in stats.items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nala-entropy", description=__doc__.split("\n\n")[0])
    p.add_argument("--random", action="store_true", help="random queries and keys (the default without --model)")
    p.add_argument("--model", default=None, help="pipeline folder of a trained model")
    p.add_argument("--data", default=None, help="ImageFolder or builtin:<name> giving the model's real inputs")
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="scatter-plot PNG")
    args = p.parse_args(argv)
    if args.model and args.random:
        p.error("--random and --model exclude each other")
    if args.model and not args.data:
        p.error("--model needs --data (real inputs)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.model:
        layers = model_inputs(args.model, args.data, args.timestep, args.images, args.seed)
        per_layer = {name: summarise(q, k) for name, q, k in layers}
        result = {"layers": {name: public(s) for name, s in per_layer.items()}}
        first = next(iter(per_layer.values()))
        for name, stats in per_layer.items():
            print(name, "  ".join(f"{k}: rho={v['spearman']:+.2f} H={v['mean_entropy']:.2f}" for k, v in stats.items()))
        title = f"{os.path.basename(args.model.rstrip('/'))}, first layer, t={args.timestep}"
    else:
        q, k = random_inputs(args.tokens, args.head_dim, args.heads, args.seed)
        first = summarise(q, k)
        result = public(first)
        for kind, v in result.items():
            print(f"{kind:12s} spearman {v['spearman']:+.3f}  mean entropy {v['mean_entropy']:.3f}")
        title = f"random inputs, N={args.tokens}, d={args.head_dim}"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.plot:
        plot(first, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
