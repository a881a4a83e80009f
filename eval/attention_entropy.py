"""nala-entropy: each query's attention entropy against its norm, for softmax, linear kernels and NaLa.

    nala-entropy --random --json entropy.json --plot entropy.png
    nala-entropy --model RUN --data IMAGE_FOLDER --timestep 250 500 750 --json entropy.json

NaLaFormer's observation: in softmax attention a larger query norm gives a sharper (lower-entropy)
distribution; kernel linear attention loses this (its weights do not depend on the norm), and NaLa
restores it. The weights here are built explicitly from each kernel's feature map (N x N, so keep
N to a few thousand) and normalised; the tool reports the Spearman correlation between entropy and
norm, and the mean entropy, per kind (per layer for a model). On a model, each layer's NaLa weights
use that layer's own options (inhibit, lambda, tau, gamma, sigma, sharpness), and every NaLa layer
gets a saturation report (query-norm and power quantiles, the share of queries whose power
responds to the norm; :func:`nala_diffusion.saturation_report`).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from nala_diffusion.ops.attention_weights import KINDS, attention_weights, entropy, norm_effect
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties broken by order, fine for continuous values)."""
    rx, ry = (v.argsort().argsort().double() for v in (x.flatten(), y.flatten()))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-300))


def summarise(q: torch.Tensor, k: torch.Tensor, nala_params=None,
              kinds: Sequence[str] = KINDS) -> Dict[str, dict]:
    """q, k: (heads, N, d) or (batch, heads, N, d). Per kind: Spearman(entropy, |q|), mean entropy,
    the norm effect dH/dlog|q| (:func:`norm_effect`) and the points for a plot; ``nala_params`` are the
    NaLa kind's parameters (a ``NaLaParams``, see :func:`attention_weights`); the other kinds take their defaults."""
    norms = q.double().norm(dim=-1)
    out = {}
    for kind in kinds:
        params = nala_params if kind == "nala" else None
        weights = attention_weights(kind, q, k, params)
        h = entropy(weights)
        valid = torch.isfinite(h) & (weights.sum(-1) > 0)
        out[kind] = {"spearman": spearman(h[valid], norms[valid]), "mean_entropy": float(h[valid].mean()),
                     "norm_effect": norm_effect(kind, q, k, params), "_norms": norms[valid], "_entropy": h[valid]}
    return out


