"""CPU GEMMs: ATen's ``addmm`` (MKL), oneDNN's linear with a prepacked weight, or fastbert's
panel GEMM for few rows, by shape and dtype.

GEMMs are most of a CPU forward, and which library is fastest depends on the CPU, the shape and
the dtype. Measured (benchmarks/NOTES.md, 2 threads, BERT-base's four GEMM shapes):

- fp32, few rows: fastbert's panel GEMM (``csrc/cpu/gemm.cpp``: the weight packed once into
  contiguous panels that stream from memory) ran 1.3-1.4x oneDNN's speed at 16 rows, 1.25x at 32
  and 1.05x at 64 on an Intel Xeon (AVX-512), even with it at 128;
- fp32, 16-128 rows: oneDNN with the weight prepacked into its blocked layout ran 1.01-1.6x
  MKL's speed on an AMD EPYC (Zen 3, AVX2); the two were even at 192, and MKL was 1.02-1.13x
  faster from 256 rows;
- bf16: oneDNN (AMX or AVX512-BF16 kernels) with a prepacked weight ran 1.15-1.5x ATen's bf16
  GEMM (which reorders the weight on every call) at every row count on the Intel Xeon.

Hence the rule (``auto``), for GEMMs whose weight dims are both at least :data:`MIN_DIM` (below,
oneDNN's fixed cost per call loses to MKL) and only while gradients are off (packed copies are
not part of autograd's graph): fp32 up to :data:`PANEL_MAX_ROWS` rows on the panel GEMM (built
for AVX-512, output width a multiple of the panel width; the only ISA it was measured on), fp32
up to :data:`ONEDNN_MAX_ROWS` rows and bf16 at any row count on oneDNN; everything else on ATen.

``FASTBERT_CPU_GEMM`` (read at import; :func:`set_choice` at run time) overrides the rule:
``aten`` (everything on ATen), ``onednn`` (every fp32 and bf16 GEMM on oneDNN), ``panels``
(every fp32 GEMM whose width allows it on the panel GEMM, on any ISA). Packed weights are made
on first use and kept per weight tensor, rebuilt when its version or storage changes (an
in-place update, ``load_state_dict``, ``.to()``), dropped with the tensor.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from fastbert.views import stamp

try:
    from fastbert import _C
except ImportError:  # no extension: no panel GEMM (fastbert.extension says why, once)
    _C = None

CHOICES = ("auto", "aten", "onednn", "panels")
PANEL_MAX_ROWS = 64
ONEDNN_MAX_ROWS = 128
MIN_DIM = 256

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
PANELS_AVAILABLE = _C is not None and hasattr(_C.cpu, "panel_linear")
PANEL_WIDTH = _C.cpu.PANEL_WIDTH if PANELS_AVAILABLE else 0

# Libraries, as :func:`library` names them.
ATEN, ONEDNN, PANELS = "aten", "onednn", "panels"

_LIMITS = {  # choice -> (fp32 panel rows, fp32 oneDNN rows, bf16 on oneDNN, minimum weight dim)
    "auto": (PANEL_MAX_ROWS if PANELS_AVAILABLE and _C.CPU_ISA == "avx512" else -1, ONEDNN_MAX_ROWS, True, MIN_DIM),
    "aten": (-1, -1, False, 0),
    "onednn": (-1, 1 << 62, True, 0),
    "panels": (1 << 62 if PANELS_AVAILABLE else -1, -1, False, 0),
}


def set_choice(choice: str) -> None:
    """``auto``, ``aten``, ``onednn`` or ``panels`` (the module docstring says what each does)."""
    global _panel_rows, _onednn_rows, _bf16_onednn, _min_dim
    if choice not in CHOICES:
        raise ValueError(f"FASTBERT_CPU_GEMM must be one of {CHOICES}, got {choice!r}")
    # The rule as bounds set once, so that the per-call check is a few comparisons.
    _panel_rows, _onednn_rows, _bf16_onednn, _min_dim = _LIMITS[choice]
    if not ONEDNN_AVAILABLE:
        _onednn_rows, _bf16_onednn = -1, False


set_choice(os.environ.get("FASTBERT_CPU_GEMM", "auto"))


def library(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which library runs ``x [rows, K] @ weight.T`` (module docstring): ATEN, ONEDNN or PANELS."""
    if torch.is_grad_enabled() or x.is_cuda or x.dtype != weight.dtype:
        return ATEN
    N, K = weight.shape
    if N < _min_dim or K < _min_dim:
        return ATEN
    if x.dtype == torch.float32:
        if x.shape[0] <= _panel_rows and N % PANEL_WIDTH == 0:
            return PANELS
        return ONEDNN if x.shape[0] <= _onednn_rows else ATEN
    return ONEDNN if x.dtype == torch.bfloat16 and _bf16_onednn else ATEN


# id(weight) -> (weakref to it, stamp when packed, packed weight), one table per layout.
_onednn_packed: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}
_panel_packed: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def _cached(table: dict, pack: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    key = id(weight)
    current = stamp(weight)
    entry = table.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != current:
        with torch.inference_mode(False), torch.no_grad():
            blocked = pack(weight.detach())
        # The entry goes with the weight (its id may be reused only after that).
        entry = (weakref.ref(weight, lambda _, key=key: table.pop(key, None)), current, blocked)
        table[key] = entry
    return entry[2]


def packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] in oneDNN's blocked layout, made once per version of the weight."""
    return _cached(_onednn_packed, torch.ops.mkldnn._reorder_linear_weight, weight)


def panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] as the panel GEMM's ``[N / PANEL_WIDTH, K, PANEL_WIDTH]``, made once per version."""
    return _cached(_panel_packed, _C.cpu.pack_panels, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` (``x`` is ``[rows, K]``) on the library the rule picks."""
    chosen = library(x, weight)
    if chosen == PANELS:
        return _C.cpu.panel_linear(x, panels(weight), bias, None)
    if chosen == ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)
