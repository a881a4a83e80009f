"""Timing and memory probes of the benchmarks and studies: medians of repeated calls (several calls
interleaved, so that their ratios are fair), and the peak of live tensor bytes during a call, per
call or per DiT block (CUDA: ``torch.cuda.max_memory_allocated``)."""

import statistics
import time
import weakref
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors created inside the mode (a CPU stand-in for max_memory_allocated)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.window = 0  # the peak since it was last set to ``live`` (per-block peaks)
        self._seen = set()

    def _release(self, key, size):
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen and storage.nbytes() > 0:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    self.window = max(self.window, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn``: CUDA events on a GPU (the kernels run asynchronously), else
    ``time.perf_counter``. (``torch.utils.benchmark.Timer`` is not used: each ``timeit`` runs two
    warm-up calls of its own, which would triple the cost of the seconds-long model calls, and it
    times one callable at a time, where :func:`interleaved_medians` alternates them.)"""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(calls: Dict[str, Callable[[], object]], device, repeats: int,
                        warmup: bool = True) -> Dict[str, float]:
    """Median seconds of each call, timed in turn (A B C, A B C, ...) after one warm-up each (unless
    the caller has warmed them up), so that a slow spell of the machine touches every call alike and
    their ratios stay fair."""
    for call in calls.values() if warmup else ():
        call()  # warm-up (and any compilation)
    times: Dict[str, list] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(median_seconds(call, device, 1, warmup=0))
    return {name: statistics.median(values) for name, values in times.items()}


class BlockPeaks:
    """Per transformer block, the peak memory its forward allocates beyond what was live when it began
    (CPU: live tensor bytes seen by :class:`PeakBytes`; CUDA: ``max_memory_allocated``), plus the peak
    of the whole call. Tells which block a model's peak comes from."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.blocks: Dict[int, int] = {}
        self.peak = 0

    def __call__(self, fn) -> "BlockPeaks":
        probe = PeakBytes() if self.device.type != "cuda" else None
        start: Dict[int, int] = {}

        def live():
            if probe is not None:
                return probe.live
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)

        def before(index):
            def hook(module, args):
                start[index] = live()
                if probe is not None:
                    probe.window = probe.live
                else:
                    torch.cuda.reset_peak_memory_stats(self.device)
            return hook

        def after(index):
            def hook(module, args, output):
                top = probe.window if probe is not None else (live(), torch.cuda.max_memory_allocated(self.device))[1]
                self.blocks[index] = max(self.blocks.get(index, 0), top - start[index])
            return hook

        handles = []
        for index, block in enumerate(self.model.transformer_blocks):
            handles += [block.register_forward_pre_hook(before(index)), block.register_forward_hook(after(index))]
        try:
            if probe is not None:
                with probe:
                    fn()
                self.peak = probe.peak
            else:
                self.peak = peak_memory(fn, self.device)
        finally:
            for handle in handles:
                handle.remove()
        return self


def peak_memory(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakBytes() as probe:
        fn()
    return probe.peak
