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


#: the whole-DiT comparison of NaLa with SANA's processor, each eager and compiled
SANA_KINDS = ("nala_eager", "sana_eager", "nala_compiled", "sana_compiled")


@torch.no_grad()
def compiled_against_sana(device, repeats: int, tokens: Sequence[int], preset: str, layers: int) -> Dict[int, dict]:
    """diffusers' DiT (``layers`` blocks of ``preset``'s width) with NaLa processors and with diffusers'
    ``SanaLinearAttnProcessor2_0`` (same weights), each eager and under ``torch.compile``, one forward pass
    (batch 1, no autograd) per token count, the four interleaved call by call; first calls (compilation)
    are timed apart. Ratios: NaLa/SANA compiled and eager."""
    import copy

    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    from nala_diffusion import restore_attention, set_nala_attention
    from nala_diffusion.eval.benchmark import diffusers_dit
    from nala_diffusion.eval.timing import interleaved_medians, synchronize
    from nala_diffusion.models.transformer import preset_config

    patch = preset_config(preset)["patch_size"]
    out: Dict[int, dict] = {}
    for count in tokens:
        side = int(round(count ** 0.5)) * patch
        torch.manual_seed(0)
        nala = diffusers_dit(preset, layers, side, device)
        sana = copy.deepcopy(nala)
        previous = set_nala_attention(nala)
        restore_attention(sana, {name: SanaLinearAttnProcessor2_0() for name in previous})
        x = torch.randn(1, 4, side, side, device=device)
        t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
        torch._dynamo.reset()
        models = {"nala_eager": nala, "sana_eager": sana, "nala_compiled": torch.compile(nala),
                  "sana_compiled": torch.compile(sana)}
        first = {}
        for kind in SANA_KINDS:
            start = time.perf_counter()
            models[kind](x, timestep=t, class_labels=y)
            synchronize(device)
            first[kind] = time.perf_counter() - start
        seconds = interleaved_medians({kind: (lambda m=models[kind]: m(x, timestep=t, class_labels=y))
                                       for kind in SANA_KINDS}, device, repeats, warmup=False)
        out[count] = {"tokens": (side // patch) ** 2, "seconds": seconds, "first_call_seconds": first,
                      "nala_vs_sana_compiled": seconds["nala_compiled"] / seconds["sana_compiled"],
                      "nala_vs_sana_eager": seconds["nala_eager"] / seconds["sana_eager"]}
    return out


def describe_sana(rows: Dict[int, dict]) -> str:
    return "\n".join(f"diffusers DiT forward at {row['tokens']} tokens, NaLa/SANA: compiled "
                     f"{row['nala_vs_sana_compiled']:.2f} ({row['seconds']['nala_compiled'] * 1e3:.0f} vs "
                     f"{row['seconds']['sana_compiled'] * 1e3:.0f} ms), eager {row['nala_vs_sana_eager']:.2f} "
                     f"({row['seconds']['nala_eager'] * 1e3:.0f} vs {row['seconds']['sana_eager'] * 1e3:.0f} ms)"
                     for row in rows.values())
