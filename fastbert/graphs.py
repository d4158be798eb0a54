"""CUDA graphs over the encoder: one captured graph per shape bucket.

A graph replays a whole forward's kernels in one launch, so the host no longer sets the pace
for small batches. Graphs need fixed shapes and addresses; :class:`GraphedEncoder` gets them
by rounding each call up to a *bucket* and running the static path of :func:`fastbert.encoder.encode`
on that bucket's own input buffers:

1. the inputs are checked and their valid tokens counted in one readback, as in eager mode;
2. the batch rounds up to a power of two, the padded length to a power of two (at most the
   position table, at least the call's own length) and the token count to a multiple of
   ``max(64, 2 ** (bit_length(tokens) - 3))`` (so at most a quarter of the rows are dummies,
   and four buckets per doubling);
3. the inputs are copied into the bucket's buffers; the extra rows and columns are padding;
4. the bucket's graph is replayed, captured on its first use; all graphs share one memory pool
   and at most ``max_graphs`` are kept (the least recently used goes first);
5. the outputs are copied out of the graph's buffers, cut back to the call's shape.

Outputs equal the eager path's on valid tokens: padding and dummy rows never reach a real row.
On CPU tensors the same bucketed path runs without capture. 3D/4D masks run the eager path.
Capture and replay run on the model's GPU (its own streams), whichever GPU is current. The
buffers and graphs are normal tensors even when the first call comes under
``torch.inference_mode`` (as sentence-transformers encodes), so later ``no_grad`` calls can
fill them.

Only the triton backend's attention can be captured (the reference attention, the other one
on CUDA, reads the sequence lengths back). When attention runs elsewhere (``backend="cuda"``
or ``"torch"``, or Triton unavailable on that GPU), calls run eagerly, with one warning.

A graph reads the weights where they were at capture: in-place updates (``load_state_dict``,
optimizer steps) are seen, and so is a new parameter (``module.weight = ...``), ``.to()`` or a
rebuilt fused Q/K/V weight, which drop the captured graphs.
"""

from __future__ import annotations

import collections
import warnings
from typing import Callable

import torch

from fastbert import backends, encoder, views

_warned: set[str] = set()


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def token_bucket(tokens: int) -> int:
    """Rows a packed batch of ``tokens`` valid tokens gets: at most 25 % of them dummies."""
    step = max(64, 1 << max(tokens.bit_length() - 3, 0))
    return -(-tokens // step) * step


def shape_bucket(batch: int, seqlen: int, tokens: int, position_limit: int) -> tuple[int, int, int]:
    """(batch, padded length, packed rows) of the bucket a call of this shape runs in."""
    b = _power_of_two(batch)
    s = max(seqlen, min(_power_of_two(seqlen), position_limit))
    return b, s, min(token_bucket(tokens), b * s)


def captures(device: torch.device) -> bool:
    """Whether calls on ``device`` tensors are captured (elsewhere the bucketed path runs uncaptured)."""
    return device.type == "cuda"


def uncapturable_reason(device: torch.device, backend: str | None, dtype: torch.dtype) -> str | None:
    """Why a forward of ``dtype`` weights on ``device`` with ``backend`` cannot be captured, or None."""
    attention = backends.plan(device, backend, dtype)["attention"]
    if attention == "triton":
        return None
    return (f"cuda_graphs=True needs attention on the triton backend (the reference attention reads the "
            f"sequence lengths back, which a capture forbids), but with backend={backend!r} it runs on "
            f"{attention!r} on {device}; running without CUDA graphs")


class _Graph:
    """One bucket: its input buffers, and its captured graph with output buffers (or the function, on CPU)."""

    def __init__(self, run: Callable, device: torch.device, shape: tuple[int, int], positions: bool, types: bool,
                 pool, capture: bool):
        self.device = device
        zeros = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(shape, **zeros)
        self.mask = torch.zeros(shape, dtype=torch.bool, device=device)
        self.position_ids = torch.zeros(shape, **zeros) if positions else None
        self.token_type_ids = torch.zeros(shape, **zeros) if types else None
        self.run = lambda: run(self.input_ids, self.mask, self.token_type_ids, self.position_ids)
        self.graph = None
        if capture:
            # On the model's GPU, not the current one: capture begins on the current device's
            # current stream, and torch.cuda.graph's default capture stream belongs to whichever
            # GPU was current when it was first made.
            with torch.cuda.device(device):
                # Warm up on a side stream first (Triton compiles, cuBLAS picks workspaces), as capture requires.
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self.run()
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool, stream=side):
                    self.outputs = self.run()

    def __call__(self):
        if self.graph is None:
            return self.run()
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


