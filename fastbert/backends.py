"""Which implementation runs each op.

Four backends exist; each is a module exposing some of the op functions of
:mod:`fastbert.reference` under the same names and signatures:

========  ==========================  ==============================================
backend   runs on                     module
========  ==========================  ==============================================
triton    CUDA tensors (CPU tensors   ``fastbert.kernels`` (Triton)
          under TRITON_INTERPRET=1)
cuda      CUDA tensors                ``fastbert.extension`` (the compiled ``fastbert._C``)
cpp       CPU tensors                 ``fastbert.extension`` (the compiled ``fastbert._C``)
torch     anything                    ``fastbert.reference`` (plain PyTorch)
========  ==========================  ==============================================

A module may also define ``implements(op, device_type, dtype) -> bool`` when the ops it has
depend on the device or the weights' dtype (the extension has no CUDA attention kernel; on CUDA
the Triton GEMM serves only fp16/bf16, fp32 goes to cuBLAS).

Choosing: an explicit ``backend=`` argument wins, then the :func:`use_backend` context, then
the ``FASTBERT_BACKEND`` environment variable, then the device default (CUDA: triton, cuda,
torch; CPU: cpp, torch). The chosen backend runs every op it implements; an op it does not
implement runs on the next backend of the device's order. A backend that cannot run at all
here (no GPU, extension not built, Triton missing, a GPU older than the kernels need) is
skipped with one warning that says why; plans are per device, so each GPU is judged on its own.

:func:`kernels` resolves that choice once into the functions the encoder calls: in eager mode
the backends' own functions, called directly (a ``torch.library`` custom op costs several times
more host time per call than the kernel of a short batch); while ``torch.compile`` traces, the
custom ops of :mod:`fastbert.ops`, which give it one graph node with a fake implementation each.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from fastbert import _compat

BACKENDS = ("triton", "cuda", "cpp", "torch")
OPS = ("linear", "attention", "linear_gelu", "add_layernorm", "embed_layernorm", "unpad", "pad")
# The fused ops that train: each has a forward that saves what its backward needs, and a backward.
TRAINED = ("attention", "linear_gelu", "add_layernorm", "embed_layernorm")
TRAINING_OPS = tuple(f"{op}_{part}" for op in TRAINED for part in ("train", "backward"))
DEVICE_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "FASTBERT_BACKEND"

_MODULES = {
    "triton": "fastbert.kernels",
    "cuda": "fastbert.extension",
    "cpp": "fastbert.extension",
    "torch": "fastbert.reference",
}

_local = threading.local()
_warned: set[tuple[str, str]] = set()
_plan_cache: dict[tuple[str, str | None, torch.dtype | None], dict[str, str]] = {}
_impl_cache: dict[tuple[str, str, str, bool], object] = {}
_kernels_cache: dict[tuple, "Kernels"] = {}


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine or device; the message says why."""


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown fastbert backend {backend!r}; choose one of {BACKENDS}")


def load(backend: str, device: torch.device | str):
    """The module implementing ``backend`` for ``device``'s tensors (a device or a device type);
    raises BackendUnavailable."""
    _check_name(backend)
    device_type = torch.device(device).type
    if backend == "triton" and device_type == "cpu" and not _compat.interpreting():
        raise BackendUnavailable("triton runs on CPU tensors only under TRITON_INTERPRET=1")
    if backend == "cuda" and device_type != "cuda":
        raise BackendUnavailable("the cuda backend needs CUDA tensors")
    if backend == "cpp" and device_type != "cpu":
        raise BackendUnavailable("the cpp backend needs CPU tensors")
    if device_type not in DEVICE_ORDER and backend != "torch":
        raise BackendUnavailable(f"only the torch backend runs on {device_type} tensors")
    try:
        module = importlib.import_module(_MODULES[backend])
    except ImportError as exc:
        raise BackendUnavailable(f"{_MODULES[backend]} cannot be imported ({exc})") from exc
    reason = getattr(module, "unavailable_reason", lambda device: None)(device)
    if reason:
        raise BackendUnavailable(reason)
    return module


