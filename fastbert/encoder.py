"""The padding-free encoder, written against the op seam; one loop for every family.

``encode`` runs the backbone of any family :mod:`fastbert.views` reads (BERT, RoBERTa and its
relatives, ELECTRA, ALBERT, DistilBERT, MPNet; the HF model itself after :func:`fastbert.optimize`,
or :class:`fastbert.model.Bert` without transformers installed) from its canonical view, which
says everything that differs between families; nothing here names one::

    input_ids, attention_mask [B, S]
      -> one readback: token count, longest sequence, validity of ids and mask
      -> valid-token indices, cu_seqlens [B + 1] (no host syncs from here on)
      -> positions: column numbers, or HF's count of non-pad ids (on the padded ids, then gathered)
      -> embeddings + LayerNorm on the T valid tokens only (+ E->H projection)   [T, H]
      -> per layer: QKV GEMM -> varlen attention (+ relative bias) -> out GEMM -> add+LN
                    -> linear+bias+GELU -> down GEMM -> add+LN
      -> pad back to [B, S, H]; pad positions are exactly zero

A 2D 0/1 key-padding mask takes this packed path. A 3D ``[B, S, S]`` or 4D ``[B|1, 1|N, S, S]``
mask (bool: True = attend; float: additive) takes the padded path: every position is computed
and the mask is an additive attention bias, as Hugging Face applies such masks (a 4D mask is
used as given, so a decoder's causal part must already be in it).

With ``token_capacity`` (and always while ``torch.compile`` traces) every shape is fixed before
the data is read: the packed rows number ``token_capacity`` (``B * S`` when tracing), dummy rows
fill what the real tokens leave, ids are checked by device-side asserts and nothing is read
back. That is the path CUDA graphs capture (:mod:`fastbert.graphs`).

Training: when gradients are on and a weight requires one, or the model trains with dropout,
every op runs as a training op with its autograd (:func:`fastbert.ops.kernels`):
dropout at each HF dropout module's rate (one seed per site and forward, drawn from torch's
generator), the fused Q/K/V weight built in the graph, and a layer whose HF module has
``gradient_checkpointing`` set recomputed in the backward (``torch.utils.checkpoint``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from fastbert import ops, views


@dataclasses.dataclass
class Packing:
    """Where the valid tokens of a padded ``[batch, seqlen]`` batch sit once packed.

    Exact packing has one row per valid token. Static packing (``torch.compile``, CUDA graph
    buckets) has a fixed number of rows: the valid tokens first, then dummy rows that belong to
    no sequence (attention never reads them and every other op is row-wise, so they cannot
    change a real row); padding back drops them.
    """

    indices: torch.Tensor  # [rows] int64, flat position in batch * seqlen of each row (dummy rows: 0)
    cu_seqlens: torch.Tensor  # [batch + 1] int32, row offsets of each sequence
    max_seqlen: int  # a bound on the sequence lengths (it sizes the attention grid)
    batch: int
    seqlen: int
    valid: torch.Tensor | None = None  # [batch, seqlen] bool when there are dummy rows, else None

    @classmethod
    def full(cls, batch: int, seqlen: int, device: torch.device) -> "Packing":
        indices = torch.arange(batch * seqlen, device=device)
        cu_seqlens = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32, device=device)
        return cls(indices, cu_seqlens, seqlen, batch, seqlen)

    def pad(self, x: torch.Tensor, kernels: ops.Kernels) -> torch.Tensor:
        """Packed rows ``[rows, ...]`` back to ``[batch, seqlen, ...]``, zeros at pad positions."""
        if self.valid is None:
            return kernels.pad(x, self.indices, self.batch, self.seqlen)
        # Dummy rows must land nowhere: each position gathers its own row (its rank among the
        # valid tokens) and pad positions are zeroed.
        valid = self.valid.flatten()
        rows = x.index_select(0, (valid.cumsum(0) - 1).clamp_min(0))
        return torch.where(valid[:, None], rows, 0).view(self.batch, self.seqlen, *x.shape[1:])


def readback(values: list[torch.Tensor]) -> list[int]:
    """The forward's one device-to-host transfer (a sync on a GPU): every scalar the host needs."""
    if not values:
        return []
    return torch.stack([v.to(torch.int64) for v in values]).tolist()


