"""The retrieval study (``nala-study --study retrieval``): on builtin:pairs, where denoising one half of an
image is helped by finding its partner in the other, how much of softmax's advantage over ReLU linear
attention each kind recovers (gap share), with each layer's partner mass and norm effect, and the cost
of a 16k-token forward pass."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nala_diffusion.eval import retrieval
from nala_diffusion.eval.studies.common import (
    ARCHITECTURE,
    Kind,
    cached,
    markdown_table,
    mean_std,
    run_info,
    run_training,
    train,
    write_results,
)
from nala_diffusion.train.run_config import flags_of
from nala_diffusion.utils.files import write_json_atomically

# builtin:pairs at patch 4, 64 tokens per image (a training step at patch 2, 256 tokens, costs about
# four times as much: 2.3 s at batch 32 on the 2-core development machine, too slow for five models at a
# useful step count; see docs/results.md)
RETRIEVAL_ARCHITECTURE = {**ARCHITECTURE, "patch_size": 4}
# the calibrated budget and task (docs/results.md, "Calibration"): timesteps where a token can be recognised
RETRIEVAL_TRAINING = {"steps": 10000, "batch_size": 32, "learning_rate": 1e-3, "timestep_range": [0, 500],
                      "retrieval_timesteps": list(retrieval.TIMESTEPS)}
NALA = Kind("nala", {"norm_scale_mode": "calibrated"})  # relu_split inhibit, power scale 3
#: share of the scratch budget a conversion arm fine-tunes for (3,000 steps at the default 10,000)
CONVERSION_FRACTION = 0.3
#: the weight of the attention-output distillation (LinFusion and CLEAR weigh theirs 0.5)
ATTENTION_DISTILLATION_WEIGHT = 0.5


@dataclass(frozen=True)
class ConversionArm:
    """A kind made from a softmax model of its seed (``runs/retrieval_conversion_anchor_s<seed>``, trained as the
    softmax kind is): converted to ``target`` (``nala-train --init_from``,
    sigma calibrated on one training batch from the anchor's own queries), then fine-tuned for
    CONVERSION_FRACTION of the scratch budget with the noise loss and the ``distillation`` terms
    (``"output"``: MSE to the anchor's prediction; ``"attention"``: MSE between each block's attention
    output and the anchor's). ``zero_shot``: one step at learning rate 0, which goes through the same
    conversion and calibration and changes no weight."""

    target: Kind
    distillation: Tuple[str, ...] = ()
    zero_shot: bool = False

    def steps(self, scratch_steps: int) -> int:
        return 1 if self.zero_shot else max(1, round(CONVERSION_FRACTION * scratch_steps))

    def settings(self, anchor: str) -> Dict[str, Any]:
        """The RunConfig settings of this arm, from the ``anchor`` softmax model."""
        settings: Dict[str, Any] = {"init_from": anchor, **self.target.settings()}
        if "output" in self.distillation:
            settings["teacher"] = anchor
        if "attention" in self.distillation:
            settings["attention_distillation_weight"] = ATTENTION_DISTILLATION_WEIGHT
        return {**settings, **({"learning_rate": 0} if self.zero_shot else {})}

    def train_flags(self, anchor: str) -> List[str]:
        """The ``nala-train`` flags of :meth:`settings` (the runs' recorded ``arguments``)."""
        return flags_of(self.settings(anchor))


def conversion_arms(name: str, target: Kind) -> Dict[str, ConversionArm]:
    """The conversion route to ``target``: zero-shot, then fine-tuned with the noise loss alone, plus output
    distillation, plus attention-output distillation."""
    return {f"convert_{name}_zero_shot": ConversionArm(target, zero_shot=True),
            f"convert_{name}_noise": ConversionArm(target),
            f"convert_{name}_output_distill": ConversionArm(target, ("output",)),
            f"convert_{name}_attention_distill": ConversionArm(target, ("output", "attention"))}


RETRIEVAL_VARIANTS: Dict[str, Union[Kind, "ConversionArm"]] = {
    "softmax": Kind("softmax"),
    "relu_linear": Kind("relu_linear"),
    "elu_linear": Kind("elu_linear"),
    "nala_calibrated": NALA,
    "nala_cosine": NALA.but(inhibit="cosine"),
    "nala_rope": NALA.but(use_rope=True),
    "nala_gate": NALA.but(use_gate=True),
    "nala_learnable_power": NALA.but(learnable_power=True),
    # the larger power scale on the relu_split kernel: cosine inhibit retrieved no better (docs/results.md)
    "nala_power6": NALA.but(power_scale=6),
    "hybrid_nala": NALA.but(softmax_layers=[-1]),
    # the control that separates the hybrid layout's effect from NaLa's
    "hybrid_relu_linear": Kind("relu_linear", softmax_layers=(-1,)),
    "nala_sigma1": Kind("nala", {"norm_scale_mode": "fixed", "norm_scale": 1}),
    # round two: the cosine inhibit where its angle is not saturated (at 20 it is relu_split's ±pi/4)
    "nala_cosine_sharp2": NALA.but(inhibit="cosine", angle_sharpness=2),
    "nala_cosine_sharp5": NALA.but(inhibit="cosine", angle_sharpness=5),
    # NaLaFormer's released layout ratio: the last two of four blocks softmax
    "hybrid_nala_last2": NALA.but(softmax_layers=[-2, -1]),
    "hybrid_relu_linear_last2": Kind("relu_linear", softmax_layers=(-2, -1)),
    # NaLaFormer's released block, every component on: RoPE, LePE 5x5 (trunc-normal), LayerNorm(o) * SiLU(gate),
    # convolutional positions before attention and FFN, sigma = 1 as released; then the same with calibrated sigma
    "nala_official": Kind("nala", {"norm_scale_mode": "fixed", "norm_scale": 1, "use_rope": True, "lepe_kernel_size": 5,
                                   "lepe_init": "trunc_normal", "use_gate": True}, model={"use_cpe": True}),
    "nala_official_calibrated": Kind("nala", {"norm_scale_mode": "calibrated", "use_rope": True, "lepe_kernel_size": 5,
                                              "lepe_init": "trunc_normal", "use_gate": True}, model={"use_cpe": True}),
    # learning dynamics: NaLa (calibrated) at three learning rates, partner mass measured every 1,000 steps
    "nala_lr3e-4": NALA.but(learning_rate=3e-4, track_every=1000),
    "nala_lr1e-3": NALA.but(learning_rate=1e-3, track_every=1000),
    "nala_lr3e-3": NALA.but(learning_rate=3e-3, track_every=1000),
    # the conversion route: every arm from the softmax anchor of its seed; ReLU linear is the control
    **conversion_arms("nala", NALA),
    **conversion_arms("relu_linear", Kind("relu_linear")),
}
ANCHORS = ("softmax", "relu_linear")  # the two ends of the gap every other kind is placed in
# what --study retrieval trains without --kinds (nala_sigma1 belongs to the first version of the study)
RETRIEVAL_DEFAULT_KINDS = [kind for kind in RETRIEVAL_VARIANTS if kind != "nala_sigma1"]


# the token count at which each kind's forward time is measured (a 512 x 512 image at patch 4)
COST_TOKENS = 16384


def kind_model(out: str, settings: Mapping[str, Any]):
    """The study's model (OUT/model_config.json) with one kind's attention settings, as nala-train builds
    it, randomly initialised: for timing."""
    from nala_diffusion.data.builtin_pairs import SIZE
    from nala_diffusion.data.builtin_photos import PHOTOS
    from nala_diffusion.train.run_config import RunConfig
    from nala_diffusion.train.run_model import build_model

    config = RunConfig(dataset="builtin:pairs", output_dir=out, max_train_steps=1,
                       model_config=os.path.join(out, "model_config.json"), **settings)
    model, _ = build_model(config, 3, SIZE, len(PHOTOS))  # RGB builtin:pairs images, one class a photo
    return model.eval()


def forward_costs(out: str, kinds: Sequence[str], tokens: int = COST_TOKENS, repeats: int = 3) -> Dict[str, float]:
    """Seconds of one forward pass (batch 1, ``tokens`` tokens) of every kind's model, timed in one
    interleaved run (medians; :func:`nala_diffusion.eval.timing.interleaved_medians`), so their
    ratios are fair. Cached in OUT/scores/forward_cost_<tokens>.json; a later call for a subset of the
    kinds timed there reuses it, one with a kind not timed there times all its kinds again."""
    from nala_diffusion.eval import timing

    def measure():
        with open(os.path.join(out, "model_config.json"), encoding="utf-8") as handle:
            side = math.isqrt(tokens) * json.load(handle)["patch_size"]
        x, t, y = torch.randn(1, 3, side, side), torch.tensor([100]), torch.tensor([0])
        calls = {}
        for kind in kinds:
            variant = RETRIEVAL_VARIANTS[kind]  # a conversion arm costs what its target kind costs
            model = kind_model(out, (variant.target if isinstance(variant, ConversionArm) else variant).settings())
            calls[kind] = lambda model=model: model(x, timestep=t, class_labels=y)
        with torch.no_grad():
            seconds = timing.interleaved_medians(calls, torch.device("cpu"), repeats)
        return {"tokens": tokens, "threads": torch.get_num_threads(), "seconds": seconds}

    path = os.path.join(out, "scores", f"forward_cost_{tokens}.json")
    cost = cached(path, measure)
    if not set(kinds) <= set(cost["seconds"]):  # more kinds since: all again, in one run
        os.remove(path)
        cost = cached(path, measure)
    # a run that timed more kinds serves any subset of them (ratios from one interleaved run)
    return {**cost, "seconds": {kind: cost["seconds"][kind] for kind in kinds}}


def retrieval_study(args, argv) -> dict:
    """Train every RETRIEVAL_VARIANTS kind per seed on builtin:pairs_mixed (half the images paired, so
    that the control is not out of distribution), then measure retrieval gain and mass
    (:mod:`nala_diffusion.eval.retrieval`) on the held-out split."""
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]),
               "architecture": args.architecture, "layout": args.pairs_layout,
               "timesteps": list(args.retrieval_timesteps), "timestep_range": args.timestep_range, "runs": {}}
    dataset = f"{retrieval.DATASETS[args.pairs_layout]}_mixed"
    missing = []

    def run(kind: str, seed: int) -> Optional[dict]:
        name = f"retrieval_{kind}_s{seed}"
        if args.report_only and not os.path.exists(os.path.join(args.out, "runs", name, "study_run.json")):
            if name not in missing:
                missing.append(name)
            return None
        variant = RETRIEVAL_VARIANTS[kind]
        if isinstance(variant, ConversionArm):
            # from a softmax model of this seed trained as the softmax kind is, kept with its weights in its own
            # folder (the softmax kind's records may have been copied without them)
            anchor = train(args.out, f"retrieval_conversion_anchor_s{seed}", RETRIEVAL_VARIANTS["softmax"].settings(),
                           args.steps, seed, args, dataset=dataset)
            info = train(args.out, name, variant.settings(anchor["folder"]), variant.steps(args.steps), seed, args,
                         dataset=dataset)
        elif variant.track_every or getattr(args, "track_every", 0):
            every = variant.track_every or args.track_every
            info = tracked_train(args, name, variant.settings(), seed, dataset, every)
        else:
            info = train(args.out, name, variant.settings(), args.steps, seed, args, dataset=dataset)
        path = os.path.join(args.out, "scores", f"{name}.json")
        return {**info, **cached(path, lambda: retrieval.measure(info["folder"], args.retrieval_timesteps,
                                                                 gain_images=args.retrieval_images, mass_images=8,
                                                                 layout=args.pairs_layout))}

    for kind in args.kinds or RETRIEVAL_DEFAULT_KINDS:
        finished = [r for r in (run(kind, seed) for seed in args.seeds) if r is not None]
        if finished:
            results["runs"][kind] = finished
    if args.tiebreak_seed:
        # a kind above ReLU linear on one seed and not on another gets one more seed, with the anchors
        # trained on it too so that its gap share has its own denominator
        extra = max(args.seeds) + 1
        for kind in [k for k in results["runs"] if order_disagrees(results, k)]:
            print(f"nala-study: {kind}'s seeds disagree on its order against relu_linear; "
                  f"{'it needs' if args.report_only else 'training'} seed {extra}",
                  file=sys.stderr)
            for name in (*ANCHORS, kind):
                if all(r["seed"] != extra for r in results["runs"][name]) and (finished := run(name, extra)):
                    results["runs"][name].append(finished)
    results["missing"] = missing
    if not results["runs"]:
        raise ValueError(f"no finished retrieval runs in {args.out}: run without --report_only to train them")
    results["forward_cost"] = forward_costs(args.out, list(results["runs"]),
                                            getattr(args, "cost_tokens", None) or COST_TOKENS)
    plot_retrieval(results, os.path.join(args.out, "retrieval_gain.png"))
    return results


