"""One training step of a DiT in a fresh process, for ``nala-bench``'s memory comparison: its time, the
peak of live tensors and the process's maximum resident set, printed as one JSON line.

    python -m nala_diffusion.eval.train_step_probe KIND PRESET LAYERS TOKENS DEVICE
"""

import json
import resource
import sys
import time

import torch


def main(argv=None) -> int:
    from nala_diffusion import NaLaDiTTransformer2DModel
    from nala_diffusion.eval.timing import PeakBytes
    from nala_diffusion.models.transformer import preset_config

    kind, preset, layers, tokens, device = (argv or sys.argv[1:])[:5]
    layers, tokens, device = int(layers), int(tokens), torch.device(device)
    torch.manual_seed(0)
    config = {**preset_config(preset), "num_layers": layers}
    side = int(round(tokens ** 0.5)) * config["patch_size"]
    model = NaLaDiTTransformer2DModel(**config, sample_size=side, in_channels=4, attention_type=kind).to(device)
    x = torch.randn(1, 4, side, side, device=device)
    t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)

    def step():
        model.zero_grad(set_to_none=False)
        model(x, timestep=t, class_labels=y).sample.square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: the gradients now exist, as in training
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        tensor_peak = torch.cuda.max_memory_allocated(device)
    else:
        with PeakBytes() as probe:
            step()
        tensor_peak = probe.peak + sum(p.numel() * p.element_size() * 2 for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": tensor_peak, "max_rss_bytes": rss, "step_seconds": sorted(times)[1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
