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


# ----------------------------------------------------------------------------- training
# Forward ops that also return what their backward needs, each with an autograd formula whose
# backward is itself an op (with a fake), so eager autograd, torch.compile (forward and backward)
# and DDP all see the same graph. ``backend`` runs the forward, ``backward`` the backward op.
# Dropout takes ``seed``, an int64 [1] tensor drawn per forward: a recomputation (gradient
# checkpointing) passing the same seed draws the same mask.


def _no_grad_for(name: str, t: Tensor | None) -> None:
    if t is not None and t.requires_grad:
        raise RuntimeError(f"{name} requires grad, but fastbert computes no gradient for it; detach it "
                           f"(an attention mask is a constant of the forward)")


@torch.library.custom_op("fastbert::attention_train", mutates_args=())
def attention_train(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, causal: bool,
                    bias: Tensor | None, rel_bias: Tensor | None, positions: Tensor | None, dropout_p: float,
                    seed: Tensor | None, backend: str, backward: str) -> tuple[Tensor, Tensor]:
    return _impl("attention_train", backend, q)(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias,
                                                positions, dropout_p, seed)


@attention_train.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed, backend, backward):
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[1], q.shape[0], dtype=stats)


@torch.library.custom_op("fastbert::attention_backward", mutates_args=())
def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                       max_seqlen: int, scale: float, causal: bool, bias: Tensor | None, rel_bias: Tensor | None,
                       positions: Tensor | None, dropout_p: float, seed: Tensor | None,
                       backend: str) -> tuple[Tensor, Tensor]:
    return _impl("attention_backward", backend, q)(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal,
                                                   bias, rel_bias, positions, dropout_p, seed)


@attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed,
      backend):
    table = rel_bias.new_empty(rel_bias.shape) if rel_bias is not None else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape[0], 3, q.shape[1], q.shape[2]), table


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p, seed, _, backward = inputs
    _no_grad_for("the additive attention bias (a 3D/4D attention_mask)", bias)
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, bias, rel_bias, positions, seed)
    ctx.args = (max_seqlen, scale, causal, dropout_p, backward)
    ctx.mark_non_differentiable(output[1])


def _attention_grad(ctx, grad, _grad_lse):
    q, k, v, out, lse, cu_seqlens, bias, rel_bias, positions, seed = ctx.saved_tensors
    max_seqlen, scale, causal, dropout_p, backward = ctx.args
    dqkv, d_rel_bias = attention_backward(grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, bias,
                                          rel_bias, positions, dropout_p, seed, backward)
    dq, dk, dv = dqkv.unbind(1)
    d_rel_bias = d_rel_bias.to(rel_bias.dtype) if rel_bias is not None and ctx.needs_input_grad[8] else None
    return dq, dk, dv, None, None, None, None, None, d_rel_bias, None, None, None, None, None


attention_train.register_autograd(_attention_grad, setup_context=_attention_setup)


@torch.library.custom_op("fastbert::linear_gelu_train", mutates_args=())
def linear_gelu_train(x: Tensor, weight: Tensor, bias: Tensor, approximate: str, backend: str,
                      backward: str) -> tuple[Tensor, Tensor]:
    return _impl("linear_gelu_train", backend, x)(x, weight, bias, approximate)


