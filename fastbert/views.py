"""The encoder's weights, read out of a module tree once and kept until the tree changes.

A forward through Hugging Face modules pays about a microsecond per attribute lookup
(``layer.attention.output.LayerNorm.weight`` is five), and a layer needs some twenty: more host
time than the small kernels of a short batch take. :func:`encoder_view` reads every weight the
encoder needs into flat tuples once and returns the same view until a parameter, buffer or
submodule is registered anywhere in the process (``module.weight = nn.Parameter(...)``,
``resize_token_embeddings``, swapping a layer), which rebuilds it on next use.

Updates that keep the parameter objects need no rebuild: the view holds the parameters
themselves, so in-place changes (``load_state_dict``, an optimizer step) and ``.to()``/``.half()``
(which swap a parameter's data, not the parameter) are seen as they happen. The one derived
weight, the fused Q/K/V projection, is rebuilt when a source's version or storage changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

_generation = 0


def _bump(*_args) -> None:
    global _generation
    _generation += 1


# Fired on every registration in any module; a view built before the last one is stale.
nn.modules.module.register_module_parameter_registration_hook(_bump)
nn.modules.module.register_module_buffer_registration_hook(_bump)
nn.modules.module.register_module_module_registration_hook(_bump)


def stamp(t: torch.Tensor) -> tuple[int, int]:
    """What changes when ``t``'s contents may have: its version and its storage.

    Inference tensors (made under ``torch.inference_mode``) keep no version counter; an
    in-place update of one inside inference mode is not seen.
    """
    return (-1 if t.is_inference() else t._version), t.data_ptr()


class FusedQKV:
    """One ``[3H, H]`` weight and ``[3H]`` bias for the Q, K and V projections of a layer."""

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear):
        self.sources = (query.weight, key.weight, value.weight, query.bias, key.bias, value.bias)
        self._stamp = None
        self.weight = self.bias = None

    def traced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused weight and bias as part of the graph (``torch.compile`` folds or reuses them)."""
        return torch.cat(self.sources[:3]), torch.cat(self.sources[3:])

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused weight and bias, rebuilt if a source changed since the last call."""
        wq, wk, wv, bq, bk, bv = self.sources
        # Spelled out: this runs once per layer and forward, and a generator costs more than the check.
        current = (stamp(wq), stamp(wk), stamp(wv), stamp(bq), stamp(bk), stamp(bv))
        if current != self._stamp:
            # A normal tensor even when built under inference_mode, so it serves every mode after.
            with torch.inference_mode(False), torch.no_grad():
                self.weight, self.bias = self.traced()
            self._stamp = current
        return self.weight, self.bias


class LayerView(NamedTuple):
    """One post-LayerNorm encoder layer: attention block, then feed-forward block."""

    qkv: FusedQKV
    out_weight: torch.Tensor  # attention output projection [H, H], its bias fused into LN1
    out_bias: torch.Tensor
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    ln1_eps: float
    up_weight: torch.Tensor  # FFN up-projection [I, H], bias and GELU fused
    up_bias: torch.Tensor
    down_weight: torch.Tensor  # FFN down-projection [H, I], its bias fused into LN2
    down_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    ln2_eps: float


class EncoderView(NamedTuple):
    word_embeddings: torch.Tensor
    position_embeddings: torch.Tensor
    token_type_embeddings: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    ln_eps: float
    layers: tuple[LayerView, ...]


def _layer_view(layer: nn.Module) -> LayerView:
    attn, out, up, down = layer.attention.self, layer.attention.output, layer.intermediate.dense, layer.output
    return LayerView(
        FusedQKV(attn.query, attn.key, attn.value),
        out.dense.weight, out.dense.bias, out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps,
        up.weight, up.bias,
        down.dense.weight, down.dense.bias, down.LayerNorm.weight, down.LayerNorm.bias, down.LayerNorm.eps,
    )


def encoder_view(bert: nn.Module) -> EncoderView:
    """The weights of a module tree shaped like HF's ``BertModel``, cached on ``bert``."""
    cached = bert.__dict__.get("_fastbert_view")
    if cached is not None and cached[0] == _generation:
        return cached[1]
    emb = bert.embeddings
    view = EncoderView(
        emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight,
        emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps,
        tuple(_layer_view(layer) for layer in bert.encoder.layer),
    )
    bert.__dict__["_fastbert_view"] = (_generation, view)
    return view


def clear(bert: nn.Module) -> None:
    """Drop the view (and its fused weights) kept on ``bert``."""
    bert.__dict__.pop("_fastbert_view", None)