def latest_checkpoint_step(folder: str) -> int:
    steps = [int(d.split("-")[1]) for d in os.listdir(folder) if d.startswith("checkpoint-")] if os.path.isdir(folder) else []
    return max(steps, default=0)


def tracked_train(args, name: str, settings: Mapping[str, Any], seed: int, dataset: str, every: int) -> dict:
    """A run trained in chunks of ``every`` steps, each resumed from the last (the run continues exactly as
    one uninterrupted run), with every layer's partner mass measured after each chunk (8 held-out images,
    as the final measure): the record's ``partner_mass_track`` is ``{step: {layer: mass}}``, also kept in
    OUT/scores/NAME_track.json so that an interrupted study goes on from the last measured chunk."""
    folder = os.path.join(args.out, "runs", name)

    def compute() -> dict:
        from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

        path = os.path.join(args.out, "scores", f"{name}_track.json")
        track = cached(path, dict)
        chunk_settings = {**settings, "checkpointing_steps": every}
        for stop in sorted({*range(every, args.steps, every), args.steps}):
            if str(stop) in track:
                continue
            if latest_checkpoint_step(folder) < stop:
                run_training(folder, args.out, chunk_settings, stop, seed, args, dataset)
            pipe = NaLaDiTPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            mass = retrieval.retrieval_mass(pipe, args.retrieval_timesteps, images=8, layout=args.pairs_layout)
            track[str(stop)] = {layer: values["mass"] for layer, values in mass.items()}
            write_json_atomically(path, track, sort_keys=False)
        return {**run_info(folder, chunk_settings, args.steps, seed, args), "partner_mass_track": track}

    return cached(os.path.join(folder, "study_run.json"), compute)