def random_inputs(tokens: int, head_dim: int, heads: int, seed: int):
    """Queries with norms spread over (0.05, 3), the range where NaLa's power changes; keys N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(heads, tokens, head_dim, generator=generator), dim=-1)
    norms = 0.05 + 2.95 * torch.rand(heads, tokens, 1, generator=generator)
    return direction * norms, torch.randn(heads, tokens, head_dim, generator=generator)


def noised_batch(pipe, data: str, timesteps: Sequence[int], images: int, seed: int, split: str = "test"):
    """Real inputs of a pipeline's model: ``images`` images of ``data`` (evenly spaced over the split),
    each noised at every timestep (fixed noise): (noisy, timesteps, labels)."""

    from nala_diffusion.data.datasets import load_dataset
    from nala_diffusion.diffusion.noising import noised_copies
    from nala_diffusion.diffusion.objectives import noise_schedule_for

    dataset = load_dataset(data, pipe.default_sample_size, split=split)  # in pixels (latent side x VAE factor)
    if len(dataset) == 0:
        raise ValueError(f"{data!r} holds no images")
    indices = torch.linspace(0, len(dataset) - 1, min(images, len(dataset))).round().long().tolist()
    batch = torch.stack([dataset[i][0] for i in indices])
    labels = torch.tensor([int(dataset[i][1]) for i in indices])
    with torch.no_grad():
        x0 = batch if pipe.vae is None else pipe.vae.encode(batch).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_schedule_for(pipe.transformer.config, pipe.scheduler)  # the pipeline's own noise schedule
    noisy, _, steps = noised_copies(scheduler, x0, timesteps, generator, pipe.transformer.config)
    return noisy, steps, labels.repeat(len(timesteps))


def model_layers(model_dir: str, data: str, timesteps: Sequence[int], images: int, seed: int) -> List[tuple]:
    """(layer name, q, k, NaLa parameters or None, saturation report or None, the layer's own kernel) for
    every self-attention layer of a trained model on noised real images; q, k are (batch, heads, N, d),
    those the layer's kernel distribution is built from (a softmax layer with RoPE: rotated).
    In a hybrid model each layer names its own kernel (``"nala"``, ``"softmax"``, ...)."""
    from nala_diffusion import NaLaDiTPipeline
    from nala_diffusion.models.norm_awareness import (
        capture_queries,
        distribution_inputs,
        nala_processors,
        saturation_from_queries,
    )

    pipe = NaLaDiTPipeline.from_pretrained(model_dir)
    model = pipe.transformer.eval()
    noisy, steps, labels = noised_batch(pipe, data, timesteps, images, seed)
    with capture_queries(model, keys=True) as captured, torch.no_grad():
        model(noisy, timestep=steps, class_labels=labels)
    patch = model.config.patch_size
    grid = (noisy.shape[-2] // patch, noisy.shape[-1] // patch)
    processors = nala_processors(model)
    report = saturation_from_queries(processors, {name: t["query"] for name, t in captured.items()})
    layers = []
    for name, tensors in captured.items():
        processor = model.get_submodule(name).processor
        params = processor.kernel_params().detached() if name in processors else None
        kernel = getattr(processor, "attention_type", None)
        query, key = distribution_inputs(processor, tensors["query"], tensors["key"], grid)  # softmax + RoPE: rotated
        layers.append((name, query, key, params, report.get(name), kernel))
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
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-entropy", description=__doc__.split("\n\n")[0])
    p.add_argument("--random", action="store_true", help="random queries and keys (the default without --model)")
    p.add_argument("--model", default=None, help="pipeline folder of a trained model")
    p.add_argument("--data", default=None, help="ImageFolder or builtin:<name> giving the model's real inputs")
    p.add_argument("--timestep", type=int, nargs="+", default=[500],
                   help="noise levels of the real inputs (several pool their queries), default 500")
    p.add_argument("--images", type=int, default=4, help="real images per timestep")
    p.add_argument("--tokens", type=int, default=1024, help='token counts of the random-input comparison')
    p.add_argument("--head_dim", type=int, default=64, help='head_dim of the random inputs')
    p.add_argument("--heads", type=int, default=2, help='heads of the random inputs')
    p.add_argument("--seed", type=int, default=0, help='seed of the random inputs and the model inputs')
    p.add_argument("--json", default=None, help='write the result as JSON here')
    p.add_argument("--plot", default=None, help="scatter-plot PNG")
    args = p.parse_args(argv)
    if args.model and args.random:
        p.error("--random and --model exclude each other")
    if args.model and not args.data:
        p.error("--model needs --data (real inputs)")
    return args


def model_entropy(model: str, data: str, timesteps: Sequence[int], images: int, seed: int = 0):
    """(the JSON record, each layer's full statistics) of a trained model's attention on ``images`` real
    inputs noised at ``timesteps``: per layer, every kernel's entropy measures on the layer's own q, k, the
    layer's kernel and, for NaLa layers, the saturation report."""
    layers = model_layers(model, data, timesteps, images, seed)
    per_layer = {name: summarise(q, k, params) for name, q, k, params, _, _ in layers}
    kernels = {name: kernel for name, _, _, _, _, kernel in layers}
    result = {"timesteps": timesteps, "layers": {name: public(s) for name, s in per_layer.items()},
              "kernels": kernels,
              "saturation": {name: report for name, _, _, _, report, _ in layers if report is not None}}
    return result, per_layer


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.model:
        try:
            result, per_layer = model_entropy(args.model, args.data, args.timestep, args.images, args.seed)
        except ValueError as error:
            return exit_on_input_error("nala-entropy", error)
        kernels = result["kernels"]
        first = next(iter(per_layer.values()))
        for name, stats in per_layer.items():
            # the layer's own kernel first (marked *), then what the other kernels would do on its q, k
            order = sorted(stats, key=lambda kind: kind != kernels[name])
            print(f"{name} [{kernels[name]}]", "  ".join(
                f"{k}{'*' if k == kernels[name] else ''}: rho={stats[k]['spearman']:+.2f} H={stats[k]['mean_entropy']:.2f} "
                f"dH/dlog|q|={stats[k]['norm_effect']:+.3f}" for k in order))
        for name, report in result["saturation"].items():
            norm, power = report["norm"], report["power"]
            print(f"{name}: |q| p5/p50/p95 {norm['p5']:.2f}/{norm['p50']:.2f}/{norm['p95']:.2f}, "
                  f"power {power['p5']:.2f}/{power['p50']:.2f}/{power['p95']:.2f}, "
                  f"responding {report['responding_fraction']:.1%}" + ("  SATURATED" if report["saturated"] else ""))
        title = f"{os.path.basename(args.model.rstrip('/'))}, first layer, t={args.timestep}"
    else:
        q, k = random_inputs(args.tokens, args.head_dim, args.heads, args.seed)
        first = summarise(q, k)
        result = public(first)
        for kind, v in result.items():
            print(f"{kind:15s} spearman {v['spearman']:+.3f}  mean entropy {v['mean_entropy']:.3f}  "
                  f"dH/dlog|q| {v['norm_effect']:+.3f}")
        title = f"random inputs, N={args.tokens}, d={args.head_dim}"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.plot:
        plot(first, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
