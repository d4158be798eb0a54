"""The ``cpp`` and ``cuda`` backends: fastbert's compiled extension ``fastbert._C``.

Importing this module loads the extension, which registers ``torch.ops.fastbert.ext_*`` ops
with a CPU kernel each (csrc/cpu/) and, when built with CUDA, CUDA kernels (csrc/cuda/) for all
but attention. Importing fails with ImportError when the extension was not built; the backend
selection then warns once and falls back (see :mod:`fastbert.backends`).

The names below are the registered ops under the op names of :mod:`fastbert.reference`.
``linear_gelu`` leaves the GEMM to a library (cuBLAS on CUDA; on CPU ATen, oneDNN with a
prepacked weight or MKL's packed format, as :mod:`fastbert.cpu_gemm` measures, which also
serves ``linear``) and fuses bias and GELU into one pass over its output; where the CPU's
choice is fastbert's own panel GEMM, that applies them in its epilogue.

Training: the CPU kernels also implement the training forwards (which return what their
backward needs: the attention's log-sum-exp, LayerNorm's mean and rstd, the pre-activation) and
the backwards, under the names of :mod:`fastbert.reference`. Dropout masks are Philox draws bit for
bit as the reference's. On CUDA the extension has no training kernels (none is declared for the
``cuda`` backend in :mod:`fastbert.declarations`); those ops run on the next backend.
"""

from __future__ import annotations

import functools
import types

import torch

from fastbert import cpu_gemm
from fastbert.declarations import implemented_by

try:
    from fastbert import _C
except ImportError as exc:
    raise ImportError(
        f"fastbert._C is not built ({exc}); build it with `pip install --no-build-isolation -e .` "
        "or `python setup.py build_ext --inplace`"
    ) from exc

_ops = torch.ops.fastbert

WITH_CUDA: bool = bool(_C.WITH_CUDA)
CPU_ISA: str = _C.CPU_ISA

# Ops with a CUDA kernel (declared for the cuda backend); the others run on the next CUDA backend.
CUDA_OPS = implemented_by("cuda")

# torch.backends.cpu.get_cpu_capability() names, weakest first.
_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the extension cannot run ops on ``device``'s tensors here, or None if it can."""
    device_type = torch.device(device).type
    if device_type == "cuda" and not WITH_CUDA:
        return "fastbert._C was built without CUDA"
    if device_type == "cpu":
        have = torch.backends.cpu.get_cpu_capability()
        if have in _CAPABILITIES and _CAPABILITIES.index(have) < _CAPABILITIES.index(CPU_ISA.upper()):
            return f"fastbert._C was built for {CPU_ISA} but this CPU supports {have.lower()}"
    return None


def _entry_points(kernels) -> dict:
    """The op functions, under the op names and argument order of fastbert.reference, over
    ``kernels`` (an object with the compiled kernels as attributes)."""

    def linear_gelu(x, weight, bias, approximate):
        # The library is measured on this whole function, epilogue included.
        trial = functools.partial(linear_gelu_on, x=x, weight=weight, bias=bias, approximate=approximate)
        return linear_gelu_on(cpu_gemm.library(x, weight, "linear_gelu", trial), x, weight, bias, approximate)

    def linear_gelu_on(chosen, x, weight, bias, approximate):
        if chosen == cpu_gemm.PANELS:  # bias and GELU in the GEMM's own epilogue
            return _C.cpu.panel_linear(x, cpu_gemm.panels(weight), bias, approximate)
        if chosen == cpu_gemm.ONEDNN and x.dtype == torch.bfloat16:
            # oneDNN's GELU post-op: 1.3-1.9x faster than a second pass in bf16 (benchmarks/NOTES.md),
            # and the product is rounded to bf16 once, after GELU. In fp32 the two measured even.
            return torch.ops.mkldnn._linear_pointwise(x, cpu_gemm.packed(weight), bias, "gelu", [], approximate)
        if chosen != cpu_gemm.ATEN:  # oneDNN in fp32 or MKL's packed format, then one bias+GELU pass
            y = cpu_gemm.run(chosen, x, weight, None)
            kernels.bias_gelu_(y, bias, approximate)
            return y
        return kernels.linear_gelu(x, weight, bias, approximate)

    def linear_gelu_train(x, weight, bias, approximate):
        if cpu_gemm.library(x, weight) == cpu_gemm.ATEN:
            return kernels.linear_gelu_train(x, weight, bias, approximate)
        pre = cpu_gemm.linear(x, weight, bias)  # the library measured for the plain GEMM
        return kernels.gelu(pre, approximate), pre

    ops = {name: getattr(kernels, name) for name in implemented_by("cpp") if hasattr(kernels, name)}
    ops.update(linear=cpu_gemm.linear, linear_gelu=linear_gelu)
    if hasattr(kernels, "linear_gelu_train"):
        ops["linear_gelu_train"] = linear_gelu_train
    return ops


# The compiled kernels: the ops' and the two GELU passes linear_gelu runs after a library's GEMM.
_KERNELS = (*(name for name in implemented_by("cpp") if name != "linear"), "bias_gelu_", "gelu")
# Through the registered ops (their default overloads): autograd sees them, so a backward raises.
_REGISTERED = _entry_points(types.SimpleNamespace(**{k: getattr(_ops, f"ext_{k}").default for k in _KERNELS}))
# Straight calls of the compiled kernels, for each device: no dispatcher, no autograd.
_DIRECT = {"cpu": _entry_points(_C.cpu), **({"cuda": _entry_points(_C.cuda)} if WITH_CUDA else {})}

globals().update(_REGISTERED)  # the ops' functions under their names: extension.attention, ...


def function(op: str, device_type: str, direct: bool):
    """The function running ``op`` on ``device_type`` tensors; ``direct`` (only while gradients
    are off: nothing records them) calls the compiled kernel without the dispatcher."""
    return _DIRECT[device_type][op] if direct else _REGISTERED[op]
