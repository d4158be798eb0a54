"""Timing and peak memory of model calls, interleaved across implementations.

Every implementation of one measurement is timed in the same rounds: each round calls each
implementation once, in an order shuffled from round to round, so a slow phase of a shared
machine (other processes, thermal or frequency changes) hits all of them alike, and so does the
after-effect of the call before (thread pools still spinning, caches). Medians and 20th/80th
percentiles summarise the rounds.

- CUDA: each call between two CUDA events, the device synchronised after each round.
- CPU: ``time.perf_counter`` around each call (CPU calls return when the work is done). This is
  what ``torch.utils.benchmark.Timer`` does per call; it is used directly because that Timer
  measures one statement at a time and cannot interleave implementations.

Peak memory is the growth during one call above what was in use before it: on CUDA from the
caching allocator's peak counter; on Linux CPUs from the process's resident-set high-water mark
(reset through ``/proc/self/clear_refs`` after returning freed heap memory to the system), which
also sees memory that is not PyTorch's (ONNX Runtime's arena). Elsewhere it is not measured.
"""

from __future__ import annotations

import ctypes
import random
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

Call = Callable[[], object]


def _cuda_times(calls: dict[str, Call], order: list[str]) -> dict[str, float]:
    events = {name: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for name in order}
    for name in order:
        start, end = events[name]
        start.record()
        calls[name]()
        end.record()
    torch.cuda.synchronize()
    return {name: start.elapsed_time(end) for name, (start, end) in events.items()}


def _cpu_times(calls: dict[str, Call], order: list[str]) -> dict[str, float]:
    times = {}
    for name in order:
        start = time.perf_counter()
        calls[name]()
        times[name] = (time.perf_counter() - start) * 1e3
    return times


def interleaved(calls: dict[str, Call], device: torch.device, min_reps: int, max_reps: int,
                budget_s: float) -> dict[str, list[float]]:
    """Per-call times in ms of each of ``calls`` (already warm), from interleaved rounds.

    Rounds run until ``budget_s`` seconds have passed, at least ``min_reps`` and at most
    ``max_reps`` of them.
    """
    one_round = _cuda_times if device.type == "cuda" else _cpu_times
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    shuffler = random.Random(0)
    deadline = time.perf_counter() + budget_s
    rep = 0
    while rep < max_reps and (rep < min_reps or time.perf_counter() < deadline):
        for name, ms in one_round(calls, shuffler.sample(names, len(names))).items():
            samples[name].append(ms)
        rep += 1
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    p20, p80 = np.percentile(samples, [20, 80])
    return {"median_ms": statistics.median(samples), "p20_ms": float(p20), "p80_ms": float(p80)}


def spread(samples: dict[str, list[float]]) -> float:
    """The largest p80/p20 ratio over implementations: 1.0 is a perfectly steady measurement."""
    ratios = [p80 / p20 for p20, p80 in (np.percentile(s, [20, 80]) for s in samples.values()) if p20 > 0]
    return max(ratios, default=1.0)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1)) / 1024


def peak_memory_mb(call: Call, device: torch.device) -> float | None:
    """Memory growth in MiB at the peak of one ``call`` (see the module docstring), or None."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if device.type != "cpu" or not _CLEAR_REFS.exists():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set size
    except OSError:
        return None
    before = _status_mb("VmRSS")
    call()
    return max(_status_mb("VmHWM") - before, 0.0)


def cuda_graphed(call: Call) -> Call:
    """``call`` captured once into a CUDA graph; the returned function replays it, returning
    the captured call's output tensor (overwritten by each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up on a side stream, as capture requires
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out

    return replay
