"""Values computed from tensors, kept until a tensor's contents may have changed.

A tensor's *stamp* is its version counter and its storage: an in-place update bumps the
first, ``.to()``/``.half()``/``load_state_dict`` with assign swap the second. Both caches that
keep a computed copy of weights use this one mechanism: :mod:`fastbert.views` (the fused Q/K/V
weight of a layer, MPNet's relative-bias table, as :class:`Derived`) and :mod:`fastbert.cpu_gemm`
(packed GEMM weights, as :class:`PerTensor`).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


def stamp(t: torch.Tensor) -> tuple[int, int]:
    """What changes when ``t``'s contents may have: its version and its storage.

    Inference tensors (made under ``torch.inference_mode``) keep no version counter; an
    in-place update of one inside inference mode is not seen.
    """
    return (-1 if t.is_inference() else t._version), t.data_ptr()


def _build(build: Callable, sources) -> object:
    # A normal tensor even when built under inference_mode, so it serves every mode after.
    with torch.inference_mode(False), torch.no_grad():
        return build(*sources)


class Derived:
    """``build(*sources)``, kept until a source's stamp changes; holds its sources."""

    def __init__(self, build: Callable, *sources: torch.Tensor):
        self.build, self.sources = build, sources
        self._stamp = None
        self.value = None

    def traced(self):
        """Built as part of the graph (``torch.compile`` folds or reuses it; autograd sees it)."""
        return self.build(*self.sources)

    def get(self):
        """The kept value, rebuilt if a source changed since the last call."""
        # map, not a generator: this runs once per layer and forward.
        current = tuple(map(stamp, self.sources))
        if current != self._stamp:
            self.value = _build(self.build, self.sources)
            self._stamp = current
        return self.value


class PerTensor:
    """``build(t)`` for any tensor ``t``, one kept per live tensor until its stamp changes.

    Holds no reference to the tensors: an entry goes when its tensor does (its id may be reused
    only after that).
    """

    def __init__(self, build: Callable[[torch.Tensor], object]):
        self.build = build
        self._entries: dict[int, tuple[weakref.ref, tuple[int, int], object]] = {}

    def get(self, t: torch.Tensor):
        key, current = id(t), stamp(t)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not t or entry[1] != current:
            entries = self._entries
            entry = (weakref.ref(t, lambda _, key=key: entries.pop(key, None)), current,
                     _build(self.build, (t.detach(),)))
            entries[key] = entry
        return entry[2]

    def __contains__(self, tensor_id: int) -> bool:
        """Whether a value is kept for the live tensor of id ``tensor_id``."""
        return tensor_id in self._entries

    def drop(self, t: torch.Tensor) -> None:
        self._entries.pop(id(t), None)