def run_retrieval_study(args, argv, context=None) -> int:
    return write_results(args.out, retrieval_study(args, argv), retrieval_tables)


def gap_closed(results: dict, kind: str) -> List[float]:
    """Per seed of ``kind`` that both anchors were trained on: (gain(kind) - gain(ReLU linear)) /
    (gain(softmax) - gain(ReLU linear)), mean gains over timesteps, each anchor on the same seed."""
    runs = results["runs"]
    if not set(ANCHORS) <= set(runs):
        return []
    soft, relu = ({r["seed"]: r["gain"]["mean_gain"] for r in runs[anchor]} for anchor in ANCHORS)
    out = []
    for run in runs[kind]:
        seed = run["seed"]
        if seed in soft and seed in relu:
            gap = soft[seed] - relu[seed]
            out.append((run["gain"]["mean_gain"] - relu[seed]) / gap if gap else float("nan"))
    return out


def order_disagrees(results: dict, kind: str) -> bool:
    """Whether ``kind`` (not an anchor) retrieves better than ReLU linear on some seeds and not on others."""
    return kind not in ANCHORS and len({share > 0 for share in gap_closed(results, kind)}) > 1


def last_layer(run: dict) -> dict:
    return list(run["mass"].values())[-1]


def retrieval_tables(results: dict) -> str:
    """The retrieval study's tables: quality and cost per kind; gain per timestep; mass, rho and the
    norm effect per layer."""
    timesteps = [str(t) for t in results["timesteps"]]
    runs_by_kind = results["runs"]
    cost = results.get("forward_cost", {})
    seconds = cost.get("seconds", {})
    lines = [f"Command: `{results['command']}`", "",
             "Quality and cost per kind (mean ± sd over seeds; the gap share per seed in brackets; last layer = the "
             f"last self-attention; forward = one {cost.get('tokens', COST_TOKENS):,}-token forward pass, batch 1, "
             f"{cost.get('threads', '?')} threads, all kinds timed in one interleaved run):", ""]
    if results.get("missing"):
        lines[1:1] = ["", "Not yet trained (tables from the finished runs only): " + ", ".join(results["missing"])]
    rows = []
    for kind, runs in runs_by_kind.items():
        shares = gap_closed(results, kind)
        share = "–" if kind in ANCHORS or not shares else (
            f"{mean_std(shares)} [{', '.join(f'{v:.3f}' for v in shares)}]")
        loss = mean_std([(sum(r["gain"]["paired"].values()) + sum(r["gain"]["unpaired"].values())) / (2 * len(timesteps))
                         for r in runs])
        last = [last_layer(r) for r in runs]
        effect = mean_std([m["norm_effect"] for m in last]) if all("norm_effect" in m for m in last) else "–"
        forward = seconds.get(kind)
        ratio = f"{forward / seconds['softmax']:.3f}" if forward and seconds.get("softmax") else "–"
        rows.append([kind, len(runs), mean_std([r["gain"]["mean_gain"] for r in runs]), share,
                     f"{mean_std([m['mass'] for m in last])} ({mean_std([m['baseline'] for m in last])})", effect, loss,
                     mean_std([r["seconds_per_step"] for r in runs]), f"{forward:.3f}" if forward else "–", ratio])
    lines += markdown_table(["attention", "seeds", "mean gain", "share of the ReLU → softmax gap",
                             "last-layer partner mass (baseline)", "last-layer dH/dlog‖q‖", "held-out loss", "s/step",
                             "forward (s)", "forward / softmax"], rows)
    lines += ["", "Retrieval gain per timestep (unpaired − paired ε-MSE) and relative to the control's loss:", ""]
    lines += markdown_table(["attention", *(f"gain t={t}" for t in timesteps), "relative gain (mean)"], (
        [kind, *(mean_std([r["gain"]["gain"][t] for r in runs]) for t in timesteps),
         mean_std([sum(r["gain"]["relative_gain"].values()) / len(timesteps) for r in runs])]
        for kind, runs in runs_by_kind.items()))
    first = next(iter(runs_by_kind.values()))[0]
    uniform = next(iter(first["mass"].values()))["uniform"]
    window = retrieval.WINDOWS[results.get("layout", "crops")]
    target = "the partner token" if window == 0 else f"the partner ± {window} column"
    lines += ["", f"Retrieval mass per layer ({target}; baseline: the same at a wrong offset; "
              f"uniform attention: {uniform:.3f}), rho(entropy, |q|), the norm effect dH/dlog|q| and the mean entropy:", ""]
    rows = []
    for kind, runs in runs_by_kind.items():
        for layer in runs[0]["mass"]:
            values = [r["mass"][layer] for r in runs]
            effect = mean_std([v["norm_effect"] for v in values]) if all("norm_effect" in v for v in values) else "–"
            rows.append([kind, layer.split(".")[1], values[0]["kind"], mean_std([v["mass"] for v in values]),
                         mean_std([v["baseline"] for v in values]), mean_std([v["rho"] for v in values]), effect,
                         mean_std([v["entropy"] for v in values])])
    lines += markdown_table(["attention", "layer", "kernel", "mass", "baseline", "rho", "dH/dlog‖q‖", "mean entropy"], rows)
    tracked = {kind: runs for kind, runs in runs_by_kind.items() if all("partner_mass_track" in r for r in runs)}
    if tracked:
        steps = sorted({int(s) for runs in tracked.values() for r in runs for s in r["partner_mass_track"]})
        lines += ["", "Last-layer partner mass during training (mean ± sd over seeds), measured after every chunk:", ""]
        lines += markdown_table(["attention", *(f"step {s:,}" for s in steps)], (
            [kind, *(mean_std([list(r["partner_mass_track"][str(s)].values())[-1] for r in runs
                               if str(s) in r["partner_mass_track"]]) for s in steps)]
            for kind, runs in tracked.items()))
    return "\n".join(lines) + "\n"


