"""Every op of fastbert, declared once: name, schema, fake, which backends implement it, and
how it trains.

From this table :mod:`fastbert.ops` makes the ``torch.library`` custom ops (with their fakes and
autograd), the step table the encoder calls (:data:`STEPS`) and its training variant;
:mod:`fastbert.backends` plans each op over the backends named here, and :mod:`fastbert.extension`
and :mod:`fastbert.kernels` expose the ops declared for them. Each op's semantics are those of the
function of the same name in :mod:`fastbert.reference` (the ``torch`` backend implements every
op); a backend module implements an op with a function of that name and signature.

Adding an op: its reference in :mod:`fastbert.reference`, one kernel per backend that runs it
(under the op's name in that backend's module), one :class:`Op` here, and one test file.

Training: a step that trains names its ``train`` op, a forward that also returns what its
backward needs; that op names its ``backward`` op, whose arguments are ``grad`` and arguments or
results of the forward, matched by name, and whose results are the gradients of the forward's
inputs named in ``gradients``. Dropout takes ``seed``, an int64 [1] tensor drawn per forward: a recomputation (gradient
checkpointing) passing the same seed draws the same mask.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Op(NamedTuple):
    name: str
    # Arguments and results in torch.library's schema language, the reference's signature. The
    # custom op adds ``str backend`` (and, for a training forward, ``str backward``) after them,
    # keyword-only when an argument before has a default.
    schema: str
    fake: Callable  # the results' shapes and dtypes from the arguments (what torch.compile traces)
    backends: tuple[str, ...]  # the backends with a kernel for it besides torch ("cuda": the extension on GPUs)
    step: bool = False  # the encoder calls it (a field of fastbert.ops.Kernels)
    train: str | None = None  # a step: the training forward it runs as when it trains
    backward: str | None = None  # a training forward: the op computing its gradients
    # A training forward: the inputs its backward's results are the gradients of, in order (a tuple
    # of names: one result holds their gradients stacked on dim 1).
    gradients: tuple = ()
    # A training forward: what its other inputs are, for the error when one requires grad.
    constants: dict[str, str] = {}
    # An op that differentiates itself as another step (pad and unpad are each other's backward).
    autograd: tuple[Callable, Callable] | None = None
    # What torch.compile and the training steps call instead of the custom op (Inductor plans GEMMs itself).
    traced: Callable | None = None


def _stats(like: torch.Tensor, *shape) -> torch.Tensor:
    """A statistic (mean, rstd, log-sum-exp) of ``shape``, in the kernels' statistics dtype for ``like``."""
    return like.new_empty(shape, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def _contiguous_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _unpad_setup(ctx, inputs, output):
    x, indices, backend = inputs
    ctx.save_for_backward(indices)
    ctx.args = (x.shape[0], x.shape[1], backend)


def _unpad_grad(ctx, grad):
    (indices,) = ctx.saved_tensors
    batch, seqlen, backend = ctx.args
    return torch.ops.fastbert.pad(grad, indices, batch, seqlen, backend), None, None


def _pad_setup(ctx, inputs, output):
    x, indices, batch, seqlen, backend = inputs
    ctx.save_for_backward(indices)
    ctx.backend = backend


def _pad_grad(ctx, grad):
    (indices,) = ctx.saved_tensors
    return torch.ops.fastbert.unpad(grad.contiguous(), indices, ctx.backend), None, None, None, None


def _linear_out(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _attention_out(q, k, v):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


_ATTENTION_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale, bool causal, "
                   "Tensor? bias")
_EMBED_ARGS = ("Tensor input_ids, Tensor position_ids, Tensor token_type_ids, Tensor word_embeddings, "
               "Tensor position_embeddings, Tensor token_type_embeddings, Tensor weight, Tensor ln_bias, float eps")
_EMBED_DROPOUT = "float dropout_p, Tensor? seed, SymInt word_padding_idx, SymInt position_padding_idx"

OPS: tuple[Op, ...] = (
    Op("linear", "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
       lambda x, weight, bias=None: _linear_out(x, weight),
       ("cpp",), step=True, traced=torch.nn.functional.linear),
    Op("attention", f"({_ATTENTION_ARGS}, Tensor? rel_bias=None, Tensor? positions=None) -> Tensor",
       lambda q, k, v, *rest: _attention_out(q, k, v), ("triton", "cpp"), step=True, train="attention_train"),
    Op("linear_gelu", "(Tensor x, Tensor weight, Tensor bias, str approximate) -> Tensor",
       lambda x, weight, bias, approximate: _linear_out(x, weight),
       ("triton", "cuda", "cpp"), step=True, train="linear_gelu_train"),
    Op("add_layernorm",
       "(Tensor x, Tensor residual, Tensor? bias, Tensor weight, Tensor ln_bias, float eps) -> Tensor",
       lambda x, *rest: _contiguous_like(x), ("triton", "cuda", "cpp"), step=True, train="add_layernorm_train"),
    Op("embed_layernorm", f"({_EMBED_ARGS}) -> Tensor",
       lambda input_ids, position_ids, token_type_ids, word_embeddings, *rest:
       word_embeddings.new_empty(input_ids.shape[0], word_embeddings.shape[1]),
       ("triton", "cuda", "cpp"), step=True, train="embed_layernorm_train"),
    Op("unpad", "(Tensor x, Tensor indices) -> Tensor",
       lambda x, indices: x.new_empty(indices.shape[0], *x.shape[2:]), ("cuda", "cpp"), step=True,
       autograd=(_unpad_grad, _unpad_setup)),
    Op("pad", "(Tensor x, Tensor indices, SymInt batch, SymInt seqlen) -> Tensor",
       lambda x, indices, batch, seqlen: x.new_empty(batch, seqlen, *x.shape[1:]), ("cuda", "cpp"), step=True,
       autograd=(_pad_grad, _pad_setup)),
    # ------------------------------------------------------------------------- training
    Op("attention_train",
       f"({_ATTENTION_ARGS}, Tensor? rel_bias, Tensor? positions, float dropout_p, Tensor? seed) "
       "-> (Tensor out, Tensor lse)",
       lambda q, k, v, *rest: (_attention_out(q, k, v), _stats(q, q.shape[1], q.shape[0])),
       ("triton", "cpp"), backward="attention_backward",
       gradients=(("q", "k", "v"), "rel_bias"),
       constants={"bias": "the additive attention bias (a 3D/4D attention_mask), a constant of the forward"}),
    Op("attention_backward",
       "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, "
       "float scale, bool causal, Tensor? bias, Tensor? rel_bias, Tensor? positions, float dropout_p, Tensor? seed) "
       "-> (Tensor dqkv, Tensor d_rel_bias)",
       lambda grad, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, *rest: (
           q.new_empty(q.shape[0], 3, q.shape[1], q.shape[2]),
           rel_bias.new_empty(rel_bias.shape) if rel_bias is not None else q.new_empty(0, dtype=torch.float32)),
       ("triton", "cpp")),
    Op("linear_gelu_train", "(Tensor x, Tensor weight, Tensor bias, str approximate) -> (Tensor out, Tensor pre)",
       lambda x, weight, *rest: (_linear_out(x, weight), _linear_out(x, weight)),
       ("triton", "cpp"), backward="linear_gelu_backward",
       gradients=("x", "weight", "bias")),
    Op("linear_gelu_backward",
       "(Tensor grad, Tensor x, Tensor weight, Tensor pre, str approximate) -> (Tensor dx, Tensor dweight, "
       "Tensor dbias)",
       lambda grad, x, weight, *rest: (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])),
       ("triton", "cpp")),
    Op("add_layernorm_train",
       "(Tensor x, Tensor residual, Tensor? bias, Tensor weight, Tensor ln_bias, float eps, float dropout_p, "
       "Tensor? seed) -> (Tensor out, Tensor mean, Tensor rstd)",
       lambda x, *rest: (_contiguous_like(x), _stats(x, *x.shape[:-1]), _stats(x, *x.shape[:-1])), ("triton", "cpp"),
       backward="add_layernorm_backward",
       gradients=("x", "residual", "bias", "weight", "ln_bias")),
    Op("add_layernorm_backward",
       "(Tensor grad, Tensor x, Tensor residual, Tensor? bias, Tensor weight, Tensor ln_bias, Tensor mean, "
       "Tensor rstd, float eps, float dropout_p, Tensor? seed) -> (Tensor dx, Tensor dresidual, Tensor dbias, "
       "Tensor dweight, Tensor dln_bias)",
       lambda grad, x, residual, bias, weight, ln_bias, *rest: (
           _contiguous_like(x), _contiguous_like(residual),
           torch.empty_like(bias) if bias is not None else x.new_empty(0), torch.empty_like(weight),
           torch.empty_like(ln_bias)),
       ("triton", "cpp")),
    Op("embed_layernorm_train", f"({_EMBED_ARGS}, {_EMBED_DROPOUT}) -> (Tensor out, Tensor mean, Tensor rstd)",
       lambda input_ids, position_ids, token_type_ids, word_embeddings, *rest: (
           word_embeddings.new_empty(input_ids.shape[0], word_embeddings.shape[1]),
           _stats(word_embeddings, input_ids.shape[0]), _stats(word_embeddings, input_ids.shape[0])),
       ("triton", "cpp"), backward="embed_layernorm_backward",
       gradients=("word_embeddings", "position_embeddings", "token_type_embeddings", "weight", "ln_bias")),
    Op("embed_layernorm_backward",
       "(Tensor grad, Tensor input_ids, Tensor position_ids, Tensor token_type_ids, Tensor word_embeddings, "
       "Tensor position_embeddings, Tensor token_type_embeddings, Tensor weight, Tensor ln_bias, Tensor mean, "
       f"Tensor rstd, float eps, {_EMBED_DROPOUT}) -> (Tensor dword, Tensor dposition, Tensor dtoken_type, "
       "Tensor dweight, Tensor dln_bias)",
       lambda grad, input_ids, position_ids, token_type_ids, *tables: tuple(torch.empty_like(t) for t in tables[:5]),
       ("triton", "cpp")),
)

BY_NAME = {op.name: op for op in OPS}
NAMES = tuple(BY_NAME)
STEPS = tuple(op.name for op in OPS if op.step)  # the encoder's steps, in the order of fastbert.ops.Kernels
TRAINING_OPS = tuple(name for op in OPS if op.train for name in (op.train, BY_NAME[op.train].backward))
# The training-only arguments of the steps' training forwards, and the value that turns each off.
TRAINING_DEFAULTS = {"dropout_p": 0.0, "seed": None, "word_padding_idx": -1, "position_padding_idx": -1}


def implemented_by(backend: str) -> tuple[str, ...]:
    """The ops ``backend`` has a kernel for (``torch``: all of them)."""
    return tuple(op.name for op in OPS if backend == "torch" or backend in op.backends)
