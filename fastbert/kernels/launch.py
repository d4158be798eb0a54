"""What every Triton launch here needs from its host code: the GPU to launch on, and the
launch configuration (tile sizes, warps, stages) measured fastest for the launch's key.

Each kernel family offers candidate configurations for a key (the GPU architecture, head dim
or GEMM sizes, dtype, flags, a size bucket); the first is its default. :func:`tile` picks among
them with :mod:`fastbert.tuning`: on the first launch of a key each candidate runs on that
launch's own inputs, and the fastest (within the tuning margin of the default) is kept for the
process and cached on disk per GPU, Triton and torch version, so a later process reads it back.
Nothing is measured inside a CUDA-graph capture or a ``torch.compile`` trace (the cached or
default choice runs there). Under the Triton interpreter the launchers do not ask: kernels run
with their interpreter configuration.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence, TypeVar

import torch

from fastbert import tuning

Launch = TypeVar("Launch")

_TABLES: dict[str, tuning.Table] = {}
_CHOSEN: dict[tuple, object] = {}  # (kernel, key) -> configuration: the per-launch fast path


def on_device_of(tensor: torch.Tensor):
    """Make ``tensor``'s GPU the current one for a launch (Triton launches on the current device)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@functools.cache
def gpu_arch(device: torch.device) -> int:
    """``device``'s compute capability as one number (80: Ampere, 90: Hopper)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def table(kernel: str) -> tuning.Table:
    """The decisions of ``kernel``'s launches (``triton_<kernel>`` in the cache and in
    :func:`fastbert.tuning.decisions`)."""
    if kernel not in _TABLES:
        _TABLES[kernel] = tuning.Table(f"triton_{kernel}", device_type="cuda", triton=True,
                                       sync=torch.cuda.synchronize)
    return _TABLES[kernel]


def label(option: object) -> str:
    """How an option is named in the cache and in benchmark records (a configuration's repr)."""
    return option if isinstance(option, str) else repr(option)


def tile(kernel: str, key: tuple, tensor: torch.Tensor, candidates: Callable[[], Sequence[Launch]],
         run: Callable[[Launch], object]) -> Launch:
    """The configuration for a launch of ``kernel`` with ``key`` on ``tensor``'s GPU.

    ``candidates()`` gives the options in order of preference (the default first; asked only on
    a key's first launch); ``run(option)`` launches with it on this launch's inputs, for timing.
    """
    found = _CHOSEN.get((kernel, key))
    if found is None:
        options = {label(option): option for option in candidates()}
        with on_device_of(tensor):
            name = table(kernel).choose(key, tuple(options), lambda name: run(options[name]))
        found = _CHOSEN[(kernel, key)] = options[name]
    return found