class _IdCheck(NamedTuple):
    name: str
    ids: torch.Tensor
    upper: int  # valid ids are 0 .. upper - 1
    what: str  # the config field that sets upper (the table's rows)

    def bounds(self) -> list[torch.Tensor]:
        return list(torch.aminmax(self.ids))

    def raise_if_bad(self, low: int, high: int) -> None:
        if low < 0 or high >= self.upper:
            raise ValueError(f"{self.name} holds values in [{low}, {high}] but {self.what} is {self.upper}: "
                             f"valid ids are 0..{self.upper - 1}")

    def assert_on_device(self) -> None:
        ok = ((self.ids >= 0) & (self.ids < self.upper)).all()
        torch._assert_async(ok, f"{self.name} holds values outside 0..{self.upper - 1} ({self.what} is {self.upper})")


_MASK_VALUES = ("a 2D attention_mask must hold only 0 (padding) and 1 (token); for an additive mask pass a 4D "
                "[batch, 1, seq, seq] tensor")


def _check_device(name: str, tensor: torch.Tensor | None, device: torch.device) -> None:
    if tensor is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move it to {device}")


def _key_padding(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device) -> torch.Tensor:
    """The 2D mask as bool ``[B, S]`` (True = real token); its values are checked with the ids."""
    if attention_mask is None:
        return torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape {(batch, seqlen)}; "
            "a 2D attention_mask must match input_ids"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
    return attention_mask != 0


def _attention_bias(mask: torch.Tensor, batch: int, heads: int, seqlen: int, dtype: torch.dtype) -> torch.Tensor:
    """A 3D/4D mask as an additive bias broadcastable to ``[B, N, S, S]``."""
    if mask.dim() == 3:
        mask = mask[:, None]
    b, n, q, k = mask.shape
    if b not in (1, batch) or n not in (1, heads) or (q, k) != (seqlen, seqlen):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; a 4D mask must be [batch|1, 1|heads, seq, seq] = "
            f"[{batch}|1, 1|{heads}, {seqlen}, {seqlen}]"
        )
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    elif not mask.is_floating_point():
        raise TypeError(f"a 3D/4D attention_mask must be bool (True = attend) or float (additive), got {mask.dtype}")
    return mask.expand(batch, heads, seqlen, seqlen)


