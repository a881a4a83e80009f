"""The retrieval study across token counts: one ``nala-study --study retrieval`` record per token count, read
together into one table and one figure (gap share and last-layer attention entropy against the token count,
one line per kind, each seed a point).

    python -m nala_diffusion.eval.studies.token_scaling \\
        --records 64=docs/results/retrieval_calibrated 256=docs/results/retrieval_tokens/patch2 \\
        --out docs/results/retrieval_tokens/token_scaling

writes OUT.md (the table) and OUT.png (the figure). Nothing is trained or measured: the records are read as
they are, so a token count whose runs are not all trained shows what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from nala_diffusion.eval.studies.common import markdown_table, mean_std
from nala_diffusion.eval.studies.retrieval import ANCHORS, gap_closed, last_layer

#: the kinds the token-scaling study compares
KINDS = ("softmax", "relu_linear", "nala_calibrated", "hybrid_nala")


def read_record(folder: str) -> dict:
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} holds no results.json: run nala-study --study retrieval --report_only there first")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def per_kind(results: dict, kinds: Sequence[str] = KINDS) -> Dict[str, dict]:
    """For each kind recorded: per seed its gap share (None where an anchor of that seed is missing), gain,
    last-layer entropy, partner mass and baseline, and norm effect."""
    out = {}
    for kind in kinds:
        runs = results["runs"].get(kind)
        if not runs:
            continue
        shares = dict(zip((r["seed"] for r in runs if _has_anchors(results, r["seed"])), gap_closed(results, kind)))
        out[kind] = {r["seed"]: {"gap_share": shares.get(r["seed"]), "gain": r["gain"]["mean_gain"],
                                 "entropy": last_layer(r).get("entropy"), "mass": last_layer(r)["mass"],
                                 "baseline": last_layer(r)["baseline"], "norm_effect": last_layer(r).get("norm_effect"),
                                 "steps": r["steps"]} for r in runs}
    return out


def _has_anchors(results: dict, seed: int) -> bool:
    return all(any(r["seed"] == seed for r in results["runs"].get(anchor, [])) for anchor in ANCHORS)


def table(records: Dict[int, dict]) -> str:
    """One row per token count and kind: steps, gap share per seed, the softmax/ReLU gain ratio, last-layer
    entropy, partner mass (baseline) and norm effect (mean ± sd over seeds)."""
    rows = []
    for tokens, results in sorted(records.items()):
        kinds = per_kind(results)
        ratio = _gain_ratio(kinds)
        for kind, seeds in kinds.items():
            values = list(seeds.values())
            shares = [v["gap_share"] for v in values if v["gap_share"] is not None]
            rows.append([f"{tokens:,}", kind, "/".join(str(v["steps"]) for v in values),
                         ", ".join(f"{s:+.3f}" for s in shares) or "–", ratio,
                         mean_std([v["entropy"] for v in values]),
                         f"{mean_std([v['mass'] for v in values])} ({mean_std([v['baseline'] for v in values])})",
                         mean_std([v["norm_effect"] for v in values])])
    header = ["tokens", "kind", "steps", "gap share per seed", "softmax gain / ReLU gain per seed", "last-layer entropy",
              "last-layer partner mass (baseline)", "last-layer dH/dlog‖q‖"]
    return "\n".join(markdown_table(header, rows)) + "\n"


def _gain_ratio(kinds: Dict[str, dict]) -> str:
    """Softmax's gain over ReLU linear's, per seed that has both anchors (the gap share's pairing)."""
    if not all(anchor in kinds for anchor in ANCHORS):
        return "–"
    seeds = [seed for seed in kinds["softmax"] if seed in kinds["relu_linear"]]
    pairs = [(kinds["softmax"][seed]["gain"], kinds["relu_linear"][seed]["gain"]) for seed in seeds]
    return ", ".join(f"{soft / relu:.2f}" if relu > 0 else f"{soft:.4f} / {relu:.4f}" for soft, relu in pairs) or "–"


def plot(records: Dict[int, dict], path: str) -> None:
    """Gap share (left) and last-layer entropy (right) against the token count: one line per kind through the
    seed means, each seed a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    counts = sorted(records)
    for index, kind in enumerate(KINDS):
        colour, marker = f"C{index}", "osD^"[index]
        for panel, key in ((axes[0], "gap_share"), (axes[1], "entropy")):
            points = [(tokens, v[key]) for tokens in counts
                      for v in per_kind(records[tokens]).get(kind, {}).values() if v[key] is not None]
            if not points:
                continue
            panel.plot(*zip(*points), marker, color=colour, alpha=0.6, ms=5)
            means = [(t, float(np.mean([p for q, p in points if q == t]))) for t in counts if any(q == t for q, _ in points)]
            panel.plot(*zip(*means), "-", color=colour, label=kind)
    steps = {tokens: max((r["steps"] for runs in records[tokens]["runs"].values() for r in runs), default=0)
             for tokens in counts}
    for panel in axes:
        panel.set_xscale("log", base=2)
        panel.set_xticks(counts, [f"{c:,}\n({steps[c]:,} steps)" for c in counts])
        panel.set_xlabel("tokens (training budget)")
    axes[1].plot(counts, [float(np.log(c)) for c in counts], "--", color="grey", lw=0.8, label="uniform attention, ln N")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].axhline(1, color="grey", lw=0.8, ls="--")
    axes[0].set(ylabel="share of the ReLU -> softmax retrieval gap", title="gap share (points: seeds)")
    axes[1].set(ylabel="mean attention entropy, last layer (nats)", title="last-layer entropy (points: seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nala_diffusion.eval.studies.token_scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--records", nargs="+", required=True, metavar="TOKENS=FOLDER",
                   help="one retrieval study folder per token count")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.png")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    records: Dict[int, dict] = {}
    try:
        for entry in args.records:
            tokens, _, folder = entry.partition("=")
            if not tokens.isdigit() or not folder:
                raise ValueError(f"--records {entry!r}: give TOKENS=FOLDER, e.g. 256=docs/results/retrieval_tokens/patch2")
            records[int(tokens)] = read_record(folder)
    except ValueError as error:
        print(f"token_scaling: error: {error}", file=sys.stderr)
        return 2
    text = table(records)
    lines: List[str] = [f"Command: `python -m nala_diffusion.eval.studies.token_scaling --records {' '.join(args.records)} "
                        f"--out {args.out}`", "", text]
    with open(f"{args.out}.md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    plot(records, f"{args.out}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