class GraphedEncoder:
    """Runs :func:`fastbert.encoder.encode` through CUDA graphs, one per shape bucket."""

    def __init__(self, max_graphs: int = 16):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._pool = None
        self._weights = None  # what the graphs were captured against

    def clear(self) -> None:
        self.graphs.clear()

    def __call__(self, bert: torch.nn.Module, input_ids, attention_mask=None,
                 token_type_ids=None, position_ids=None, backend: str | None = None,
                 output_hidden_states: bool = False):
        args = (bert, input_ids, attention_mask, token_type_ids, position_ids)
        if attention_mask is not None and attention_mask.dim() != 2:
            return encoder.encode(*args, backend=backend, output_hidden_states=output_hidden_states)
        tokens, _ = encoder.inspect(*args)
        if tokens == 0:
            return encoder.encode(*args, backend=backend, output_hidden_states=output_hidden_states)
        view = views.encoder_view(bert)
        # A new view (a parameter was registered) or a rebuilt derived weight (.to(), an update of
        # Q/K/V or of a relative-bias table) means the graphs read stale addresses.
        weights = (view, *(layer.qkv.get()[0] for layer in view.layers),
                   *((view.relative_bias.get(),) if view.relative_bias is not None else ()))
        if self._weights is None or len(weights) != len(self._weights) or any(
                a is not b for a, b in zip(weights, self._weights)):
            self.graphs.clear()
            self._weights = weights
        device = input_ids.device
        if captures(device):
            reason = uncapturable_reason(device, backend, view.word_embeddings.dtype)
            if reason is not None:
                if reason not in _warned:
                    _warned.add(reason)
                    warnings.warn(f"fastbert: {reason}", stacklevel=2)
                return encoder.encode(*args, backend=backend, output_hidden_states=output_hidden_states)
        batch, seqlen = input_ids.shape
        limit = view.max_length if position_ids is None else 1 << 62
        b, s, rows = shape_bucket(batch, seqlen, tokens, limit)
        key = (b, s, rows, position_ids is not None, token_type_ids is not None, output_hidden_states, backend)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._new_graph(key, bert, device)
        self.graphs.move_to_end(key)
        graph.input_ids[:batch, :seqlen] = input_ids
        graph.mask.zero_()
        graph.mask[:batch, :seqlen] = True if attention_mask is None else attention_mask
        for buffer, given in ((graph.position_ids, position_ids), (graph.token_type_ids, token_type_ids)):
            if buffer is not None:
                buffer[:batch, :seqlen] = given
        with torch.no_grad():
            hidden, states = graph()
        hidden = hidden[:batch, :seqlen].clone()
        states = tuple(x[:batch, :seqlen].clone() for x in states) if states is not None else None
        return hidden, states

    def _new_graph(self, key, bert, device) -> _Graph:
        b, s, rows, positions, types, output_hidden_states, backend = key
        capture = captures(device)
        if capture and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)

        def run(input_ids, mask, token_type_ids, position_ids):
            return encoder.encode(bert, input_ids, mask, token_type_ids, position_ids, backend=backend,
                                  output_hidden_states=output_hidden_states, token_capacity=rows)

        # Normal tensors even under inference_mode: later calls outside it fill the same buffers.
        with torch.inference_mode(False), torch.no_grad():
            graph = _Graph(run, device, (b, s), positions, types, self._pool, capture)
        self.graphs[key] = graph
        return graph
