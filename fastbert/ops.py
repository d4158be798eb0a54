"""The op seam: one ``torch.library`` custom op per fused step of the encoder.

Each op takes a resolved ``backend`` name (see :mod:`fastbert.backends`) and forwards to that
backend's function of the same name; shapes and semantics are those of the references in
:mod:`fastbert.reference`. Every op has a fake implementation so ``torch.compile`` can trace it
as a single node. Eager forwards skip this layer and call the backends' functions directly
(:func:`fastbert.backends.kernels`); these ops are what ``torch.compile`` and tracing see.

Call them as ``fastbert.ops.attention(...)`` (or ``torch.ops.fastbert.attention``). ``backend`` is
the last argument of each; attention's is keyword-only, as it follows the two optional
relative-bias arguments (``rel_bias``, ``positions``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbert.backends import implementation


def _impl(op: str, backend: str, like: Tensor):
    return implementation(op, backend, like.device.type)


@torch.library.custom_op("fastbert::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    bias: Tensor | None,
    rel_bias: Tensor | None = None,
    positions: Tensor | None = None,
    *,
    backend: str,
) -> Tensor:
    return _impl("attention", backend, q)(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions)


@attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias=None, positions=None, *, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("fastbert::linear_gelu", mutates_args=())
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, approximate: str, backend: str) -> Tensor:
    return _impl("linear_gelu", backend, x)(x, weight, bias, approximate)


@linear_gelu.register_fake
def _(x, weight, bias, approximate, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fastbert::add_layernorm", mutates_args=())
def add_layernorm(
    x: Tensor,
    residual: Tensor,
    bias: Tensor | None,
    weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    backend: str,
) -> Tensor:
    return _impl("add_layernorm", backend, x)(x, residual, bias, weight, ln_bias, eps)


@add_layernorm.register_fake
def _(x, residual, bias, weight, ln_bias, eps, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastbert::embed_layernorm", mutates_args=())
def embed_layernorm(
    input_ids: Tensor,
    position_ids: Tensor,
    token_type_ids: Tensor,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    backend: str,
) -> Tensor:
    return _impl("embed_layernorm", backend, word_embeddings)(
        input_ids,
        position_ids,
        token_type_ids,
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        weight,
        ln_bias,
        eps,
    )


@embed_layernorm.register_fake
def _(input_ids, position_ids, token_type_ids, word_embeddings, *rest):
    return word_embeddings.new_empty(input_ids.shape[0], word_embeddings.shape[1])


@torch.library.custom_op("fastbert::unpad", mutates_args=())
def unpad(x: Tensor, indices: Tensor, backend: str) -> Tensor:
    return _impl("unpad", backend, x)(x, indices)


@unpad.register_fake
def _(x, indices, backend):
    return x.new_empty(indices.shape[0], *x.shape[2:])


@torch.library.custom_op("fastbert::pad", mutates_args=())
def pad(x: Tensor, indices: Tensor, batch: int, seqlen: int, backend: str) -> Tensor:
    return _impl("pad", backend, x)(x, indices, batch, seqlen)


@pad.register_fake
def _(x, indices, batch, seqlen, backend):
    return x.new_empty(batch, seqlen, *x.shape[1:])
