"""What every Triton launch here needs from its host code."""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor):
    """Make ``tensor``'s GPU the current one for a launch (Triton launches on the current device)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
