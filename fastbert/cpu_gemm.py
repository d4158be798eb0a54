"""CPU GEMMs: ATen's ``addmm`` (MKL), oneDNN's linear with a prepacked weight, MKL's packed
format, or fastbert's panel GEMM, chosen by measuring them on this machine.

GEMMs are most of a CPU forward, and which library is fastest depends on the CPU, the shape and
the dtype: on an Intel Xeon MKL's fp32 GEMM is at peak for large row counts and the panel GEMM
wins at few rows; on an AMD EPYC Zen 5 MKL's fp32 GEMM runs at about 45 % of oneDNN's and the
panel GEMM wins at every row count (benchmarks/NOTES.md). No fixed rule suits every CPU, so
(``auto``, the default) each GEMM's library is measured on first use of its key: the op
(``linear``, or ``linear_gelu`` timed with its bias and GELU), dtype, output and input widths
N and K, and the row count rounded up to a power of two (:func:`fastbert.tuning.bucket`).
The candidates (:func:`candidates`), in order of preference on a near-tie:

- ``aten``: ``F.linear`` (MKL), any dtype;
- ``onednn``: oneDNN's linear with the weight prepacked into its blocked layout, fp32 and bf16;
- ``mkl``: MKL's packed format (``torch.ops.mkl._mkl_linear``, what Inductor's freezing uses), fp32;
- ``panels``: fastbert's panel GEMM (``csrc/cpu/gemm.cpp``: the weight packed once into
  contiguous panels that stream from memory, bias and GELU in its epilogue), fp32, output widths
  that are a multiple of :data:`PANEL_WIDTH`.

The measurement, its cache on disk (a second process reuses the choice: same library, bitwise
the same outputs) and its rules (medians of interleaved rounds, a margin for near-ties, never
while tracing) are :mod:`fastbert.tuning`'s; the decisions are :data:`TABLE`'s. Without
measuring, GEMMs run on ATen while gradients are on (packed copies are not part of autograd's
graph), on CUDA tensors, and when x and the weight differ in dtype (ATen says what is wrong).

``FASTBERT_CPU_GEMM`` (read at import; :func:`set_choice` at run time) pins a library instead of
measuring: ``aten``, ``onednn``, ``mkl`` or ``panels``, for every GEMM it can run (the others
on ATen). Packed weights are made on first use and kept per weight tensor and layout, rebuilt
when its version or storage changes (an in-place update, ``load_state_dict``, ``.to()``),
dropped with the tensor; after a measurement, the copies of the layouts that lost are dropped.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fastbert import tuning
from fastbert.stamps import PerTensor

try:
    from fastbert import _C
except ImportError:  # no extension: no panel GEMM (fastbert.extension says why, once)
    _C = None

CHOICES = ("auto", "aten", "onednn", "mkl", "panels")
ENV_VAR = "FASTBERT_CPU_GEMM"
# Libraries, as :func:`library` names them, in order of preference on a near-tie (ATen keeps no
# second copy of the weight).
ATEN, ONEDNN, MKL, PANELS = "aten", "onednn", "mkl", "panels"

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
MKL_AVAILABLE = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
PANELS_AVAILABLE = _C is not None and hasattr(_C.cpu, "panel_linear")
PANEL_WIDTH = _C.cpu.PANEL_WIDTH if PANELS_AVAILABLE else 0
AVAILABLE = {ATEN: True, ONEDNN: ONEDNN_AVAILABLE, MKL: MKL_AVAILABLE, PANELS: PANELS_AVAILABLE}
# MKL's packed weight is made for a nominal row count; its layout serves every row count
# (outputs bitwise equal for packs made for 1 and 512 rows; tests check several row counts).
MKL_PACK_ROWS = 1

TABLE = tuning.Table("cpu_gemm")


def set_choice(choice: str) -> None:
    """``auto`` (measure) or a library to pin: ``aten``, ``onednn``, ``mkl``, ``panels`` (module docstring)."""
    global _pinned
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {choice!r}")
    _pinned = None if choice == "auto" else choice


set_choice(os.environ.get(ENV_VAR, "auto"))


@contextlib.contextmanager
def using(choice: str) -> Iterator[None]:
    """:func:`set_choice` inside a ``with`` block, the previous choice restored after it."""
    previous = _pinned or "auto"
    set_choice(choice)
    try:
        yield
    finally:
        set_choice(previous)


@functools.lru_cache(maxsize=None)
def candidates(dtype: torch.dtype, panel_width_fits: bool) -> tuple[str, ...]:
    """The libraries that can run a GEMM of ``dtype`` (the panel GEMM only where the output width
    is a multiple of :data:`PANEL_WIDTH`), in order of preference."""
    if dtype == torch.float32:
        runs = (ATEN, ONEDNN, MKL, *[PANELS] * panel_width_fits)
    else:
        runs = (ATEN, ONEDNN) if dtype == torch.bfloat16 else (ATEN,)
    return tuple(library for library in runs if AVAILABLE[library])


def library(x: torch.Tensor, weight: torch.Tensor, op: str = "linear",
            trial: Callable[[str], object] | None = None) -> str:
    """Which library runs ``x [rows, K] @ weight.T`` (module docstring): ATEN, ONEDNN, MKL or PANELS.

    ``op`` names what runs around the GEMM and is part of the key (``linear_gelu``: its bias and
    GELU, fused into the panel GEMM's epilogue, a separate pass after the others);
    ``trial(library)`` runs all of it once for timing (default: the plain GEMM).
    """
    if torch.is_grad_enabled() or x.is_cuda or x.dtype != weight.dtype or x.dim() != 2 or not len(x):
        return ATEN  # (no rows: nothing to measure on)
    N, K = weight.shape
    options = candidates(x.dtype, PANELS_AVAILABLE and N % PANEL_WIDTH == 0)
    if _pinned is not None:
        return _pinned if _pinned in options else ATEN
    key = (op, x.dtype, N, K, tuning.bucket(len(x)))
    return TABLE.choose(key, options, trial or functools.partial(run, x=x, weight=weight, bias=None),
                        functools.partial(_drop_losers, weight))


def _drop_losers(weight: torch.Tensor, chosen: str) -> None:
    """After measuring on ``weight``: its packed copies in the layouts that lost are not kept
    (a later choice of another row bucket remakes what it needs)."""
    for layout, table in _PACKED.items():
        if layout != chosen:
            table.drop(weight)


# The packed copy of each weight, one table per layout.
_PACKED = {ONEDNN: PerTensor(lambda w: torch.ops.mkldnn._reorder_linear_weight(w)),
           MKL: PerTensor(lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, MKL_PACK_ROWS)),
           PANELS: PerTensor(lambda w: _C.cpu.pack_panels(w))}


def packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] in oneDNN's blocked layout, made once per version of the weight."""
    return _PACKED[ONEDNN].get(weight)


def mkl_packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] in MKL's packed format (fp32), made once per version of the weight."""
    return _PACKED[MKL].get(weight)


def panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] as the panel GEMM's ``[N / PANEL_WIDTH, K, PANEL_WIDTH]``, made once per version."""
    return _PACKED[PANELS].get(weight)


def run(chosen: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` on library ``chosen``."""
    if chosen == PANELS:
        return _C.cpu.panel_linear(x, panels(weight), bias, None)
    if chosen == ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    if chosen == MKL:  # the packed path runs only when the last argument is x's row count
        return torch.ops.mkl._mkl_linear(x, mkl_packed(weight), weight, bias, x.shape[0])
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` (``x`` is ``[rows, K]``) on the library :func:`library` picks."""
    return run(library(x, weight), x, weight, bias)
