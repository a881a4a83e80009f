"""nala-bench's ``compile`` section: a whole DiT under ``torch.compile`` against the same model eager.

Per attention type (NaLa, softmax, the hybrid with its last block softmax) and token count, one
forward pass (no autograd) eager and compiled (inductor, the first call compiles and is timed apart),
medians of interleaved repeats, and the compiled/eager time ratio.
"""

from __future__ import annotations

import time
from typing import Dict, Sequence

import torch

COMPILE_KINDS = ("nala", "hybrid", "softmax")


@torch.no_grad()
def compile_level(device, repeats: int, tokens: Sequence[int], preset: str, dtype: torch.dtype = torch.float32
                  ) -> Dict[int, dict]:
    from nala_diffusion.eval.timing import interleaved_medians, synchronize
    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel

    out: Dict[int, dict] = {}
    for count in tokens:
        row: Dict[str, dict] = {}
        for kind in COMPILE_KINDS:
            torch.manual_seed(0)
            layout = {"softmax_layers": [-1], "attention_type": "nala"} if kind == "hybrid" else {"attention_type": kind}
            model = NaLaDiTTransformer2DModel.from_preset(preset, sample_size=32, **layout).to(device).eval()
            if dtype != torch.float32:
                model.to(dtype=dtype)
            side = int(round(count ** 0.5)) * model.config.patch_size
            x = torch.randn(1, model.config.in_channels, side, side, device=device, dtype=dtype)
            t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
            torch._dynamo.reset()
            compiled = torch.compile(model)
            start = time.perf_counter()
            compiled(x, timestep=t, class_labels=y)
            synchronize(device)
            compile_seconds = time.perf_counter() - start
            seconds = interleaved_medians({"eager": lambda: model(x, timestep=t, class_labels=y),
                                           "compiled": lambda: compiled(x, timestep=t, class_labels=y)},
                                          device, repeats)
            row[kind] = {"eager_seconds": seconds["eager"], "compiled_seconds": seconds["compiled"],
                         "compiled_vs_eager": seconds["compiled"] / seconds["eager"],
                         "first_call_seconds": compile_seconds}
        out[count] = {"tokens": (side // model.config.patch_size) ** 2, "dtype": str(dtype).removeprefix("torch."), **row}
    return out


def describe(rows: Dict[int, dict]) -> str:
    lines = []
    for count, row in rows.items():
        cells = [f"{kind} {row[kind]['compiled_vs_eager']:.2f} ({row[kind]['compiled_seconds'] * 1e3:.0f} ms vs "
                 f"{row[kind]['eager_seconds'] * 1e3:.0f} ms)" for kind in COMPILE_KINDS]
        lines.append(f"DiT forward at {row['tokens']} tokens, {row['dtype']}, compiled/eager: " + "; ".join(cells))
    return "\n".join(lines)
