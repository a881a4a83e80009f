"""Helpers for running the tools under accelerate on any machine."""

import os

import torch


def use_cpu_processes() -> bool:
    """True for a multi-process launch (``accelerate launch --multi_gpu``, ``torchrun``) on a machine
    without CUDA: ``Accelerator(cpu=True)`` then joins the processes with gloo (CPU DDP) instead of
    each one running alone. ``accelerate launch --cpu`` itself starts a single process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
