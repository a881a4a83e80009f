"""``nala-bench --sections gpu``: what a lent GPU measures in one short run, against baselines timed in the
same run (ratios, not absolute claims).

1. **Checks on the device**: ``tests/triton_checks.py --device cuda`` (the Triton readout's forward and
   gradients against float64 and the torch readout, compiled too, without the interpreter) and the default
   test set (``python -m pytest -q``), where run from a checkout; pass/fail and their tails are recorded.
2. **Readout kernels** at 4,096 / 16,384 / 32,768 / 65,536 tokens (batch 8, 16 heads, head_dim 64, bfloat16,
   flash-bla's setting): NaLa with the Triton readout, NaLa in eager torch, NaLa eager torch compiled by
   ``torch.compile``, ReLU linear with the Triton readout, diffusers' ``SanaLinearAttnProcessor2_0``
   arithmetic, and SDPA (flash); forward and forward+backward, interleaved medians, and peak memory.
3. **Whole DiT-XL/2-sized models** (28 blocks, 1,152 wide): forward at 1024² and 2048² pixels (4,096 and
   16,384 latent tokens, batch 1, bfloat16) for NaLa (Triton readout) against softmax (SDPA), and one
   training step at 16,384 tokens, NaLa with the Triton readout against NaLa in torch (time and peak memory).

``--dry_run`` starts every part at toy sizes on the CPU (the Triton kernels in Triton's interpreter) and
records no timings: it shows that the script runs, not how fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

#: flash-bla's benchmark setting: batch 8, 16 heads, head_dim 64, bfloat16
READOUT_SHAPE = {"batch": 8, "heads": 16, "head_dim": 64}
READOUT_TOKENS = (4096, 16384, 32768, 65536)
#: pixel sizes of the whole-model forward (latent side = pixels / 8, patch 2)
MODEL_PIXELS = (1024, 2048)
TRAIN_TOKENS = 16384
DRY = {"tokens": (64, 96), "batch": 1, "heads": 2, "head_dim": 16, "pixels": (64,), "train_tokens": 64,
       "preset": "S/8"}


def readout_kinds(dry: bool) -> Dict[str, Callable]:
    from nala_diffusion.eval.benchmark import sana_linear
    from nala_diffusion.ops import linear_attention, nala_attention

    def compiled_nala():
        function = torch.compile(lambda q, k, v: nala_attention(q, k, v, backend="torch"))
        return function

    kinds = {
        "nala_triton": lambda q, k, v: nala_attention(q, k, v, backend="triton"),
        "nala_torch": lambda q, k, v: nala_attention(q, k, v, backend="torch"),
        "nala_torch_compiled": compiled_nala(),
        "relu_linear_triton": lambda q, k, v: linear_attention(q, k, v, backend="triton"),
        "sana_processor": sana_linear,
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    if dry:
        kinds.pop("nala_torch_compiled")  # compiling on a CPU needs minutes: the GPU run starts it
    return kinds


def readout_section(device, dtype, tokens_list, shape, repeats: int, dry: bool) -> dict:
    from nala_diffusion.eval.timing import interleaved_medians, peak_memory

    kinds = readout_kinds(dry)
    results = {}
    for tokens in tokens_list:
        generator = torch.Generator(device=device).manual_seed(0)
        size = (shape["batch"], shape["heads"], tokens, shape["head_dim"])
        q, k, v = (torch.randn(size, generator=generator, device=device, dtype=dtype) for _ in range(3))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]

        def forward(kind):
            return lambda: kinds[kind](q, k, v)

        def training(kind):
            def step():
                out = kinds[kind](*leaves)
                out.float().square().mean().backward()
                for leaf in leaves:
                    leaf.grad = None
            return step

        row = {}
        with torch.no_grad():
            forward_seconds = interleaved_medians({kind: forward(kind) for kind in kinds}, device, repeats)
        backward_seconds = interleaved_medians({kind: training(kind) for kind in kinds}, device, repeats)
        for kind in kinds:
            with torch.no_grad():
                forward_peak = peak_memory(forward(kind), device)
            row[kind] = {"forward_seconds": forward_seconds[kind], "forward_backward_seconds": backward_seconds[kind],
                         "forward_peak_bytes": forward_peak, "training_peak_bytes": peak_memory(training(kind), device)}
        if not dry:
            nala, eager = row["nala_triton"], row["nala_torch"]
            row["ratios"] = {
                "nala_torch_over_triton_fwd_bwd": eager["forward_backward_seconds"] / nala["forward_backward_seconds"],
                "nala_triton_over_relu_triton_fwd_bwd": nala["forward_backward_seconds"]
                / row["relu_linear_triton"]["forward_backward_seconds"],
                "sdpa_over_nala_triton_forward": row["sdpa"]["forward_seconds"] / nala["forward_seconds"],
                "nala_triton_training_peak_over_torch": nala["training_peak_bytes"] / eager["training_peak_bytes"],
            }
        results[str(tokens)] = row
        print(f"  readout at {tokens} tokens done", flush=True)
    return results


def model_section(device, dtype, pixels_list, train_tokens: int, preset: str, repeats: int, dry: bool) -> dict:
    from nala_diffusion import NaLaDiTTransformer2DModel, set_attention_backend
    from nala_diffusion.eval.timing import interleaved_medians, peak_memory

    def model(attention: str):
        built = NaLaDiTTransformer2DModel.from_preset(preset, attention_type=attention, in_channels=4, sample_size=32,
                                                      num_classes=1000)
        return built.to(device=device, dtype=dtype).eval()

    results = {"preset": preset, "forward": {}}
    models = {"nala_triton": model("nala"), "softmax_sdpa": model("softmax")}
    set_attention_backend(models["nala_triton"], "triton")
    for pixels in pixels_list:
        side = pixels // 8
        x = torch.randn(1, 4, side, side, device=device, dtype=dtype)
        t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
        calls = {name: (lambda m=m: m(x, timestep=t, class_labels=y)) for name, m in models.items()}
        with torch.no_grad():
            seconds = interleaved_medians(calls, device, repeats)
            peaks = {name: peak_memory(call, device) for name, call in calls.items()}
        tokens = (side // models["nala_triton"].config.patch_size) ** 2
        results["forward"][str(pixels)] = {"tokens": tokens, "seconds": seconds, "peak_bytes": peaks}
        print(f"  DiT forward at {pixels}^2 done", flush=True)
    del models
    # one training step at train_tokens: NaLa with the Triton readout against NaLa in torch
    trainee = model("nala").train()
    side = int(round(train_tokens ** 0.5)) * trainee.config.patch_size
    x = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)

    def step(backend):
        def run():
            set_attention_backend(trainee, backend)
            trainee(x, timestep=t, class_labels=y).sample.float().square().mean().backward()
            trainee.zero_grad(set_to_none=True)
        return run

    calls = {"nala_triton": step("triton"), "nala_torch": step("torch")}
    seconds = interleaved_medians(calls, device, max(1, repeats // 2))
    peaks = {name: peak_memory(call, device) for name, call in calls.items()}
    results["training_step"] = {"tokens": (side // trainee.config.patch_size) ** 2, "seconds": seconds,
                                "peak_bytes": peaks}
    print("  DiT training step done", flush=True)
    return results


def checks_section(device, dry: bool) -> dict:
    """The Triton checks on the device and the default test set, where this runs from a checkout."""
    root = Path(__file__).resolve().parents[1]
    checks = root / "tests" / "triton_checks.py"
    if not checks.is_file():
        return {"skipped": f"no checkout at {root} (tests/ is not installed with the package)"}
    env = dict(os.environ)
    commands = {"triton_checks": [sys.executable, str(checks), "--device", device.type]
                + (["--quick"] if dry else [])}
    if not dry:
        commands["default_tests"] = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    results = {}
    for name, command in commands.items():
        start = time.perf_counter()
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        results[name] = {"command": " ".join(command[1:]), "returncode": done.returncode,
                         "seconds": round(time.perf_counter() - start, 1),
                         "tail": (done.stdout + done.stderr)[-1500:]}
        print(f"  {name}: {'passed' if done.returncode == 0 else 'FAILED'}", flush=True)
    return results


def gpu_section(device, repeats: int, dry: bool) -> dict:
    """Every part above; ``dry``: toy sizes on the CPU, the kernels in Triton's interpreter, no timings kept."""
    if dry:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--dry_run runs the Triton kernels in Triton's interpreter, which must be set before "
                               "Triton is imported; run nala-bench --sections gpu --dry_run in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = torch.device("cpu"), torch.float32
        shape = {"batch": DRY["batch"], "heads": DRY["heads"], "head_dim": DRY["head_dim"]}
        tokens, pixels, train_tokens, preset = DRY["tokens"], DRY["pixels"], DRY["train_tokens"], DRY["preset"]
        repeats = 1
    else:
        if device.type != "cuda":
            raise ValueError("--sections gpu measures a CUDA device; this run has none (use --dry_run to check that "
                             "every part starts on a CPU)")
        dtype, shape, tokens = torch.bfloat16, READOUT_SHAPE, READOUT_TOKENS
        pixels, train_tokens, preset = MODEL_PIXELS, TRAIN_TOKENS, "XL/2"
    results = {"dry_run": dry, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).replace("torch.", ""), "readout_shape": shape}
    print("gpu: checks on the device", flush=True)
    results["checks"] = checks_section(device, dry)
    print("gpu: readout kernels", flush=True)
    results["readout"] = readout_section(device, dtype, tokens, shape, repeats, dry)
    print("gpu: whole models", flush=True)
    results["models"] = model_section(device, dtype, pixels, train_tokens, preset, repeats, dry)
    if dry:
        results = {"dry_run": True, "started": ["checks", "readout", "models"],
                   "checks": {name: check.get("returncode") for name, check in results["checks"].items()
                              if isinstance(check, dict)}}
    return results


def describe(results: dict) -> str:
    """The table lines of a GPU run (or the dry run's summary)."""
    if results.get("dry_run"):
        return f"gpu dry run: every part started ({', '.join(results['started'])}); checks: {results['checks']}"
    lines = [f"gpu: {results['device']}, {results['dtype']}"]
    for tokens, row in results["readout"].items():
        cells = ", ".join(f"{kind} {values['forward_seconds'] * 1e3:.2f}/{values['forward_backward_seconds'] * 1e3:.2f} ms"
                          for kind, values in row.items() if kind != "ratios")
        lines.append(f"  readout {tokens} tokens (fwd/fwd+bwd): {cells}")
    for pixels, row in results["models"]["forward"].items():
        lines.append(f"  DiT {results['models']['preset']} forward {pixels}^2 ({row['tokens']} tokens): "
                     + ", ".join(f"{k} {v:.3f} s" for k, v in row["seconds"].items()))
    step = results["models"]["training_step"]
    lines.append(f"  training step at {step['tokens']} tokens: "
                 + ", ".join(f"{k} {v:.3f} s, peak {step['peak_bytes'][k] / 2**30:.2f} GiB" for k, v in step["seconds"].items()))
    return "\n".join(lines)
