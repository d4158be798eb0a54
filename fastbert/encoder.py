"""The padding-free BERT encoder, written against the op seam.

``encode`` runs any module tree shaped like Hugging Face's ``BertModel`` (``embeddings``,
``encoder.layer[i]`` with HF's attribute names) — the HF model itself after
:func:`fastbert.optimize`, or :class:`fastbert.model.Bert` without transformers installed::

    input_ids, attention_mask [B, S]
      -> valid-token indices, cu_seqlens [B + 1], max_seqlen
      -> embeddings + LayerNorm on the T valid tokens only          [T, H]
      -> per layer: QKV GEMM -> varlen attention -> out GEMM -> add+LN
                    -> linear+bias+GELU -> down GEMM -> add+LN
      -> pad back to [B, S, H]; pad positions are exactly zero

A 2D 0/1 key-padding mask takes this packed path. A 3D ``[B, S, S]`` or 4D ``[B|1, 1|N, S, S]``
mask (bool: True = attend; float: additive) takes the padded path: every position is computed
and the mask is an additive attention bias, as Hugging Face applies such masks (a 4D mask is
used as given, so a decoder's causal part must already be in it).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fastbert import backends, ops
from fastbert.config import BertConfig


@dataclasses.dataclass
class Packing:
    """Where the valid tokens of a padded ``[batch, seqlen]`` batch sit once packed."""

    indices: torch.Tensor  # [T] int64, flat positions of valid tokens in batch * seqlen
    cu_seqlens: torch.Tensor  # [batch + 1] int32, token offsets of each sequence
    max_seqlen: int
    batch: int
    seqlen: int

    @classmethod
    def from_mask(cls, valid: torch.Tensor) -> "Packing":
        batch, seqlen = valid.shape
        indices, cu_seqlens = ops.packing(valid)
        # max_seqlen only bounds the kernels' grids: the padded length is a valid bound, and
        # under torch.compile it avoids a data-dependent scalar (a graph break).
        if torch.compiler.is_compiling() or batch == 0:
            max_seqlen = seqlen
        else:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(indices, cu_seqlens, max_seqlen, batch, seqlen)

    @classmethod
    def full(cls, batch: int, seqlen: int, device: torch.device) -> "Packing":
        indices = torch.arange(batch * seqlen, device=device)
        cu_seqlens = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32, device=device)
        return cls(indices, cu_seqlens, seqlen, batch, seqlen)


def _check_range(name: str, ids: torch.Tensor, upper: int, what: str) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {ids.dtype}")
    if ids.numel() and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= upper:
            raise ValueError(f"{name} holds values in [{low}, {high}] but {what} is {upper}: valid ids are 0..{upper - 1}")


def _check_device(name: str, tensor: torch.Tensor | None, device: torch.device) -> None:
    if tensor is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move it to {device}")


def _key_padding(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device) -> torch.Tensor:
    """The 2D mask as bool ``[B, S]`` (True = real token), checked to hold only 0 and 1."""
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
    if not torch.compiler.is_compiling() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(
            "a 2D attention_mask must hold only 0 (padding) and 1 (token); for an additive mask pass a 4D "
            "[batch, 1, seq, seq] tensor"
        )
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


def _fused_qkv(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """One [3H, H] weight for the Q, K and V projections, rebuilt whenever a source changes."""
    parts = [attn.query.weight, attn.key.weight, attn.value.weight, attn.query.bias, attn.key.bias, attn.value.bias]
    if torch.compiler.is_compiling():
        return torch.cat(parts[:3]), torch.cat(parts[3:])
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parts)
    cached = getattr(attn, "_fastbert_qkv", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat(parts[:3]), torch.cat(parts[3:]))
        attn._fastbert_qkv = cached
    return cached[1], cached[2]


def clear_caches(bert: torch.nn.Module) -> None:
    """Drop the fused weights ``encode`` keeps on ``bert``'s modules."""
    for layer in bert.encoder.layer:
        layer.attention.self.__dict__.pop("_fastbert_qkv", None)


def _layer(layer, h, packing, bias, causal, heads, gelu, plan):
    T, H = h.shape
    attn = layer.attention.self
    w_qkv, b_qkv = _fused_qkv(attn)
    q, k, v = F.linear(h, w_qkv, b_qkv).view(T, 3, heads, H // heads).unbind(1)
    scale = (H // heads) ** -0.5
    ctx = ops.attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, scale, causal, bias, plan["attention"])
    out = layer.attention.output
    a = F.linear(ctx.view(T, H), out.dense.weight)
    h = ops.add_layernorm(a, h, out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps, plan["add_layernorm"])
    up = layer.intermediate.dense
    i = ops.linear_gelu(h, up.weight, up.bias, gelu, plan["linear_gelu"])
    down = layer.output
    o = F.linear(i, down.dense.weight)
    return ops.add_layernorm(o, h, down.dense.bias, down.LayerNorm.weight, down.LayerNorm.bias, down.LayerNorm.eps, plan["add_layernorm"])


def encode(
    bert: torch.nn.Module,
    config: BertConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    backend: str | None = None,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run embeddings and every layer; returns ``(last_hidden_state [B, S, H], hidden_states)``.

    ``hidden_states`` (embeddings output, then each layer's) is returned padded like the last
    one when ``output_hidden_states`` is set, else None. Raises ValueError/TypeError naming the
    argument for malformed input.
    """
    emb = bert.embeddings
    device = emb.word_embeddings.weight.device
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape}")
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask),
                    ("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        _check_device(name, t, device)
    batch, seqlen = input_ids.shape
    _check_range("input_ids", input_ids, config.vocab_size, "vocab_size")
    if position_ids is None:
        if seqlen > config.max_position_embeddings:
            raise ValueError(
                f"input_ids has sequence length {seqlen} but max_position_embeddings is "
                f"{config.max_position_embeddings}; truncate the input to at most {config.max_position_embeddings} tokens"
            )
        position_ids = torch.arange(seqlen, device=device)
    else:
        _check_range("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings")
    position_ids = position_ids.expand(batch, seqlen)
    if token_type_ids is None:
        token_type_ids = torch.zeros((), dtype=torch.long, device=device)
    else:
        _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
    token_type_ids = token_type_ids.expand(batch, seqlen)

    plan = backends.plan(device, backend)
    dtype = emb.word_embeddings.weight.dtype
    heads = config.num_attention_heads
    if attention_mask is not None and attention_mask.dim() in (3, 4):
        packing = Packing.full(batch, seqlen, device)
        bias = _attention_bias(attention_mask, batch, heads, seqlen, dtype)
        causal = False
    elif attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2D [batch, seq], 3D [batch, seq, seq] or 4D [batch, 1, seq, seq]; "
            f"got shape {tuple(attention_mask.shape)}"
        )
    else:
        packing = Packing.from_mask(_key_padding(attention_mask, batch, seqlen, device))
        bias = None
        causal = config.is_decoder

    def gather(ids):
        return ops.unpad(ids.contiguous(), packing.indices, plan["unpad"])

    h = ops.embed_layernorm(
        gather(input_ids), gather(position_ids), gather(token_type_ids),
        emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight,
        emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps, plan["embed_layernorm"],
    )
    states = [h] if output_hidden_states else None
    for layer in bert.encoder.layer:
        h = _layer(layer, h, packing, bias, causal, heads, config.gelu_approximate, plan)
        if states is not None:
            states.append(h)

    def scatter(x):
        return ops.pad(x, packing.indices, batch, seqlen, plan["pad"])

    hidden_states = tuple(scatter(s) for s in states) if states is not None else None
    return scatter(h), hidden_states
