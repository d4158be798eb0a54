"""Triton kernels: the ``triton`` backend of fastbert's ops (see fastbert.backends).

Each op the backend implements is exposed here under the op's name with the signature of its
reference in ``fastbert.reference`` (plus an optional ``out=``); ops not exposed (``pad``,
``unpad``: plain gathers, left to PyTorch's indexing) run on the next backend. One
file per kernel family: :mod:`.attention`, :mod:`.linear_gelu`, :mod:`.layernorm` (add+LN and
embeddings+LN).

On CUDA the kernels need compute capability 8.0 (Ampere) or newer: bf16 and the ``mma``
instructions they are built on start there.
"""

from __future__ import annotations

import torch

from fastbert.kernels.attention import attention, attention_backward, attention_train
from fastbert.kernels.layernorm import (
    add_layernorm,
    add_layernorm_backward,
    add_layernorm_train,
    embed_layernorm,
    embed_layernorm_backward,
    embed_layernorm_train,
)
from fastbert.kernels.linear_gelu import linear_gelu, linear_gelu_backward, linear_gelu_train

MIN_CAPABILITY = (8, 0)

__all__ = ["add_layernorm", "add_layernorm_backward", "add_layernorm_train", "attention", "attention_backward",
           "attention_train", "embed_layernorm", "embed_layernorm_backward", "embed_layernorm_train", "implements",
           "linear_gelu", "linear_gelu_backward", "linear_gelu_train", "unavailable_reason"]

# fp32 GEMM-bearing ops left to the next backend on a GPU (see implements).
_FP32_GEMM_OPS = ("linear_gelu", "linear_gelu_train", "linear_gelu_backward")


def implements(op: str, device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether these kernels serve ``op`` for ``dtype`` weights on ``device_type`` tensors.

    fp32 ``linear_gelu`` (and its training forward and backward) on a GPU is left to cuBLAS (the next backend's GEMM plus a fused
    bias+GELU pass): Triton's fp32 ``tl.dot`` at full precision runs on plain FMAs, with no
    tensor cores. The interpreter (CPU tensors) serves it, so the kernel stays tested.
    """
    return not (op in _FP32_GEMM_OPS and device_type == "cuda" and dtype == torch.float32)


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why these kernels cannot run on ``device``'s tensors here, or None when they can.

    On CUDA the capability checked is that of ``device`` itself ("cuda" without an index: the
    current GPU), so a model on an older second GPU falls back there and nowhere else.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return (f"the Triton kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+, "
                    f"but {name} is {capability[0]}.{capability[1]}")
    return None
