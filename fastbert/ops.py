"""The op seam: one ``torch.library`` custom op per op of :mod:`fastbert.declarations`, and the
step table the encoder calls.

Each custom op takes a resolved ``backend`` name (see :mod:`fastbert.backends`) after the
declared arguments and forwards to that backend's function of the same name; shapes and
semantics are those of the references in :mod:`fastbert.reference`. Every op has its declared
fake, so ``torch.compile`` traces it as a single node; each training forward has an autograd
formula whose backward is itself an op (with a fake), so eager autograd, ``torch.compile``
(forward and backward) and DDP all see the same graph. Training forwards also take
``backward``, the backend of their backward op.

Call them as ``fastbert.ops.attention(...)`` (or ``torch.ops.fastbert.attention``). ``backend`` is
the last argument of each; attention's is keyword-only, as it follows the two optional
relative-bias arguments (``rel_bias``, ``positions``).

:func:`kernels` resolves the backends' plan once into the functions the encoder calls: in eager
mode the backends' own functions, called directly (a custom op costs several times more host
time per call than the kernel of a short batch); while ``torch.compile`` traces, these custom
ops, the chosen backend bound.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastbert import backends
from fastbert.declarations import BY_NAME, OPS, STEPS, TRAINING_DEFAULTS, Op

__all__ = ["Kernels", "kernels", *(op.name for op in OPS)]


def _custom_schema(op: Op) -> str:
    """The declared schema with ``str backend`` (and ``str backward``) after the declared arguments."""
    args, arrow, results = op.schema.partition(" -> ")
    added = ", ".join(["str backend"] + ["str backward"] * bool(op.backward))
    return f"{args[:-1]}{', *, ' if '=' in args else ', '}{added}){arrow}{results}"


def _arguments(op: Op) -> list:
    """The declared arguments of ``op`` (torch's FunctionSchema arguments: name, type, default)."""
    return torch._C.parse_schema(f"fastbert::{op.name}{op.schema}").arguments


def _is_tensor(argument) -> bool:
    return isinstance(argument.type, torch.TensorType) or argument.type == torch.OptionalType.ofTensor()


def _forward_to_backend(op: Op) -> Callable:
    name, arguments = op.name, _arguments(op)
    names = [a.name for a in arguments] + ["backend"]
    defaults = {a.name: a.default_value for a in arguments if a.has_default_value()}

    def run(*args, **kwargs):
        # The dispatcher leaves out trailing arguments at their defaults.
        values = {**defaults, **dict(zip(names, args)), **kwargs}
        like = next(a for a in args if isinstance(a, Tensor))
        return backends.implementation(name, values["backend"], like.device.type)(*(values[a.name] for a in arguments))

    return run


def _training_autograd(op: Op) -> tuple[Callable, Callable]:
    """The autograd formula of a training forward: its backward op over the saved arguments and
    results it names, its results the gradients of the inputs ``op.gradients`` names."""
    names = [a.name for a in _arguments(op)] + ["backend", "backward"]
    results = [r.name for r in torch._C.parse_schema(f"fastbert::{op.name}{op.schema}").returns]
    backward_op = BY_NAME[op.backward]
    read = [a.name for a in _arguments(backward_op)]  # "grad", then the forward's arguments and results
    kinds = {a.name: _is_tensor(a) for a in _arguments(op)} | dict.fromkeys(results, True)
    saved = [n for n in read[1:] if kinds[n]]
    kept = [n for n in read[1:] if not kinds[n]]
    targets = [n for entry in op.gradients for n in (entry if isinstance(entry, tuple) else (entry,))]
    constants = [a.name for a in _arguments(op) if _is_tensor(a) and a.name not in targets]
    run_backward = CUSTOM_OPS[backward_op.name]

    def setup_context(ctx, inputs, output):
        values = dict(zip(names, inputs))
        for name in constants:
            if isinstance(values[name], Tensor) and values[name].requires_grad:
                raise RuntimeError(f"{op.constants.get(name, name)} requires grad, but fastbert computes no "
                                   f"gradient for it; detach it")
        values.update(zip(results, output))
        ctx.save_for_backward(*(values[n] for n in saved))
        ctx.kept = tuple(values[n] for n in kept)
        ctx.backend = values["backward"]
        ctx.dtypes = [t.dtype if isinstance(t, Tensor) else None for t in inputs]
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad, *_grad_of_saved):
        values = dict(zip(saved, ctx.saved_tensors), **dict(zip(kept, ctx.kept)), grad=grad)
        grads = {}
        for entry, result in zip(op.gradients, run_backward(*(values[n] for n in read), ctx.backend)):
            grads.update(zip(entry, result.unbind(1)) if isinstance(entry, tuple) else {entry: result})
        return tuple(grads[n].to(ctx.dtypes[i]) if ctx.needs_input_grad[i] and n in grads else None
                     for i, n in enumerate(names))

    return backward, setup_context


