"""The ``cpp`` and ``cuda`` backends: fastbert's compiled extension ``fastbert._C``.

Importing this module loads the extension, which registers ``torch.ops.fastbert.ext_*`` ops
with a CPU kernel each (csrc/cpu/) and, when built with CUDA, CUDA kernels (csrc/cuda/) for all
but attention. Importing fails with ImportError when the extension was not built; the backend
selection then warns once and falls back (see :mod:`fastbert.backends`).

The names below are the registered ops under the op names of :mod:`fastbert.reference`.
``linear_gelu`` leaves the GEMM to a library (cuBLAS on CUDA; on CPU ATen or oneDNN with a
prepacked weight, as :mod:`fastbert.cpu_gemm` picks, which also serves ``linear``) and fuses
bias and GELU into one pass over its output.
"""

from __future__ import annotations

import torch

from fastbert import cpu_gemm

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

# Ops with a CUDA kernel; the others run on the next CUDA backend.
CUDA_OPS = ("linear_gelu", "add_layernorm", "embed_layernorm", "unpad", "pad")

# torch.backends.cpu.get_cpu_capability() names, weakest first.
_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def unavailable_reason(device_type: str) -> str | None:
    """Why the extension cannot run ops on ``device_type`` tensors here, or None if it can."""
    if device_type == "cuda" and not WITH_CUDA:
        return "fastbert._C was built without CUDA"
    if device_type == "cpu":
        have = torch.backends.cpu.get_cpu_capability()
        if have in _CAPABILITIES and _CAPABILITIES.index(have) < _CAPABILITIES.index(CPU_ISA.upper()):
            return f"fastbert._C was built for {CPU_ISA} but this CPU supports {have.lower()}"
    return None


def implements(op: str, device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether the extension has a kernel for ``op`` on ``device_type`` tensors."""
    return device_type != "cuda" or op in CUDA_OPS


# The registered ops themselves (their default overloads, the cheapest way to call them),
# under the op names and with the argument order of fastbert.reference.
attention = _ops.ext_attention.default
add_layernorm = _ops.ext_add_layernorm.default
embed_layernorm = _ops.ext_embed_layernorm.default
unpad = _ops.ext_unpad.default
pad = _ops.ext_pad.default


_linear_gelu = _ops.ext_linear_gelu.default
_bias_gelu_ = _ops.ext_bias_gelu_.default


linear = cpu_gemm.linear


def linear_gelu(x, weight, bias, approximate):
    if cpu_gemm.use_onednn(x, weight):
        y = torch.ops.mkldnn._linear_pointwise(x, cpu_gemm.packed(weight), None, "none", [], "")
        _bias_gelu_(y, bias, approximate)
        return y
    return _linear_gelu(x, weight, bias, approximate)
