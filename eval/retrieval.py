"""nala-retrieval: how much a trained model's denoising uses the partner token of ``builtin:pairs``.

    nala-retrieval --model RUN --json retrieval.json                  # builtin:pairs (tiles)
    nala-retrieval --model RUN --json retrieval.json --layout crops   # builtin:pairs_crops

Two measures (see ``nala_diffusion.data.builtin_pairs`` for the task):

- **retrieval gain**: the held-out epsilon-MSE on the unpaired control minus that on paired images, at
  each timestep (50, 100, 250 by default), with the same images' top halves, labels and noise in
  both sets. A model that finds the partner denoises paired images better; one that cannot, does
  not see a difference (gain 0). The timesteps are those at which a 4 x 4 px token can still be
  recognised under the noise (signal fraction alpha_bar = 0.95, 0.90, 0.52 on the linear schedule);
  at t = 500 (alpha_bar = 0.08) no model can find its partner.
- **retrieval mass**: per self-attention layer, from the layer's explicit attention weights on noised
  paired images, the mean share of a bottom-half query's attention that lands on its partner token
  (tiles layout) or on the partner and the tokens beside it in its row (crops layout, whose
  neighbouring tokens are alike: ±1 column, cyclic). The baseline is the same window placed with a
  wrong offset (another image's), so it has the same geometry; uniform attention gives
  window / tokens for both.

Both are written as JSON, with the per-layer Spearman correlation between a query's attention
entropy and its norm (rho), the norm effect dH/dlog|q| (the causal measure of norm-awareness) and
the mean entropy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch

from nala_diffusion.models.options import ATTENTION_TYPES
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error, positive_int
from nala_diffusion.utils.files import write_json_atomically

# signal fraction alpha_bar = 0.95, 0.90, 0.52 on the linear schedule: a 4 x 4 px token can be recognised
TIMESTEPS = (50, 100, 250)
# columns on each side of the partner that count as hits: none for unrelated tiles, one for crops
WINDOWS = {"tiles": 0, "crops": 1}
DATASETS = {"tiles": "builtin:pairs", "crops": "builtin:pairs_crops"}
# per layer, averaged over the timesteps
MASS_MEASURES = ("mass", "baseline", "rho", "entropy", "norm_effect")



def evenly(count: int, total: int) -> list:
    return torch.linspace(0, total - 1, min(count, total)).round().long().tolist()


@torch.no_grad()
def heldout_mse(model, scheduler, images: torch.Tensor, labels: torch.Tensor, timesteps: Sequence[int], seed: int,
                batch_size: int = 64) -> Dict[int, float]:
    """MSE of the prediction per timestep on the mean channels (the target of the model's prediction type: epsilon
    or v; a flow model's velocity), noise fixed
    by ``seed`` (the same for any model and for the paired and unpaired sets)."""
    from nala_diffusion.diffusion.noising import noised_copies
    from nala_diffusion.diffusion.objectives import denoising_target

    out = {}
    channels = images.shape[1]
    for t in timesteps:
        noisy, noise, steps = noised_copies(scheduler, images, [t], torch.Generator().manual_seed(seed + int(t)),
                                            model.config)
        target = denoising_target(model.config, images, noise, scheduler, steps)
        errors = []
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            prediction = model(noisy[part], timestep=steps[part], class_labels=labels[part]).sample[:, :channels]
            errors.append((prediction - target[part]).square().mean(dim=(1, 2, 3)))
        out[int(t)] = float(torch.cat(errors).mean())
    return out


def retrieval_gain(pipe, timesteps: Sequence[int] = TIMESTEPS, images: int = 300, seed: int = 0,
                   layout: str = "tiles") -> dict:
    """Held-out epsilon-MSE on ``builtin:pairs`` (or ``builtin:pairs_crops``) and its unpaired control
    (test split), and their difference per timestep (unpaired - paired; > 0 when the partner is used)."""
    from nala_diffusion.data.datasets import load_dataset
    from nala_diffusion.diffusion.objectives import noise_schedule_for
    paired = load_dataset(DATASETS[layout], 32, split="test")
    unpaired = load_dataset(f"{DATASETS[layout]}_unpaired", 32, split="test")
    index = evenly(images, len(paired))
    scheduler = noise_schedule_for(pipe.transformer.config, pipe.scheduler)
    model = pipe.transformer.eval()
    result = {}
    for name, dataset in (("paired", paired), ("unpaired", unpaired)):
        result[name] = heldout_mse(model, scheduler, dataset.images[index], dataset.labels[index], timesteps, seed)
    result["gain"] = {t: result["unpaired"][t] - result["paired"][t] for t in result["paired"]}
    result["mean_gain"] = sum(result["gain"].values()) / len(result["gain"])
    result["relative_gain"] = {t: result["gain"][t] / result["unpaired"][t] for t in result["gain"]}
    result["images"] = len(index)
    return result


def window_mass(weights: torch.Tensor, partners: torch.Tensor, side: int, window: int) -> torch.Tensor:
    """weights (..., N, N) of one image, partners (N,) (-1 for queries without one): per query with a
    partner, the attention mass on the partner and the ``window`` tokens on each side of it in its
    row (cyclic). Returns (..., queries with a partner)."""
    queries = torch.nonzero(partners >= 0).flatten()
    partner = partners[queries]
    row, col = partner // side, partner % side
    columns = torch.stack([(col + d) % side for d in range(-window, window + 1)], dim=-1)  # (Q, 2w + 1)
    targets = row[:, None] * side + columns  # (Q, 2w + 1)
    rows = weights[..., queries, :]  # (..., Q, N)
    return rows.gather(-1, targets.expand(*rows.shape[:-2], *targets.shape)).sum(-1)


def layer_kind(processor) -> Optional[str]:
    """The attention_weights kind of a processor: its kernel name, for the four attention types."""
    name = getattr(processor, "attention_type", None)
    return name if name in ATTENTION_TYPES else None


@torch.no_grad()
def retrieval_mass(pipe, timesteps: Sequence[int] = TIMESTEPS, images: int = 8, seed: int = 0,
                   layout: str = "tiles") -> Dict[str, dict]:
    """Per self-attention layer: the mean retrieval mass (partner ± WINDOWS[layout] columns), its
    baseline (the window at another image's offset), rho(entropy, |q|) and the mean entropy, on
    noised paired test images.

    The masses come from the weights the layer applies to its values, RoPE included
    (:func:`~nala_diffusion.models.norm_awareness.applied_attention_weights`); entropy, rho and the
    norm effect from the distribution the kernel attends with
    (:func:`~nala_diffusion.models.norm_awareness.distribution_inputs`: for softmax with RoPE, that of
    the rotated queries and keys; for a linear kernel with RoPE, whose applied weights are not a
    distribution since the rotation acts in the numerator only, that of the unrotated pair)."""
    from nala_diffusion.data import builtin_pairs
    from nala_diffusion.data.datasets import load_dataset
    from nala_diffusion.diffusion.noising import noised_copies
    from nala_diffusion.diffusion.objectives import noise_schedule_for
    from nala_diffusion.eval.attention_entropy import spearman
    from nala_diffusion.models import norm_awareness, swap
    from nala_diffusion.ops import attention_weights
    model = pipe.transformer.eval()
    patch = model.config.patch_size
    side = 32 // patch
    window = WINDOWS[layout]
    dataset = load_dataset(DATASETS[layout], 32, split="test")
    index = evenly(images, len(dataset))
    x0, labels = dataset.images[index], dataset.labels[index]
    offsets = dataset.offsets[index]
    wrong = offsets.roll(1)  # another image's offset; where it is equal, shift it by one patch more
    wrong = torch.where(wrong == offsets, (wrong + patch) % 32, wrong)
    scheduler = noise_schedule_for(pipe.transformer.config, pipe.scheduler)
    generator = torch.Generator().manual_seed(seed)
    processors = {name: attn.processor for name, attn in swap.self_attention_modules(model)}
    partners = [builtin_pairs.partner_tokens(int(o), patch) for o in offsets]
    wrong_partners = [builtin_pairs.partner_tokens(int(o), patch) for o in wrong]
    sums: Dict[str, dict] = {}
    for t in timesteps:
        noisy, _, steps = noised_copies(scheduler, x0, [t], generator, model.config)
        with norm_awareness.capture_queries(model, keys=True) as captured:
            model(noisy, timestep=steps, class_labels=labels)
        for name, tensors in captured.items():
            processor = processors[name]
            kind = layer_kind(processor)
            if kind is None:
                continue
            options = processor.kernel_params().detached()
            q, k = norm_awareness.distribution_inputs(processor, tensors["query"], tensors["key"], (side, side))
            weights = attention_weights.attention_weights(kind, q, k, options)  # (B, H, N, N)
            # the mass is read from the weights the layer applies: with RoPE (captured q and k are
            # unrotated) those are the kernel's own on identity values
            if getattr(processor, "use_rope", False):
                applied = norm_awareness.applied_attention_weights(processor, tensors["query"], tensors["key"],
                                                                   (side, side))
            else:
                applied = weights
            masses = [window_mass(applied[b], partners[b], side, window) for b in range(len(x0))]
            baselines = [window_mass(applied[b], wrong_partners[b], side, window) for b in range(len(x0))]
            entropy = attention_weights.entropy(weights)
            norms = q.double().norm(dim=-1)
            entry = sums.setdefault(name, {"kind": kind, "mass": [], "baseline": [], "rho": [], "entropy": [],
                                           "norm_effect": []})
            entry["mass"].append(float(torch.stack(masses).mean()))
            entry["baseline"].append(float(torch.stack(baselines).mean()))
            entry["rho"].append(spearman(entropy, norms))
            entry["entropy"].append(float(entropy.mean()))
            entry["norm_effect"].append(attention_weights.norm_effect(kind, q, k, options))
    return {name: {"kind": e["kind"], **{key: sum(e[key]) / len(e[key]) for key in MASS_MEASURES},
                   "uniform": (2 * window + 1) / side ** 2}
            for name, e in sums.items()}


def measure(model_dir: str, timesteps: Sequence[int] = TIMESTEPS, gain_images: int = 300, mass_images: int = 8,
            seed: int = 0, layout: str = "tiles") -> dict:
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline
    if layout not in DATASETS:
        raise ValueError(f"layout must be one of {sorted(DATASETS)}, got {layout!r}")
    pipe = NaLaDiTPipeline.from_pretrained(model_dir)
    if pipe.default_sample_size != 32 or pipe.vae is not None:
        raise ValueError(f"{model_dir!r} is not a 32 x 32 pixel-space model; builtin:pairs needs one")
    result = {"model": os.path.abspath(model_dir), "timesteps": list(timesteps), "layout": layout,
              "gain": retrieval_gain(pipe, timesteps, gain_images, seed, layout),
              "mass": retrieval_mass(pipe, timesteps, mass_images, seed, layout)}
    return json.loads(json.dumps(result))  # as written and read back: timestep keys are strings


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-retrieval",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder of a 32 x 32 pixel-space model")
    p.add_argument("--json", required=True, help="write the measures here")
    p.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS), help="noise levels")
    p.add_argument("--gain_images", type=positive_int, default=300, help="held-out images of each set for the gain")
    p.add_argument("--mass_images", type=positive_int, default=8, help="paired images for the attention mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--layout", choices=sorted(DATASETS), default="tiles",
                   help="the task: 'tiles' (builtin:pairs) or 'crops' (builtin:pairs_crops)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = measure(args.model, args.timesteps, args.gain_images, args.mass_images, args.seed, args.layout)
    except OSError as error:
        print(f"nala-retrieval: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        return exit_on_input_error("nala-retrieval", error)
    write_json_atomically(args.json, result)
    gain = result["gain"]
    print("retrieval gain (unpaired - paired eps-MSE): " + ", ".join(f"t={t}: {g:+.5f}" for t, g in gain["gain"].items()))
    for name, layer in result["mass"].items():
        print(f"{name}: retrieval mass {layer['mass']:.3f} (baseline {layer['baseline']:.3f}, uniform {layer['uniform']:.3f})")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