def _define(op: Op):
    custom = torch.library.custom_op(f"fastbert::{op.name}", _forward_to_backend(op), mutates_args=(),
                                     schema=_custom_schema(op))
    custom.register_fake(lambda *args, **kwargs: op.fake(*args[:len(_arguments(op))]))
    return custom


# Forwards before the training forwards whose autograd calls them (the table's order).
CUSTOM_OPS: dict[str, Callable] = {}
for _op in sorted(OPS, key=lambda op: op.backward is not None):
    CUSTOM_OPS[_op.name] = _define(_op)
    if _op.backward or _op.autograd:
        formula, setup = _training_autograd(_op) if _op.backward else _op.autograd
        CUSTOM_OPS[_op.name].register_autograd(formula, setup_context=setup)
globals().update(CUSTOM_OPS)


# ----------------------------------------------------------------------------- the step table

Kernels = NamedTuple("Kernels", [(name, Callable) for name in STEPS])
Kernels.__doc__ = "The function the encoder calls for each step, with the reference's signature."

_kernels_cache: dict[tuple, Kernels] = {}


def _traced(op: Op, backend: str) -> Callable:
    if op.traced is not None:
        return op.traced
    custom_op = CUSTOM_OPS[op.name]
    return lambda *args, **kwargs: custom_op(*args, **kwargs, backend=backend)


def _training_step(op: Op, chosen: dict[str, str]) -> Callable:
    """The step ``op`` with autograd: its training forward (the inference signature plus the
    keyword arguments :data:`~fastbert.declarations.TRAINING_DEFAULTS` turns off), or the op itself."""
    if op.train is None:
        return _traced(op, chosen[op.name])
    train = BY_NAME[op.train]
    names, defaults = _TRAINING_CALLS[op.name]
    custom_op, bound = CUSTOM_OPS[train.name], (chosen[train.name], chosen[train.backward])

    def step(*args, **kwargs):
        values = dict(zip(names, args), **kwargs)
        return custom_op(*(values[n] if n in values else defaults[n] for n in names), *bound)[0]

    return step


# Per trained step: its training forward's argument names, and the defaults that turn training
# off. Read from the schemas once, here: a step is also made while torch.compile traces, and
# Dynamo cannot trace torch's schema parser.
_TRAINING_CALLS = {op.name: ([a.name for a in _arguments(BY_NAME[op.train])],
                             {a.name: a.default_value for a in _arguments(op) if a.has_default_value()}
                             | TRAINING_DEFAULTS)
                   for op in OPS if op.train is not None}


def kernels(device: torch.device, dtype: torch.dtype, backend: str | None = None, training: bool = False) -> Kernels:
    """The functions running each step for ``dtype`` weights on ``device``, as
    :func:`fastbert.backends.plan` chooses.

    Eager: each backend's own function, cached per (device type, dtype, choice, grad mode);
    with gradients off, compiled kernels are called without the dispatcher. While
    ``torch.compile`` traces: the custom ops, with the chosen backend bound. ``training``
    (gradients or dropout wanted), eager or traced: the training forwards with their autograd,
    which also take dropout arguments.
    """
    chosen = backends.plan(device, backend, dtype)
    if training:
        if torch.compiler.is_compiling():
            return Kernels(*(_training_step(BY_NAME[name], chosen) for name in STEPS))
        key = ("training", device.type, dtype, *chosen.values())
        if key not in _kernels_cache:
            _kernels_cache[key] = Kernels(*(_training_step(BY_NAME[name], chosen) for name in STEPS))
        return _kernels_cache[key]
    if torch.compiler.is_compiling():
        return Kernels(*(_traced(BY_NAME[name], chosen[name]) for name in STEPS))
    direct = not torch.is_grad_enabled()
    key = (device.type, dtype, direct, *chosen.values())
    if key not in _kernels_cache:
        _kernels_cache[key] = Kernels(*(backends.implementation(name, chosen[name], device.type, direct)
                                        for name in STEPS))
    return _kernels_cache[key]
