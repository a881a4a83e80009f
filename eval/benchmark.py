"""nala-bench: time and memory of attention kernels and of whole DiTs, side by side, in one run.

    nala-bench --out docs/benchmarks/cpu                       # op level 256..65,536 tokens, DiT-S/2 models
    nala-bench --tokens 256 1024 --skip_model --out /tmp/bench # quick

Op level: softmax SDPA, diffusers' plain attention (scores materialised as AttnProcessor does), ReLU
linear (the project's, and SANA's processor arithmetic), 1+ELU linear, NaLa written literally
(explicit features) and the project's NaLa, per call, as ratios against SDPA, both ReLU linears and
the literal NaLa; NaLa fused by ``torch.compile`` (``nala_compiled``, its compilation is the
warm-up); and the readout products alone, which bound how close NaLa (2d features) can come to ReLU
linear (d features). Model level: a DiT-S/2 forward at many tokens, and forward+backward at the
training size, NaLa against softmax. Medians of repeated runs after warm-up; peak memory is the
largest total of live tensor bytes during a call (CUDA: ``torch.cuda.max_memory_allocated``).
Writes ``results.json`` and ``benchmark.png``.
"""

import argparse
import functools
import json
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nala_diffusion.eval import benchmark_compile, benchmark_gpu
from nala_diffusion.eval.timing import (  # noqa: F401
    BlockPeaks,
    PeakBytes,
    interleaved_medians,
    median_seconds,
    peak_memory,
    synchronize,
)
from nala_diffusion.ops import linear_attention, nala_attention, nala_attention_explicit
from nala_diffusion.ops.gather import readout_table_width
from nala_diffusion.utils.cli_args import HelpFormatter, exit_on_input_error
from nala_diffusion.utils.files import write_json_atomically