def requested_backend(explicit: str | None = None) -> str | None:
    """The backend asked for by argument, context manager or environment, or None for the default."""
    for choice in (explicit, getattr(_local, "backend", None), os.environ.get(ENV_VAR) or None):
        if choice is not None:
            _check_name(choice)
            return choice
    return None


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Run fastbert ops inside the block on ``backend`` (None restores the default choice)."""
    if backend is not None:
        _check_name(backend)
    previous = getattr(_local, "backend", None)
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def _warn_once(backend: str, reason: str) -> None:
    if (backend, reason) not in _warned:
        _warned.add((backend, reason))
        warnings.warn(f"fastbert: backend {backend!r} unavailable, falling back: {reason}", stacklevel=3)


def _implements(module, op: str, device_type: str, dtype: torch.dtype | None) -> bool:
    check = getattr(module, "implements", None)
    return hasattr(module, op) and (check is None or check(op, device_type, dtype))


# Dynamo calls this eagerly and bakes the result into the graph: a plan depends only on
# machine state (installed backends, environment), never on tensor values.
@torch._dynamo.assume_constant_result
def plan(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Map every op to the backend that will run it for tensors on ``device`` (of ``dtype``, if given)."""
    requested = requested_backend(backend)
    key = (str(device), requested, dtype)  # per GPU: their capabilities may differ
    if key in _plan_cache:
        return _plan_cache[key]
    default = DEVICE_ORDER.get(device.type, ("torch",))
    order = default if requested is None else (requested, *[b for b in default if b != requested])
    modules = {}
    for name in order:
        try:
            modules[name] = load(name, device)
        except BackendUnavailable as exc:
            if name == requested or name == default[0]:
                _warn_once(name, str(exc))
    if "torch" not in modules:
        modules["torch"] = load("torch", device)
    result = {}
    for op in OPS + TRAINING_OPS:
        result[op] = next(name for name, module in modules.items() if _implements(module, op, device.type, dtype))
    _plan_cache[key] = result
    return result


def implementation(op: str, backend: str, device_type: str, direct: bool = False):
    """The function running ``op`` on ``backend`` for ``device_type`` tensors.

    ``direct`` (only while gradients are off) lets a backend skip the dispatcher, where it can
    (a module's ``function(op, device_type, direct)``).
    """
    key = (op, backend, device_type, direct)
    if key not in _impl_cache:
        module = load(backend, device_type)
        pick = getattr(module, "function", None)
        _impl_cache[key] = pick(op, device_type, direct) if pick else getattr(module, op)
    return _impl_cache[key]


class Kernels(NamedTuple):
    """The function the encoder calls for each step, with the reference's signature."""

    linear: Callable  # x Wᵀ + b: every GEMM that is not fused with GELU
    attention: Callable
    linear_gelu: Callable
    add_layernorm: Callable
    embed_layernorm: Callable
    unpad: Callable
    pad: Callable


def _traced(op: str, backend: str) -> Callable:
    from fastbert import ops

    if op == "linear":
        return F.linear  # Inductor plans GEMMs itself (and prepacks weights with freezing)
    custom_op = getattr(ops, op)
    return lambda *args, **kwargs: custom_op(*args, **kwargs, backend=backend)


def kernels(device: torch.device, dtype: torch.dtype, backend: str | None = None, training: bool = False) -> Kernels:
    """The functions running each op for ``dtype`` weights on ``device``, as :func:`plan` chooses.

    Eager: each backend's own function, cached per (device type, dtype, choice, grad mode);
    with gradients off, compiled kernels are called without the dispatcher. While
    ``torch.compile`` traces: the custom ops, with the chosen backend bound. ``training``
    (gradients or dropout wanted), eager or traced: the training ops with their autograd
    (:func:`fastbert.ops.training_functions`), which also take dropout arguments.
    """
    chosen = plan(device, backend, dtype)
    if training:
        from fastbert import ops

        if torch.compiler.is_compiling():
            return Kernels(linear=F.linear, **ops.training_functions(chosen))
        key = ("training", device.type, dtype, *chosen.values())
        if key not in _kernels_cache:
            _kernels_cache[key] = Kernels(linear=F.linear, **ops.training_functions(chosen))
        return _kernels_cache[key]
    if torch.compiler.is_compiling():
        return Kernels(*(_traced(op, chosen[op]) for op in OPS))
    direct = not torch.is_grad_enabled()
    key = (device.type, dtype, direct, *chosen.values())
    if key not in _kernels_cache:
        _kernels_cache[key] = Kernels(*(implementation(op, chosen[op], device.type, direct) for op in OPS))
    return _kernels_cache[key]
