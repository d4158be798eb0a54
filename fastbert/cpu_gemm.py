"""CPU GEMMs: ATen's ``addmm`` (MKL) or oneDNN's linear with a prepacked weight, by shape.

GEMMs are most of a CPU forward, and which library is faster depends on the CPU and the shape.
Measured (benchmarks/NOTES.md): on an AMD EPYC (Zen 3, AVX2, 2 threads) oneDNN with a weight
prepacked into its blocked layout ran BERT-base's GEMMs 1.01-1.6x faster than MKL at 16-128
rows, the two were even at 192, and MKL was 1.02-1.13x faster from 256 rows; on an Intel Xeon
(AVX-512) the two measured the same at every BERT shape. oneDNN also pays a fixed cost per call that loses to MKL on tiny matrices.
Hence the rule (``auto``): fp32, at most :data:`ONEDNN_MAX_ROWS` rows and both weight dims at
least :data:`ONEDNN_MIN_DIM` take oneDNN; everything else takes ATen.

``FASTBERT_CPU_GEMM`` (read at import; ``auto``, ``aten`` or ``onednn``; :func:`set_choice` at run
time) overrides the rule.
Packed weights are made on first use and kept per weight tensor, rebuilt when its version or
storage changes (an in-place update, ``load_state_dict``, ``.to()``), dropped with the tensor.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from fastbert.views import stamp

CHOICES = ("auto", "aten", "onednn")
ONEDNN_MAX_ROWS = 128
ONEDNN_MIN_DIM = 256

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# id(weight) -> (weakref to it, (version, data pointer) when packed, packed weight)
_packed: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def set_choice(choice: str) -> None:
    """``auto``, ``aten`` or ``onednn`` (the module docstring says what each does)."""
    global _max_rows, _min_dim
    if choice not in CHOICES:
        raise ValueError(f"FASTBERT_CPU_GEMM must be one of {CHOICES}, got {choice!r}")
    # The rule as two bounds, so that the per-call check is two comparisons.
    _max_rows, _min_dim = {"auto": (ONEDNN_MAX_ROWS, ONEDNN_MIN_DIM), "aten": (-1, 0), "onednn": (1 << 62, 0)}[choice]
    if not ONEDNN_AVAILABLE:
        _max_rows = -1


set_choice(os.environ.get("FASTBERT_CPU_GEMM", "auto"))


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x [rows, K] @ weight.T`` runs on oneDNN with a prepacked weight (module docstring).

    Only while gradients are off: the packed copy is not part of autograd's graph.
    """
    return (x.shape[0] <= _max_rows and weight.shape[0] >= _min_dim and weight.shape[1] >= _min_dim
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and not x.is_cuda
            and not torch.is_grad_enabled())


def packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] in oneDNN's blocked layout, made once per version of the weight."""
    key = id(weight)
    current = stamp(weight)
    entry = _packed.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != current:
        with torch.inference_mode(False), torch.no_grad():
            blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        # The entry goes with the weight (its id may be reused only after that).
        entry = (weakref.ref(weight, lambda _, key=key: _packed.pop(key, None)), current, blocked)
        _packed[key] = entry
    return entry[2]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` (``x`` is ``[rows, K]``) on the library the rule picks."""
    if use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)