def _layer(k: ops.Kernels, w: views.LayerView, h, packing: Packing, bias, causal: bool, heads: int, gelu: str,
           fuse_in_graph: bool, relative=None, dropout: "_LayerDropout | None" = None):
    T, H = h.shape
    w_qkv, b_qkv = w.qkv.traced() if fuse_in_graph else w.qkv.get()
    q, key, v = k.linear(h, w_qkv, b_qkv).view(T, 3, heads, H // heads).unbind(1)
    scale = (H // heads) ** -0.5
    attention, ln1, ln2 = ({}, {}, {}) if dropout is None else dropout
    if relative is not None:  # by keyword: a backend without them raises instead of binding them to something else
        attention = dict(attention, rel_bias=relative[0], positions=relative[1])
    ctx = k.attention(q, key, v, packing.cu_seqlens, packing.max_seqlen, scale, causal, bias, **attention)
    a = k.linear(ctx.view(T, H), w.out_weight)
    h = k.add_layernorm(a, h, w.out_bias, w.ln1_weight, w.ln1_bias, w.ln1_eps, **ln1)
    i = k.linear_gelu(h, w.up_weight, w.up_bias, gelu)
    o = k.linear(i, w.down_weight)
    return k.add_layernorm(o, h, w.down_bias, w.ln2_weight, w.ln2_bias, w.ln2_eps, **ln2)


class _LayerDropout(NamedTuple):
    """The dropout keyword arguments of a layer's three dropout sites (empty where p = 0)."""

    attention: dict
    ln1: dict
    ln2: dict


def _rate(module) -> float:
    """The p an HF dropout module applies now: its own, while it trains; 0 otherwise."""
    return float(module.p) if module is not None and module.training else 0.0


def _dropout_plan(view: views.EncoderView, device: torch.device) -> tuple[dict, list[_LayerDropout]] | None:
    """Dropout keyword arguments for the embeddings and every layer, or None when every p is 0.

    Each site with p > 0 gets its own seed, drawn from torch's generator for ``device`` (so
    ``torch.manual_seed`` reproduces a run); the seeds are tensors, so a new one recompiles nothing.
    """
    rates = [_rate(view.embedding_dropout)] + [
        _rate(m) for layer in view.layers
        for m in (layer.attention_dropout, layer.attention_output_dropout, layer.output_dropout)]
    if not any(rates):
        return None
    seeds = torch.randint(0, 2**62, (len(rates),), device=device)

    def site(i: int) -> dict:
        return {"dropout_p": rates[i], "seed": seeds[i:i + 1]} if rates[i] else {}

    layers = [_LayerDropout(site(1 + 3 * n), site(2 + 3 * n), site(3 + 3 * n)) for n in range(len(view.layers))]
    return site(0), layers


def _checkpointed(layer: views.LayerView) -> bool:
    """Whether HF's ``gradient_checkpointing_enable()`` asked this layer to recompute in the backward."""
    return bool(getattr(layer.module, "gradient_checkpointing", False)) and layer.module.training


def _checkpoint_function(layer: views.LayerView):
    """The checkpoint function HF set on the layer (``gradient_checkpointing_kwargs`` such as
    ``use_reentrant`` bound in), else ``torch.utils.checkpoint.checkpoint`` without reentrancy."""
    hf = getattr(layer.module, "_gradient_checkpointing_func", None)
    if hf is not None:
        return hf
    return lambda function, *args: torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


class Batch:
    """One call's inputs, checked on the host; what depends on their values is checked on the device.

    The values are checked, and the token count and longest sequence learnt, by :meth:`read_back`
    (one transfer) or, on the static path, by device-side asserts (:meth:`assert_on_device`).
    """

    def __init__(self, view: views.EncoderView, input_ids, attention_mask=None, token_type_ids=None,
                 position_ids=None):
        device = view.word_embeddings.device
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape}")
        if input_ids.shape[1] == 0:
            # Nothing to encode and no first token to pool; HF's own forward fails here too (a reshape error).
            raise ValueError(f"input_ids has sequence length 0 (shape {tuple(input_ids.shape)}); "
                             "every sequence needs at least one token")
        if view.token_type_embeddings is None:
            token_type_ids = None  # a family without token types ignores them, as its HF forward does
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            _check_device(name, t, device)
            if t is not None and name != "attention_mask" and t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")
        self.batch, self.seqlen = batch, seqlen = input_ids.shape
        self.input_ids = input_ids
        self.checks = [_IdCheck("input_ids", input_ids, view.word_embeddings.shape[0], "vocab_size")]
        positions = view.position_embeddings.shape[0]
        if position_ids is None:
            if seqlen > view.max_length:
                counted = "" if view.padding_idx is None else (
                    f" less padding_idx + 1 = {view.padding_idx + 1} (positions count from padding_idx + 1)")
                raise ValueError(
                    f"input_ids has sequence length {seqlen} but max_position_embeddings is {positions}{counted}; "
                    f"truncate the input to at most {view.max_length} tokens"
                )
        else:
            self.checks.append(_IdCheck("position_ids", position_ids, positions, "max_position_embeddings"))
            position_ids = position_ids.expand(batch, seqlen)
        if token_type_ids is not None:
            self.checks.append(_IdCheck("token_type_ids", token_type_ids, view.token_type_embeddings.shape[0],
                                        "type_vocab_size"))
            token_type_ids = token_type_ids.expand(batch, seqlen)
        self.position_ids, self.token_type_ids = position_ids, token_type_ids
        if batch * seqlen == 0:
            self.checks = []  # nothing to read, and nothing to check

        self.bias = self.valid = None
        self.mask_check: list[torch.Tensor] = []  # integer masks: (min, max); float masks: (any value not 0/1,)
        self.causal = view.causal
        if attention_mask is not None and attention_mask.dim() in (3, 4):
            self.bias = _attention_bias(attention_mask, batch, view.heads, seqlen,
                                        view.word_embeddings.dtype)
            self.causal = False
        elif attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2D [batch, seq], 3D [batch, seq, seq] or 4D [batch, 1, seq, seq]; "
                f"got shape {tuple(attention_mask.shape)}"
            )
        else:
            self.valid = _key_padding(attention_mask, batch, seqlen, device)
            if attention_mask is not None and attention_mask.dtype != torch.bool and batch * seqlen:
                if attention_mask.is_floating_point():
                    self.mask_check = [((attention_mask != 0) & (attention_mask != 1)).any()]
                else:
                    self.mask_check = list(torch.aminmax(attention_mask))
            self.lengths = self.valid.sum(1, dtype=torch.int32)
            self.cu_seqlens = torch.nn.functional.pad(self.lengths.cumsum(0, dtype=torch.int32), (1, 0))

    def read_back(self) -> tuple[int, int]:
        """Check every value in one device-to-host transfer; returns (valid tokens, longest sequence)."""
        counted = self.valid is not None and self.batch > 0
        scalars = [self.cu_seqlens[-1], self.lengths.max()] if counted else []
        scalars += [b for check in self.checks for b in check.bounds()]
        values = readback(scalars + self.mask_check)
        if self.mask_check and self._mask_is_bad(values[len(scalars):]):
            raise ValueError(_MASK_VALUES)
        first = 2 if counted else 0
        for i, check in enumerate(self.checks):
            check.raise_if_bad(values[first + 2 * i], values[first + 2 * i + 1])
        if self.valid is None:
            return self.batch * self.seqlen, self.seqlen
        return tuple(values[:2]) if counted else (0, 0)

    def assert_on_device(self) -> None:
        """Check every value without reading anything back (asynchronous asserts)."""
        for check in self.checks:
            check.assert_on_device()
        if self.mask_check:
            torch._assert_async(~self._mask_is_bad(self.mask_check), _MASK_VALUES)

    def _mask_is_bad(self, check):
        """From ``mask_check``'s values (read back, or still on the device): a value is not 0 or 1."""
        if len(check) == 1:
            return check[0]
        low, high = check
        return (low < 0) | (high > 1)

    def packing(self, rows: int, longest: int, exact: bool) -> Packing:
        """``rows`` packed rows: the valid tokens, then (unless ``exact``) dummy rows."""
        if self.valid is None:
            return Packing.full(self.batch, self.seqlen, self.input_ids.device)
        indices = torch.nonzero_static(self.valid.flatten(), size=rows, fill_value=0).flatten()
        return Packing(indices, self.cu_seqlens, longest, self.batch, self.seqlen, None if exact else self.valid)