def plot_retrieval(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["runs"])
    # one colour and marker per kind, the same in both panels (the default cycle repeats after ten)
    colour = {kind: plt.get_cmap("tab20")(i % 20) for i, kind in enumerate(kinds)}
    marker = {kind: "osD^v<>"[i % 7] for i, kind in enumerate(kinds)}
    legend_columns = math.ceil(len(kinds) / 16)  # a column holds 16 kinds at this height
    legend_width, width = 2.5 * legend_columns, 17 + 2.5 * legend_columns  # inches
    fig, axes = plt.subplots(1, 3, figsize=(width, 4.5))
    for i, kind in enumerate(kinds):
        gains = [r["gain"]["mean_gain"] for r in results["runs"][kind]]
        axes[0].bar(i, sum(gains) / len(gains), color="C0", alpha=0.6)
        axes[0].plot([i] * len(gains), gains, "ko", ms=4)
        masses = [[layer["mass"] for layer in r["mass"].values()] for r in results["runs"][kind]]
        layers = range(len(masses[0]))
        axes[1].plot(layers, [sum(m[j] for m in masses) / len(masses) for j in layers], "-",
                     marker=marker[kind], color=colour[kind], label=kind)
    axes[0].set_xticks(range(len(kinds)), kinds, rotation=40, ha="right", rotation_mode="anchor")
    axes[0].set(ylabel="unpaired - paired eps-MSE", title="retrieval gain (mean over t; dots: seeds)")
    uniform = next(iter(results["runs"][kinds[0]][0]["mass"].values()))["uniform"]
    axes[1].axhline(uniform, color="grey", ls="--", label="uniform")
    window = retrieval.WINDOWS[results.get("layout", "crops")]
    axes[1].set_xticks(list(range(len(masses[0]))))
    axes[1].set(xlabel="layer", ylabel="attention mass on the partner" + (f" ± {window}" if window else ""),
                title="retrieval mass (mean over seeds)")
    seconds = results.get("forward_cost", {}).get("seconds", {})
    for kind in kinds:
        shares = gap_closed(results, kind)
        if kind in seconds and shares:
            axes[2].errorbar(seconds[kind], float(np.mean(shares)), yerr=float(np.std(shares)), fmt=marker[kind], capsize=3,
                             color=colour[kind], label=kind)  # a legend, not labels: kinds of one cost overlap
    tokens = results.get("forward_cost", {}).get("tokens", COST_TOKENS)
    axes[2].set_xscale("log")
    axes[2].set(xlabel=f"forward seconds at {tokens:,} tokens (log)", ylabel="share of the ReLU -> softmax gap",
                title="quality against cost (bars: sd over seeds)")
    # one legend for both panels (same colour and marker per kind), beside them: inside it would hide points
    fig.legend(*axes[1].get_legend_handles_labels(), loc="center right", fontsize=8, ncol=legend_columns)
    fig.tight_layout(rect=(0, 0, 1 - legend_width / width, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
