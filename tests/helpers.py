"""Tiny model factories shared by the tests (2 layers, 2 heads, head_dim 8), and other test helpers."""

import contextlib
import subprocess
import sys

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from nala_diffusion import NaLaDiTTransformer2DModel

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8, patch_size=2, norm_num_groups=1)


def tiny_dit(in_channels=4, out_channels=None, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**TINY, in_channels=in_channels, out_channels=out_channels, num_embeds_ada_norm=num_classes)
    return randomize(model).eval()


def tiny_nala(seed=0, **config):
    torch.manual_seed(seed)
    kwargs = {**TINY, "in_channels": 3, "num_classes": 10, **config}
    return randomize(NaLaDiTTransformer2DModel(**kwargs)).eval()


def tiny_pixart(seed=0):
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        norm_num_groups=1,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=2,
        use_additional_conditions=False,
    )
    return randomize(model).eval()


def randomize(model, scale=0.2):
    """Replace zero/identity initialisations (adaLN-Zero, LePE) so every path changes the output."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model


def dit_inputs(batch=2, channels=4, height=8, width=8, num_classes=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    return x, t, y


class LargestAllocation(TorchDispatchMode):
    """Records the element count of the largest tensor any operator returns inside the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
print("ready", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def lock_held_by_a_live_process(folder):
    """Inside the block, ``folder/.lock`` is locked by a running process (its pid is yielded), as a
    run writing the folder holds it; afterwards that process is gone and the lock with it."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