def inspect(model: torch.nn.Module, input_ids, attention_mask=None, token_type_ids=None,
            position_ids=None) -> tuple[int, int]:
    """Check a call's inputs as :func:`encode` does; returns (valid tokens, longest sequence)."""
    return Batch(views.encoder_view(model), input_ids, attention_mask, token_type_ids, position_ids).read_back()


def positions_from_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Positions counted from the pad id, ``[B, S]``: pad ids get ``padding_idx``, the n-th other id ``padding_idx + n``.

    Computed from the ids, not the mask (a masked token that is not the pad id still counts,
    a pad id inside the text gets the padding row), exactly as HF's
    ``create_position_ids_from_input_ids``; on the device, before the packed rows are gathered.
    """
    real = input_ids.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


_zero_rows: dict[tuple, torch.Tensor] = {}


def _no_token_types(word_embeddings: torch.Tensor) -> torch.Tensor:
    """A one-row zero token-type table for families without one: adding it changes no bit."""
    if torch.compiler.is_compiling():
        return word_embeddings.new_zeros(1, word_embeddings.shape[1])
    key = (word_embeddings.device, word_embeddings.dtype, word_embeddings.shape[1])
    if key not in _zero_rows:
        with torch.inference_mode(False), torch.no_grad():
            _zero_rows[key] = word_embeddings.new_zeros(1, word_embeddings.shape[1])
    return _zero_rows[key]


def encode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    backend: str | None = None,
    output_hidden_states: bool = False,
    token_capacity: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run embeddings and every layer of ``model``; returns ``(last_hidden_state [B, S, H], hidden_states)``.

    ``model`` is a backbone of any family :mod:`fastbert.views` reads. ``hidden_states``
    (embeddings output after the projection, if any, then each applied layer's) is returned
    padded like the last one when ``output_hidden_states`` is set, else None.
    ``token_capacity`` (at least the number of valid tokens) selects the static path described
    in the module docstring. Raises ValueError/TypeError naming the argument for malformed input.
    """
    view = views.encoder_view(model)
    batch = Batch(view, input_ids, attention_mask, token_type_ids, position_ids)
    tracing = torch.compiler.is_compiling()
    if token_capacity is not None or tracing:
        batch.assert_on_device()
        rows = batch.batch * batch.seqlen if token_capacity is None else token_capacity
        packing = batch.packing(rows, batch.seqlen, exact=False)
    else:
        tokens, longest = batch.read_back()
        packing = batch.packing(tokens, longest, exact=True)

    word = view.word_embeddings
    # Training ops (with autograd and dropout) when a weight wants a gradient or dropout is on;
    # otherwise the inference kernels, called directly.
    grad = torch.is_grad_enabled() and view.requires_grad()
    dropout = _dropout_plan(view, word.device) if model.training else None
    training = grad or dropout is not None
    if grad and batch.bias is not None and batch.bias.requires_grad:
        raise ValueError("attention_mask requires grad, but fastbert gives an additive mask no gradient; "
                         "pass attention_mask.detach()")
    k = ops.kernels(word.device, word.dtype, backend, training=training)
    embedding_dropout = {} if not training else dict(
        dropout[0] if dropout is not None else {}, word_padding_idx=view.word_padding_idx,
        position_padding_idx=view.position_padding_idx)
    # Positions and token types of the packed rows, gathered (or computed) on the device.
    if batch.position_ids is not None:
        positions = k.unpad(batch.position_ids.contiguous(), packing.indices)
    elif view.padding_idx is None:
        positions = packing.indices % batch.seqlen
    else:
        positions = k.unpad(positions_from_ids(input_ids, view.padding_idx), packing.indices)
    if batch.token_type_ids is None:
        types = torch.zeros_like(packing.indices)
    else:
        types = k.unpad(batch.token_type_ids.contiguous(), packing.indices)
    type_table = view.token_type_embeddings if view.token_type_embeddings is not None else _no_token_types(word)
    h = k.embed_layernorm(
        k.unpad(input_ids.contiguous(), packing.indices), positions, types,
        word, view.position_embeddings, type_table, view.ln_weight, view.ln_bias, view.ln_eps, **embedding_dropout,
    )
    if view.projection_weight is not None:
        h = k.linear(h, view.projection_weight, view.projection_bias)
    relative = None
    if view.relative_bias is not None:  # the table over key - query distance, and each row's original column
        table = view.relative_bias.traced() if tracing or grad else view.relative_bias.get()
        relative = table, (packing.indices % batch.seqlen).to(torch.int32)
    states = [h] if output_hidden_states else None
    for n, layer in enumerate(view.layers):
        # In training the fused Q/K/V weight is built in the graph, so Q, K and V get their gradients.
        args = (k, layer, h, packing, batch.bias, batch.causal, view.heads, view.gelu, tracing or grad, relative,
                None if dropout is None else dropout[1][n])
        if grad and _checkpointed(layer):  # the seeds are inputs: the recomputation draws the same masks
            h = _checkpoint_function(layer)(_layer, *args)
        else:
            h = _layer(*args)
        if states is not None:
            states.append(h)
    hidden_states = tuple(packing.pad(s, k) for s in states) if states is not None else None
    hidden = packing.pad(h, k)
    return hidden, hidden_states