@linear_gelu_train.register_fake
def _(x, weight, bias, approximate, backend, backward):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fastbert::linear_gelu_backward", mutates_args=())
def linear_gelu_backward(grad: Tensor, x: Tensor, weight: Tensor, pre: Tensor, approximate: str,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("linear_gelu_backward", backend, x)(grad, x, weight, pre, approximate)


@linear_gelu_backward.register_fake
def _(grad, x, weight, pre, approximate, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate, _, backward = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.args = (approximate, backward)
    ctx.mark_non_differentiable(output[1])


def _linear_gelu_grad(ctx, grad, _grad_pre):
    x, weight, pre = ctx.saved_tensors
    approximate, backward = ctx.args
    dx, dweight, dbias = linear_gelu_backward(grad, x, weight, pre, approximate, backward)
    return dx, dweight, dbias, None, None, None


linear_gelu_train.register_autograd(_linear_gelu_grad, setup_context=_linear_gelu_setup)


@torch.library.custom_op("fastbert::add_layernorm_train", mutates_args=())
def add_layernorm_train(x: Tensor, residual: Tensor, bias: Tensor | None, weight: Tensor, ln_bias: Tensor, eps: float,
                        dropout_p: float, seed: Tensor | None, backend: str,
                        backward: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("add_layernorm_train", backend, x)(x, residual, bias, weight, ln_bias, eps, dropout_p, seed)


def _row_stats(x: Tensor) -> Tensor:
    """A LayerNorm statistic (mean or rstd) of each row of ``x``: shaped like ``x`` without its last dim."""
    return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@add_layernorm_train.register_fake
def _(x, residual, bias, weight, ln_bias, eps, dropout_p, seed, backend, backward):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _row_stats(x), _row_stats(x)


@torch.library.custom_op("fastbert::add_layernorm_backward", mutates_args=())
def add_layernorm_backward(grad: Tensor, x: Tensor, residual: Tensor, bias: Tensor | None, weight: Tensor,
                           ln_bias: Tensor, mean: Tensor, rstd: Tensor, eps: float, dropout_p: float,
                           seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl("add_layernorm_backward", backend, x)(grad, x, residual, bias, weight, ln_bias, mean, rstd, eps,
                                                       dropout_p, seed)


@add_layernorm_backward.register_fake
def _(grad, x, residual, bias, weight, ln_bias, mean, rstd, eps, dropout_p, seed, backend):
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(residual, memory_format=torch.contiguous_format), dbias, torch.empty_like(weight),
            torch.empty_like(ln_bias))


def _add_layernorm_setup(ctx, inputs, output):
    x, residual, bias, weight, ln_bias, eps, dropout_p, seed, _, backward = inputs
    ctx.save_for_backward(x, residual, bias, weight, ln_bias, output[1], output[2], seed)
    ctx.args = (eps, dropout_p, backward)
    ctx.mark_non_differentiable(output[1], output[2])


def _add_layernorm_grad(ctx, grad, _grad_mean, _grad_rstd):
    x, residual, bias, weight, ln_bias, mean, rstd, seed = ctx.saved_tensors
    eps, dropout_p, backward = ctx.args
    dx, dresidual, dbias, dweight, dln_bias = add_layernorm_backward(grad, x, residual, bias, weight, ln_bias, mean,
                                                                     rstd, eps, dropout_p, seed, backward)
    return dx, dresidual, dbias if bias is not None else None, dweight, dln_bias, None, None, None, None, None


add_layernorm_train.register_autograd(_add_layernorm_grad, setup_context=_add_layernorm_setup)


@torch.library.custom_op("fastbert::embed_layernorm_train", mutates_args=())
def embed_layernorm_train(input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor, word_embeddings: Tensor,
                          position_embeddings: Tensor, token_type_embeddings: Tensor, weight: Tensor, ln_bias: Tensor,
                          eps: float, dropout_p: float, seed: Tensor | None, word_padding_idx: int,
                          position_padding_idx: int, backend: str, backward: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("embed_layernorm_train", backend, word_embeddings)(
        input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings, weight,
        ln_bias, eps, dropout_p, seed, word_padding_idx, position_padding_idx)


@embed_layernorm_train.register_fake
def _(input_ids, position_ids, token_type_ids, word_embeddings, *rest):
    out = word_embeddings.new_empty(input_ids.shape[0], word_embeddings.shape[1])
    return out, _row_stats(out), _row_stats(out)


@torch.library.custom_op("fastbert::embed_layernorm_backward", mutates_args=())
def embed_layernorm_backward(grad: Tensor, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor,
                             word_embeddings: Tensor, position_embeddings: Tensor, token_type_embeddings: Tensor,
                             weight: Tensor, ln_bias: Tensor, mean: Tensor, rstd: Tensor, eps: float, dropout_p: float,
                             seed: Tensor | None, word_padding_idx: int, position_padding_idx: int,
                             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl("embed_layernorm_backward", backend, word_embeddings)(
        grad, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings,
        weight, ln_bias, mean, rstd, eps, dropout_p, seed, word_padding_idx, position_padding_idx)


@embed_layernorm_backward.register_fake
def _(grad, input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings,
      weight, ln_bias, *rest):
    return tuple(torch.empty_like(t) for t in (word_embeddings, position_embeddings, token_type_embeddings, weight,
                                                ln_bias))


def _embed_layernorm_setup(ctx, inputs, output):
    ids, pos, types, word, position, token_type, weight, ln_bias, eps, dropout_p, seed, word_pad, pos_pad, _, bwd = inputs
    ctx.save_for_backward(ids, pos, types, word, position, token_type, weight, ln_bias, output[1], output[2], seed)
    ctx.args = (eps, dropout_p, word_pad, pos_pad, bwd)
    ctx.mark_non_differentiable(output[1], output[2])


def _embed_layernorm_grad(ctx, grad, _grad_mean, _grad_rstd):
    ids, pos, types, word, position, token_type, weight, ln_bias, mean, rstd, seed = ctx.saved_tensors
    eps, dropout_p, word_pad, pos_pad, backward = ctx.args
    grads = embed_layernorm_backward(grad, ids, pos, types, word, position, token_type, weight, ln_bias, mean, rstd,
                                     eps, dropout_p, seed, word_pad, pos_pad, backward)
    return (None, None, None, *grads, *([None] * 7))


embed_layernorm_train.register_autograd(_embed_layernorm_grad, setup_context=_embed_layernorm_setup)


# pad and unpad are each other's backward.
def _unpad_setup(ctx, inputs, output):
    x, indices, backend = inputs
    ctx.save_for_backward(indices)
    ctx.args = (x.shape[0], x.shape[1], backend)


def _unpad_grad(ctx, grad):
    (indices,) = ctx.saved_tensors
    batch, seqlen, backend = ctx.args
    return pad(grad, indices, batch, seqlen, backend), None, None


unpad.register_autograd(_unpad_grad, setup_context=_unpad_setup)


def _pad_setup(ctx, inputs, output):
    x, indices, batch, seqlen, backend = inputs
    ctx.save_for_backward(indices)
    ctx.backend = backend


def _pad_grad(ctx, grad):
    (indices,) = ctx.saved_tensors
    return unpad(grad.contiguous(), indices, ctx.backend), None, None, None, None


pad.register_autograd(_pad_grad, setup_context=_pad_setup)


def training_functions(chosen: dict[str, str]) -> dict:
    """The encoder's step functions with autograd, over the ops above, for the backends of ``chosen``
    (an op -> backend plan): the inference signatures plus the dropout (and, for the embeddings,
    padding-row) keyword arguments."""
    def bound(op: str) -> tuple[str, str]:
        return chosen[f"{op}_train"], chosen[f"{op}_backward"]

    def attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias=None, positions=None, *,
                  dropout_p=0.0, seed=None):
        return attention_train(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions, dropout_p,
                               seed, *bound("attention"))[0]

    def linear_gelu(x, weight, bias, approximate):
        return linear_gelu_train(x, weight, bias, approximate, *bound("linear_gelu"))[0]

    def add_layernorm(x, residual, bias, weight, ln_bias, eps, *, dropout_p=0.0, seed=None):
        return add_layernorm_train(x, residual, bias, weight, ln_bias, eps, dropout_p, seed,
                                   *bound("add_layernorm"))[0]

    def embed_layernorm(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                        token_type_embeddings, weight, ln_bias, eps, *, dropout_p=0.0, seed=None,
                        word_padding_idx=-1, position_padding_idx=-1):
        return embed_layernorm_train(input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
                                     token_type_embeddings, weight, ln_bias, eps, dropout_p, seed, word_padding_idx,
                                     position_padding_idx, *bound("embed_layernorm"))[0]

    return dict(attention=attention, linear_gelu=linear_gelu, add_layernorm=add_layernorm,
                embed_layernorm=embed_layernorm,
                unpad=lambda x, indices: unpad(x, indices, chosen["unpad"]),
                pad=lambda x, indices, batch, seqlen: pad(x, indices, batch, seqlen, chosen["pad"]))
