"""Which implementation runs each op.

Four backends exist; each is a module exposing the op functions :mod:`fastbert.declarations`
declares for it, under the names and signatures of :mod:`fastbert.reference`:

========  ==========================  ==============================================
backend   runs on                     module
========  ==========================  ==============================================
triton    CUDA tensors (CPU tensors   ``fastbert.kernels`` (Triton)
          under TRITON_INTERPRET=1)
cuda      CUDA tensors                ``fastbert.extension`` (the compiled ``fastbert._C``)
cpp       CPU tensors                 ``fastbert.extension`` (the compiled ``fastbert._C``)
torch     anything                    ``fastbert.reference`` (plain PyTorch)
========  ==========================  ==============================================

A module may also define ``implements(op, device_type, dtype) -> bool`` when the ops it serves
depend on the weights' dtype (on CUDA the Triton GEMM serves only fp16/bf16, fp32 goes to cuBLAS).

Choosing: an explicit ``backend=`` argument wins, then the :func:`use_backend` context, then
the ``FASTBERT_BACKEND`` environment variable, then the device default (CUDA: triton, cuda,
torch; CPU: cpp, torch). The chosen backend runs every op it implements; an op it does not
implement runs on the next backend of the device's order. A backend that cannot run at all
here (no GPU, extension not built, Triton missing, a GPU older than the kernels need) is
skipped with one warning that says why; plans are per device, so each GPU is judged on its own.

:func:`fastbert.ops.kernels` resolves that choice once into the functions the encoder calls: in
eager mode the backends' own functions, called directly (a ``torch.library`` custom op costs
several times more host time per call than the kernel of a short batch); while ``torch.compile``
traces, the custom ops of :mod:`fastbert.ops`, which give it one graph node with a fake
implementation each.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Iterator

import torch

from fastbert import _compat
from fastbert.declarations import BY_NAME, OPS

BACKENDS = ("triton", "cuda", "cpp", "torch")
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


def implements(backend: str, module, op: str, device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether ``op`` is declared for ``backend`` and its module serves it for these tensors."""
    check = getattr(module, "implements", None)
    return (backend == "torch" or backend in BY_NAME[op].backends) and (check is None or check(op, device_type, dtype))


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
    for op in OPS:
        result[op.name] = next(name for name, module in modules.items()
                               if implements(name, module, op.name, device.type, dtype))
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