def sana_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ReLU linear attention computed as diffusers' ``SanaLinearAttnProcessor2_0`` does: channels-first,
    the value padded with a row of ones so that one matmul gives numerator and denominator."""
    query = torch.relu(q).transpose(-1, -2).float()  # (B, H, d, N)
    key = torch.relu(k).float()  # (B, H, N, d)
    value = F.pad(v.transpose(-1, -2).float(), (0, 0, 0, 1), mode="constant", value=1.0)  # (B, H, d + 1, N)
    hidden = torch.matmul(torch.matmul(value, key), query)  # (B, H, d + 1, N)
    return (hidden[:, :, :-1] / (hidden[:, :, -1:] + 1e-15)).transpose(-1, -2).to(q.dtype)


KERNELS: Dict[str, Callable] = {
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "plain": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v,
    "relu_linear": lambda q, k, v: linear_attention(q, k, v, feature_map="relu"),
    "relu_linear_sana": sana_linear,
    "elu_linear": lambda q, k, v: linear_attention(q, k, v, feature_map="elu"),
    "nala_explicit": lambda q, k, v: nala_attention_explicit(q, k, v),
    "nala": lambda q, k, v: nala_attention(q, k, v),
    "nala_dense": lambda q, k, v: nala_attention(q, k, v, gather=False),  # the batched path other devices take
    "nala_compiled": lambda q, k, v: nala_attention(q, k, v, compile=True),
}
QUADRATIC = {"sdpa", "plain"}
COMPILED = {"nala_compiled"}  # the first call per shape compiles: it is warm-up, not timed


@torch.no_grad()
def op_level(tokens: Sequence[int], heads: int, head_dim: int, device, repeats: int, max_seconds: float,
             max_bytes: float) -> Dict[str, Dict[int, dict]]:
    results = {name: {} for name in KERNELS}
    last_time: Dict[str, tuple] = {}
    for n in tqdm(tokens, desc="op level"):
        q, k, v = (torch.randn(1, heads, n, head_dim, device=device) for _ in range(3))
        chosen = {}
        for name, kernel in KERNELS.items():
            if name == "plain" and heads * n * n * 4 * 2 > max_bytes:
                results[name][n] = {"skipped": f"the {n}x{n} score matrix needs more than {max_bytes / 2**30:.0f} GiB"}
                continue
            if name in last_time:
                seconds, previous = last_time[name]
                growth = (n / previous) ** (2 if name in QUADRATIC else 1)
                if seconds * growth * (repeats + 1) > max_seconds:
                    results[name][n] = {"skipped": f"estimated {seconds * growth:.0f} s per call"}
                    continue
            chosen[name] = kernel
        medians = interleaved_medians({name: (lambda kernel=kernel: kernel(q, k, v)) for name, kernel in chosen.items()},
                                      device, repeats)
        for name, kernel in chosen.items():
            seconds = medians[name]
            last_time[name] = (seconds, n)
            results[name][n] = {"seconds": seconds}
            if name in COMPILED and device.type != "cuda":
                # compiled kernels allocate their buffers outside the CPU probe's view
                results[name][n]["peak_bytes"] = None
            else:
                results[name][n]["peak_bytes"] = peak_memory(lambda: kernel(q, k, v), device)
    for name, by_tokens in results.items():
        for n, row in by_tokens.items():
            for base_name in ("sdpa", "relu_linear", "relu_linear_sana", "nala_explicit"):
                base = results[base_name].get(n, {}).get("seconds")
                if "seconds" in row and base:
                    row[f"time_vs_{base_name}"] = row["seconds"] / base
    return results


@torch.no_grad()
def matmul_floor(tokens: int, heads: int, head_dim: int, device, repeats: int) -> dict:
    """Time of the readout products alone (features given): the state (features x d, summed over the
    keys) and the output. ReLU linear has d features; NaLa has 2d, read densely (2 N 2d d) or, as
    the CPU kernel does, by a gather-sum of the d rows each query uses. The part of each kernel that
    no elementwise fusion can remove."""
    out = {"tokens": tokens}
    value = torch.randn(heads, tokens, head_dim, device=device)
    phi = {width: (torch.rand(heads, tokens, width, device=device), torch.rand(heads, tokens, width, device=device))
           for width in (head_dim, 2 * head_dim)}
    negative = torch.randn(heads * tokens, head_dim, device=device) < 0
    index = (torch.arange(head_dim, device=device) + head_dim * negative).to(torch.int32)  # as the kernel's
    magnitude = torch.rand(heads * tokens, head_dim, device=device)
    table = torch.randn(2 * head_dim, readout_table_width(head_dim), device=device)

    def product(width):
        phi_q, phi_k = phi[width]
        return lambda: torch.bmm(phi_q, torch.bmm(phi_k.transpose(1, 2), value))  # state (H, F, d), output (H, N, d)

    def gathered():
        phi_q, phi_k = phi[2 * head_dim]
        torch.bmm(phi_k.transpose(1, 2), value)
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=magnitude)

    calls = {"relu_linear": product(head_dim), "nala_dense": product(2 * head_dim), "nala_gather": gathered}
    for name, seconds in interleaved_medians(calls, device, max(repeats, 3)).items():
        out[name] = {"seconds": seconds}
    for name in ("nala_dense", "nala_gather"):
        out[f"{name}_vs_relu_linear"] = out[name]["seconds"] / out["relu_linear"]["seconds"]
    return out


def model_level(device, repeats: int, model_tokens: int, train_tokens: int, train_batch: int, preset: str) -> dict:
    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel
    out = {}
    torch.manual_seed(0)
    models = {kind: NaLaDiTTransformer2DModel.from_preset(preset, sample_size=32, attention_type=kind).to(device)
              for kind in ("softmax", "nala")}
    patch = models["nala"].config.patch_size
    for name, tokens, batch, train in (("forward", model_tokens, 1, False), ("forward_backward", train_tokens, train_batch, True)):
        side = int(round(tokens ** 0.5)) * patch
        x = torch.randn(batch, 4, side, side, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        row = {"tokens": (side // patch) ** 2, "batch": batch}
        steps = {}
        for kind, model in models.items():
            model.train(train)

            def step(model=model):
                if train:
                    model.zero_grad(set_to_none=True)
                    model(x, timestep=t, class_labels=y).sample.square().mean().backward()
                else:
                    with torch.no_grad():
                        model(x, timestep=t, class_labels=y)

            steps[kind] = step
        for kind, seconds in interleaved_medians(steps, device, repeats).items():
            row[kind] = {"seconds": seconds}
        row["nala_vs_softmax"] = row["nala"]["seconds"] / row["softmax"]["seconds"]
        out[name] = row
    return out


HYBRID_KINDS = ("nala", "hybrid", "softmax")


@torch.no_grad()
def hybrid_level(device, repeats: int, tokens: Sequence[int], preset: str, softmax_layers: Sequence[int],
                 max_seconds: float) -> Dict[int, dict]:
    """A DiT forward (batch 1) of three layouts of one preset, per token count: pure NaLa, the hybrid
    (``softmax_layers`` softmax, the rest NaLa; NaLaFormer's layout) and pure softmax (SDPA). Time
    (interleaved medians) and peak memory, the whole call's and per block (``BlockPeaks``); a layout
    whose run would pass ``max_seconds`` (estimated from the previous size) is skipped."""
    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel, preset_config
    torch.manual_seed(0)
    patch = preset_config(preset)["patch_size"]
    out: Dict[int, dict] = {}
    last: Dict[str, tuple] = {}
    for n in tqdm(tokens, desc="hybrid layouts"):
        side = int(round(n ** 0.5)) * patch
        n = (side // patch) ** 2
        layouts = {"nala": {}, "hybrid": {"softmax_layers": list(softmax_layers)}, "softmax": {"attention_type": "softmax"}}
        row: Dict[str, object] = {"softmax_layers": list(softmax_layers)}
        x = torch.randn(1, 4, side, side, device=device)
        t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
        calls = {}
        for kind, layout in layouts.items():
            if kind in last:
                seconds, previous = last[kind]
                growth = (n / previous) ** (1 if kind == "nala" else 2)
                if seconds * growth * (repeats + 1) > max_seconds:
                    row[kind] = {"skipped": f"estimated {seconds * growth:.0f} s per call"}
                    continue
            model = NaLaDiTTransformer2DModel.from_preset(preset, sample_size=side, in_channels=4, **layout).to(device).eval()
            call = functools.partial(model, x, timestep=t, class_labels=y)
            peaks = BlockPeaks(model, device)(call)  # also the warm-up
            kinds = model.layer_attention_types
            row[kind] = {"peak_bytes": peaks.peak, "block_peak_bytes": [peaks.blocks[i] for i in range(len(kinds))],
                         "softmax_block_peak_bytes": max([b for b, k in zip(peaks.blocks.values(), kinds) if k == "softmax"],
                                                         default=None),
                         "nala_block_peak_bytes": max([b for b, k in zip(peaks.blocks.values(), kinds) if k == "nala"],
                                                      default=None)}
            calls[kind] = call
        medians = interleaved_medians(calls, device, repeats, warmup=False)
        for kind, seconds in medians.items():
            row[kind]["seconds"] = seconds
            last[kind] = (seconds, n)
        for kind in ("hybrid", "softmax"):
            if kind in medians and "nala" in medians:
                row[f"{kind}_vs_nala"] = {"time": medians[kind] / medians["nala"],
                                          "peak": row[kind]["peak_bytes"] / row["nala"]["peak_bytes"]}
        out[n] = row
    return out


MODEL_PROCESSORS = ("nala", "sana", "sdpa")


def diffusers_dit(preset: str, layers: int, sample_size: int, device):
    """diffusers' own ``DiTTransformer2DModel`` at a preset's width (S/2: 6 heads x 64)."""
    from diffusers import DiTTransformer2DModel

    from nala_diffusion.models.transformer import preset_config

    config = preset_config(preset)
    return DiTTransformer2DModel(num_attention_heads=config["num_attention_heads"],
                                 attention_head_dim=config["attention_head_dim"], in_channels=4, num_layers=layers,
                                 sample_size=sample_size, patch_size=config["patch_size"]).to(device).eval()


def processor_sets(model) -> Dict[str, Dict[str, object]]:
    """For one model: its self-attention processors as NaLa (``set_nala_attention``), diffusers'
    ``SanaLinearAttnProcessor2_0`` and ``AttnProcessor2_0`` (SDPA), to swap call by call."""
    from diffusers.models.attention_processor import AttnProcessor2_0, SanaLinearAttnProcessor2_0

    from nala_diffusion import restore_attention, set_nala_attention

    sdpa = set_nala_attention(model)
    nala = {name: model.get_submodule(name.removesuffix(".processor")).processor for name in sdpa}
    restore_attention(model, sdpa)
    return {"nala": nala, "sana": {name: SanaLinearAttnProcessor2_0() for name in sdpa},
            "sdpa": {name: AttnProcessor2_0() for name in sdpa}}


@torch.no_grad()
def diffusers_model_level(device, repeats: int, tokens: Sequence[int], preset: str, layers: int) -> Dict[int, dict]:
    """A diffusers DiT forward (batch 1) with each processor set, interleaved, per token count."""
    from nala_diffusion import restore_attention
    from nala_diffusion.models.transformer import preset_config

    torch.manual_seed(0)
    patch = preset_config(preset)["patch_size"]
    out = {}
    for n in tqdm(tokens, desc="diffusers DiT"):
        side = int(round(n ** 0.5)) * patch
        model = diffusers_dit(preset, layers, side, device)
        sets = processor_sets(model)
        x = torch.randn(1, 4, side, side, device=device)
        t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)

        def forward(kind):
            def call():
                restore_attention(model, sets[kind])
                model(x, timestep=t, class_labels=y)
            return call

        medians = interleaved_medians({kind: forward(kind) for kind in MODEL_PROCESSORS}, device, repeats)
        row = {kind: {"seconds": medians[kind]} for kind in MODEL_PROCESSORS}
        row["nala_vs_sana"] = medians["nala"] / medians["sana"]
        row["nala_vs_sdpa"] = medians["nala"] / medians["sdpa"]
        out[(side // patch) ** 2] = row
    return out


def training_step_memory(device, preset: str, layers: int, tokens: int, kinds=("relu_linear", "nala")) -> dict:
    """Peak memory and time of a training step (forward + backward, batch 1) per attention kind, each
    in a fresh process. ``peak_bytes`` is the largest total of live tensors during a step, weights and
    gradients included (CUDA: ``max_memory_allocated``); ``max_rss_bytes`` is the process's maximum
    resident set, which also counts what the C allocator keeps after tensors are freed."""
    import subprocess

    out = {"tokens": tokens, "layers": layers, "preset": preset}
    for kind in tqdm(kinds, desc="training-step memory"):
        result = subprocess.run([sys.executable, "-m", "nala_diffusion.eval.train_step_probe", kind, preset, str(layers),
                                 str(tokens), str(device)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"the training-step probe for {kind} failed:\n{result.stderr[-2000:]}")
        out[kind] = json.loads(result.stdout.strip().splitlines()[-1])
    base = out[kinds[0]]
    for kind in kinds[1:]:
        out[f"{kind}_vs_{kinds[0]}"] = {"peak": out[kind]["peak_bytes"] / base["peak_bytes"],
                                       "max_rss": out[kind]["max_rss_bytes"] / base["max_rss_bytes"],
                                       "step_time": out[kind]["step_seconds"] / base["step_seconds"]}
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_tokens in results["op_level"].items():
        rows = sorted((int(n), r) for n, r in by_tokens.items() if "seconds" in r)
        if rows:
            axes[0].loglog([n for n, _ in rows], [r["seconds"] * 1e3 for _, r in rows], "o-", label=name)
            memory = [(n, r["peak_bytes"]) for n, r in rows if r.get("peak_bytes") is not None]
            if memory:
                axes[1].loglog([n for n, _ in memory], [max(b, 1) / 2**20 for _, b in memory], "o-", label=name)
    axes[0].set(xlabel="tokens", ylabel="ms per call", title=f"time per call, {results['device']}")
    axes[1].set(xlabel="tokens", ylabel="peak MiB", title="memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("op", "floor", "model", "diffusers", "memory", "hybrid", "compile", "compile_sana", "gpu")
# asked for by name: "compile_sana" compiles two models per size (minutes on a CPU), "gpu" measures a CUDA device
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name not in ("compile_sana", "gpu"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="nala-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536], help='token counts of the kernel comparison')
    p.add_argument("--heads", type=int, default=6, help='heads of the kernel comparison')
    p.add_argument("--head_dim", type=int, default=64, help='head_dim of the kernel comparison')
    p.add_argument("--repeats", type=int, default=5, help='interleaved rounds; medians are reported')
    p.add_argument("--max_seconds", type=float, default=120.0, help="skip a kernel whose run would take longer")
    p.add_argument("--max_gib", type=float, default=8.0, help="skip plain attention above this score size")
    p.add_argument("--skip_model", action="store_true", help='kernels only: skip the model-level comparisons')
    p.add_argument("--preset", default="S/2", help='DiT size preset of the model-level comparisons')
    p.add_argument("--model_tokens", type=int, default=16384, help='tokens of the DiT forward (NaLa vs softmax)')
    p.add_argument("--train_tokens", type=int, default=256, help='tokens of the DiT training step (NaLa vs softmax)')
    p.add_argument("--train_batch", type=int, default=8, help='batch of that training step')
    p.add_argument("--diffusers_tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384],
                   help="token counts of the diffusers DiT comparison (NaLa vs SANA vs SDPA processors)")
    p.add_argument("--diffusers_layers", type=int, default=4, help="layers of that diffusers DiT")
    p.add_argument("--memory_tokens", type=int, default=16384, help="tokens of the training-step memory probe")
    p.add_argument("--memory_layers", type=int, default=4, help="layers of the training-step memory probe")
    p.add_argument("--hybrid_tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                   help="token counts of the hybrid-layout comparison (pure NaLa, hybrid, pure softmax DiT forward)")
    p.add_argument("--hybrid_softmax_layers", type=int, nargs="+", default=[-1],
                   help="softmax blocks of that hybrid (negative counts from the end)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                   help="which comparisons to run (--skip_model drops all but op and floor); 'gpu': the CUDA run of "
                        "docs/benchmarks.md (device checks, Triton readout against torch, SANA and SDPA at 4k-65k "
                        "tokens, DiT-XL/2 forward and training step), not in the default")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="--sections gpu: start every part at toy sizes on the CPU (Triton's interpreter), no timings")
    p.add_argument("--compile_tokens", type=int, nargs="+", default=[1024, 4096],
                   help="tokens of the whole-model torch.compile comparison (compiled vs eager)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the compile comparison")
    p.add_argument("--sana_tokens", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="tokens of the compile_sana comparison (diffusers' DiT, NaLa against SANA's processor, each "
                        "eager and compiled)")
    p.add_argument("--device", default=None, help='device (default: cuda when available, else cpu)')
    p.add_argument("--out", default="benchmark_results", help='folder for results.json and benchmark.png')
    p.add_argument("--quick", action="store_true",
                   help="kernels only, at 256 and 1,024 tokens (sections op and floor): about a minute on 2 CPU cores. "
                        "Without it every section runs, which takes tens of minutes on a CPU; results.json is "
                        "written as each section ends")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.sections = [256, 1024], ["op", "floor"]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
        "command": " ".join(["nala-bench", *(argv if argv is not None else sys.argv[1:])]),
    }
    sections = [name for name in SECTIONS if name in set(args.sections)
                and not (args.skip_model and name in {"model", "diffusers", "memory", "hybrid", "compile", "compile_sana"})]
    runs = {
        "op": ("op_level", lambda: op_level(args.tokens, args.heads, args.head_dim, device, args.repeats,
                                            args.max_seconds, args.max_gib * 2**30)),
        "floor": ("matmul_floor", lambda: matmul_floor(max([n for n in args.tokens if n <= 16384] or [min(args.tokens)]),
                                                       args.heads, args.head_dim, device, args.repeats)),
        "model": ("model_level", lambda: model_level(device, args.repeats, args.model_tokens, args.train_tokens,
                                                     args.train_batch, args.preset)),
        "diffusers": ("diffusers_model_level", lambda: diffusers_model_level(
            device, args.repeats, args.diffusers_tokens, args.preset, args.diffusers_layers)),
        "memory": ("training_step_memory", lambda: training_step_memory(device, args.preset, args.memory_layers,
                                                                        args.memory_tokens)),
        "hybrid": ("hybrid_level", lambda: hybrid_level(device, args.repeats, args.hybrid_tokens, args.preset,
                                                        args.hybrid_softmax_layers, args.max_seconds)),
        "compile": ("compile_level", lambda: benchmark_compile.compile_level(device, args.repeats, args.compile_tokens,
                                                                             args.preset, DTYPES[args.dtype])),
        "compile_sana": ("compiled_against_sana", lambda: benchmark_compile.compiled_against_sana(
            device, args.repeats, args.sana_tokens, args.preset, args.diffusers_layers)),
        "gpu": ("gpu", lambda: benchmark_gpu.gpu_section(device, args.repeats, args.dry_run)),
    }
    os.makedirs(args.out, exist_ok=True)
    for index, name in enumerate(sections):
        print(f"[{index + 1}/{len(sections)}] section {name} ...", flush=True)
        start = time.perf_counter()
        key, run = runs[name]
        try:
            results[key] = run()
        except ValueError as error:
            return exit_on_input_error("nala-bench", error)
        results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
        write_json_atomically(os.path.join(args.out, "results.json"), results, sort_keys=False)  # kept as each ends
        print(f"[{index + 1}/{len(sections)}] section {name} done in {time.perf_counter() - start:.0f} s; "
              f"{args.out}/results.json updated", flush=True)
    if "op_level" in results:
        plot(results, os.path.join(args.out, "benchmark.png"))
    for name, by_tokens in results.get("op_level", {}).items():
        cells = [f"{n}: {r['seconds'] * 1e3:.1f} ms" if "seconds" in r else f"{n}: skipped" for n, r in by_tokens.items()]
        print(f"{name:14s} " + ", ".join(cells))
    floor = results.get("matmul_floor")
    if floor:
        print(f"readout products alone at {floor['tokens']} tokens, nala/relu_linear time: dense "
              f"{floor['nala_dense_vs_relu_linear']:.2f}, gather {floor['nala_gather_vs_relu_linear']:.2f}")
    for name, row in results.get("model_level", {}).items():
        print(f"DiT {name} at {row['tokens']} tokens: nala/softmax time {row['nala_vs_softmax']:.2f}")
    for n, row in results.get("diffusers_model_level", {}).items():
        print(f"diffusers DiT forward at {n} tokens: nala/sana {row['nala_vs_sana']:.2f}, nala/sdpa {row['nala_vs_sdpa']:.2f}")
    memory = results.get("training_step_memory")
    if memory:
        ratio = memory["nala_vs_relu_linear"]
        print(f"training step at {memory['tokens']} tokens, nala/relu_linear: peak tensor memory {ratio['peak']:.2f}, "
              f"max RSS {ratio['max_rss']:.2f}, time {ratio['step_time']:.2f}")
    for n, row in results.get("hybrid_level", {}).items():
        cells = [f"{kind} {row[kind]['seconds']:.2f} s, peak {row[kind]['peak_bytes'] / 2**20:.0f} MiB"
                 if "seconds" in row[kind] else f"{kind} skipped" for kind in HYBRID_KINDS]
        print(f"DiT forward at {n} tokens: " + "; ".join(cells))
    if "compile_level" in results:
        print(benchmark_compile.describe(results["compile_level"]))
    if "compiled_against_sana" in results:
        print(benchmark_compile.describe_sana(results["compiled_against_sana"]))
    if "gpu" in results:
        print(benchmark_gpu.describe(results["gpu"]))
    print(f"wrote {args.out}/results.json" + (f" and {args.out}/benchmark.png" if "op_level" in results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
