"""The encoder's weights, read out of a module tree once and kept until the tree changes.

Every family fastbert runs is a post-LayerNorm encoder; what differs is where its weights sit
in the module tree and a few rules. Each family has a *reader* here that maps its tree to one
canonical :class:`EncoderView` by attribute lookups only: embedding tables (a token-type table
or none, an optional E->H projection after the embedding LayerNorm), the position rule, the
layers in the order they run (q/k/v/o, LN1, FFN up/down, LN2, each LayerNorm with its own eps),
the GELU form, the head count, causality and an optional relative-position bias. Sizes come
from the weights' shapes. :mod:`fastbert.encoder` runs any view and never names a family;
:data:`FAMILIES` is the registry :func:`fastbert.optimize` searches.

A forward through Hugging Face modules pays about a microsecond per attribute lookup
(``layer.attention.output.LayerNorm.weight`` is five), and a layer needs some twenty: more host
time than the small kernels of a short batch take. :func:`encoder_view` reads every weight the
encoder needs into flat tuples once and returns the same view until a parameter, buffer or
submodule is registered anywhere in the process (``module.weight = nn.Parameter(...)``,
``resize_token_embeddings``, swapping a layer) or a parameter or buffer of the tree is replaced
without registration (``to_empty``, conversions with overwrite-on-conversion set), which
rebuilds it on next use.

Updates that keep the parameter objects need no rebuild: the view holds the parameters
themselves, so in-place changes (``load_state_dict``, an optimizer step) and ``.to()``/``.half()``
(which swap a parameter's data, not the parameter) are seen as they happen. The derived weights
(the fused Q/K/V projection of each layer, MPNet's relative-bias table) are rebuilt when a
source's version or storage changes.
"""

from __future__ import annotations

import operator
from typing import Callable, NamedTuple

import torch
from torch import nn

from fastbert.config import GELU_BY_HIDDEN_ACT, UnsupportedConfigError
from fastbert.stamps import Derived

_generation = 0


def _bump(*_args) -> None:
    global _generation
    _generation += 1


# Fired on every registration in any module; a view built before the last one is stale.
nn.modules.module.register_module_parameter_registration_hook(_bump)
nn.modules.module.register_module_buffer_registration_hook(_bump)
nn.modules.module.register_module_module_registration_hook(_bump)


def _fuse_qkv(wq, wk, wv, bq, bk, bv) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``[3H, H]`` weight and ``[3H]`` bias for the Q, K and V projections of a layer."""
    return torch.cat((wq, wk, wv)), torch.cat((bq, bk, bv))


def fused_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear) -> Derived:
    return Derived(_fuse_qkv, query.weight, key.weight, value.weight, query.bias, key.bias, value.bias)


class LayerView(NamedTuple):
    """One post-LayerNorm encoder layer: attention block, then feed-forward block."""

    qkv: Derived  # fused_qkv: (weight [3H, H], bias [3H])
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
    # The HF modules whose p (while they train) the fused path applies: on the attention
    # probabilities, on the attention output before LN1, on the FFN output before LN2 (None: none).
    attention_dropout: nn.Module | None = None
    attention_output_dropout: nn.Module | None = None
    output_dropout: nn.Module | None = None
    module: nn.Module | None = None  # the HF layer: its ``gradient_checkpointing`` flag is honoured

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every parameter the layer reads (the Q/K/V sources, not their fused copy)."""
        return (*self.qkv.sources, self.out_weight, self.out_bias, self.ln1_weight, self.ln1_bias, self.up_weight,
                self.up_bias, self.down_weight, self.down_bias, self.ln2_weight, self.ln2_bias)


class EncoderView(NamedTuple):
    word_embeddings: torch.Tensor  # [vocab, E]
    position_embeddings: torch.Tensor  # [positions, E]
    token_type_embeddings: torch.Tensor | None  # [types, E]; None: the family has no token types
    ln_weight: torch.Tensor  # embedding LayerNorm, width E
    ln_bias: torch.Tensor
    ln_eps: float
    projection_weight: torch.Tensor | None  # [H, E] after the embedding LayerNorm (E != H), else None
    projection_bias: torch.Tensor | None
    layers: tuple[LayerView, ...]  # in the order they run (a shared layer once per application)
    heads: int
    gelu: str  # the GELU form, as reference.gelu takes it
    causal: bool
    padding_idx: int | None  # None: positions are column numbers; else HF's count of non-pad ids from it
    relative_bias: Derived | None  # fp32 [heads, 2R + 1] over clamp(key - query, -R, R) + R
    embedding_dropout: nn.Module | None = None  # after the embedding LayerNorm (before the projection)
    word_padding_idx: int = -1  # the tables' nn.Embedding padding_idx (-1: none): that row gets no gradient
    position_padding_idx: int = -1

    def requires_grad(self) -> bool:
        """Whether any weight the encoder reads requires a gradient."""
        tables = (self.word_embeddings, self.position_embeddings, self.token_type_embeddings, self.ln_weight,
                  self.ln_bias, self.projection_weight, self.projection_bias,
                  *(self.relative_bias.sources if self.relative_bias is not None else ()))
        return any(t is not None and t.requires_grad for t in tables) or any(
            t.requires_grad for layer in self.layers for t in layer.tensors())

    @property
    def max_length(self) -> int:
        """The longest sequence the position table serves when positions are not given."""
        rows = self.position_embeddings.shape[0]
        return rows if self.padding_idx is None else rows - self.padding_idx - 1


def _linear(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return m.weight, m.bias


def _ln(m: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    return m.weight, m.bias, m.eps


def _layer(q, k, v, o: nn.Linear, ln1: nn.LayerNorm, up: nn.Linear, down: nn.Linear, ln2: nn.LayerNorm,
           dropouts: tuple = (None, None, None), module: nn.Module | None = None) -> LayerView:
    return LayerView(fused_qkv(q, k, v), *_linear(o), *_ln(ln1), *_linear(up), *_linear(down), *_ln(ln2), *dropouts,
                     module)


def _dropout(module: nn.Module, name: str = "dropout") -> nn.Module | None:
    """``module.<name>`` (an nn.Dropout), or None where the tree has none (fastbert.Bert)."""
    return getattr(module, name, None) if isinstance(module, nn.Module) else None


def _bert_layer(layer: nn.Module) -> LayerView:
    attn, out = layer.attention.self, layer.attention.output
    return _layer(attn.query, attn.key, attn.value, out.dense, out.LayerNorm, layer.intermediate.dense,
                  layer.output.dense, layer.output.LayerNorm,
                  (_dropout(attn), _dropout(out), _dropout(layer.output)), layer)


def _gelu(name, key: str = "hidden_act") -> str:
    """The GELU form of the activation named ``name`` by config key ``key``; anything else is refused."""
    if not isinstance(name, str) or name not in GELU_BY_HIDDEN_ACT:
        raise UnsupportedConfigError(f"{key}={name!r} is not supported; fastbert fuses {sorted(GELU_BY_HIDDEN_ACT)}")
    return GELU_BY_HIDDEN_ACT[name]


def _embeddings(emb: nn.Module, token_types: bool = True) -> tuple:
    types = emb.token_type_embeddings.weight if token_types else None
    return (emb.word_embeddings.weight, emb.position_embeddings.weight, types, *_ln(emb.LayerNorm))


def _with_embedding_training(view: "EncoderView", emb: nn.Module) -> "EncoderView":
    """The view with the embeddings' dropout and the tables' padding rows."""
    def padding(table: nn.Embedding) -> int:
        return -1 if table.padding_idx is None else table.padding_idx

    return view._replace(embedding_dropout=_dropout(emb), word_padding_idx=padding(emb.word_embeddings),
                         position_padding_idx=padding(emb.position_embeddings))


def read_bert(model: nn.Module) -> EncoderView:
    """BERT (HF ``BertModel`` and :class:`fastbert.Bert`): positions are column numbers."""
    c = model.config
    view = EncoderView(*_embeddings(model.embeddings), None, None, tuple(map(_bert_layer, model.encoder.layer)),
                       c.num_attention_heads, _gelu(c.hidden_act), bool(c.is_decoder), None, None)
    return _with_embedding_training(view, model.embeddings)


def read_roberta(model: nn.Module) -> EncoderView:
    """RoBERTa, XLM-R, CamemBERT, Data2VecText: BERT's tree, positions counted from the pad id."""
    return read_bert(model)._replace(padding_idx=model.embeddings.padding_idx)


def read_electra(model: nn.Module) -> EncoderView:
    """ELECTRA: width-E embeddings, projected to H after their LayerNorm when E != H."""
    project = getattr(model, "embeddings_project", None)
    view = read_bert(model)
    return view if project is None else view._replace(projection_weight=project.weight,
                                                      projection_bias=project.bias)


def _albert_layer(layer: nn.Module) -> LayerView:
    a = layer.attention  # ALBERT's FFN output goes into LN2 without dropout (HF defines one, unused)
    return _layer(a.query, a.key, a.value, a.dense, a.LayerNorm, layer.ffn, layer.ffn_output,
                  layer.full_layer_layer_norm, (a.attention_dropout, a.output_dropout, None), layer)


def read_albert(model: nn.Module) -> EncoderView:
    """ALBERT: width-E embeddings, always projected; layer i runs group int(i / (L / G)), all of its layers."""
    c, enc = model.config, model.encoder
    groups = [tuple(map(_albert_layer, group.albert_layers)) for group in enc.albert_layer_groups]
    L, G = c.num_hidden_layers, len(groups)
    layers = tuple(v for i in range(L) for v in groups[int(i / (L / G))])
    view = EncoderView(*_embeddings(model.embeddings), *_linear(enc.embedding_hidden_mapping_in), layers,
                       c.num_attention_heads, _gelu(c.hidden_act), False, None, None)
    return _with_embedding_training(view, model.embeddings)


def read_distilbert(model: nn.Module) -> EncoderView:
    """DistilBERT: no token types, column positions, its own layer names."""
    c = model.config
    # DistilBERT's attention output goes into LN1 without dropout.
    layers = tuple(_layer(b.attention.q_lin, b.attention.k_lin, b.attention.v_lin, b.attention.out_lin,
                          b.sa_layer_norm, b.ffn.lin1, b.ffn.lin2, b.output_layer_norm,
                          (b.attention.dropout, None, b.ffn.dropout), b)
                   for b in model.transformer.layer)
    view = EncoderView(*_embeddings(model.embeddings, token_types=False), None, None, layers,
                       c.num_attention_heads, _gelu(c.activation, "activation"), False, None, None)
    return _with_embedding_training(view, model.embeddings)


# The relative distances MPNet's table covers: its buckets saturate well inside +-128 (from +-91).
MPNET_RADIUS = 128


def _mpnet_table(encoder: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """MPNet's bucket table as ``[heads, 2R + 1]`` fp32 over key - query distances -R..R.

    The buckets come from HF's own ``relative_position_bucket`` (as ``compute_position_bias``
    calls it), so every boundary is HF's.
    """
    distances = torch.arange(-MPNET_RADIUS, MPNET_RADIUS + 1, device=weight.device)
    return weight[encoder.relative_position_bucket(distances)].t().float().contiguous()


def _mpnet_layer(layer: nn.Module) -> LayerView:
    a = layer.attention
    return _layer(a.attn.q, a.attn.k, a.attn.v, a.attn.o, a.LayerNorm, layer.intermediate.dense, layer.output.dense,
                  layer.output.LayerNorm, (a.attn.dropout, a.dropout, layer.output.dropout), layer)


def read_mpnet(model: nn.Module) -> EncoderView:
    """MPNet: positions counted from the pad id, no token types, one relative-bias table for all layers."""
    c, enc = model.config, model.encoder
    layers = tuple(map(_mpnet_layer, enc.layer))
    table = Derived(lambda weight: _mpnet_table(enc, weight), enc.relative_attention_bias.weight)
    view = EncoderView(*_embeddings(model.embeddings, token_types=False), None, None, layers,
                       c.num_attention_heads, _gelu(c.hidden_act), False, model.embeddings.padding_idx, table)
    return _with_embedding_training(view, model.embeddings)


class Family(NamedTuple):
    """One model family: how to find its backbone and read it, and what its HF forward returns."""

    name: str
    backbones: tuple[str, ...]  # the transformers classes of its backbone
    read: Callable[[nn.Module], EncoderView]
    pooling: str  # "module": ``model.pooler(hidden)``; "linear": ``pooler_activation(pooler(hidden[:, 0]))``; "none"
    output: str  # the transformers.modeling_outputs class of the backbone's forward


FAMILIES = (
    Family("BERT", ("BertModel",), read_bert, "module", "BaseModelOutputWithPoolingAndCrossAttentions"),
    Family("RoBERTa", ("RobertaModel", "XLMRobertaModel", "CamembertModel", "Data2VecTextModel"), read_roberta,
           "module", "BaseModelOutputWithPoolingAndCrossAttentions"),
    Family("ELECTRA", ("ElectraModel",), read_electra, "none", "BaseModelOutputWithPastAndCrossAttentions"),
    Family("ALBERT", ("AlbertModel",), read_albert, "linear", "BaseModelOutputWithPooling"),
    Family("DistilBERT", ("DistilBertModel",), read_distilbert, "none", "BaseModelOutput"),
    Family("MPNet", ("MPNetModel",), read_mpnet, "module", "BaseModelOutputWithPooling"),
)
_BY_CLASS_NAME = {name: family for family in FAMILIES for name in family.backbones}
_BY_NAME = {family.name: family for family in FAMILIES}
_family_of_type: dict[type, Family | None] = {}


def family_of(module: nn.Module) -> Family | None:
    """The family whose backbone ``module`` is (a transformers class or a subclass of one), or None."""
    cls = type(module)
    if cls not in _family_of_type:
        found = _BY_NAME.get(getattr(cls, "fastbert_family", None))  # fastbert.Bert: "BERT"
        for base in cls.__mro__:
            if found is None and base.__module__.startswith("transformers."):
                found = _BY_CLASS_NAME.get(base.__name__)
        _family_of_type[cls] = found
    return _family_of_type[cls]


def _slots(model: nn.Module) -> tuple[tuple[dict, str], ...]:
    """Where every parameter and buffer of the tree is held: (the module's dict, the name)."""
    return tuple((slots, name) for m in model.modules() for slots in (m._parameters, m._buffers) for name in slots)


class _CachedView(NamedTuple):
    generation: int  # _generation when read
    view: EncoderView
    slots: tuple[tuple[dict, str], ...]  # _slots(model) when read
    held: tuple  # what each slot held then

    def current(self) -> bool:
        """No registration since, and every slot still holds the object it held.

        ``nn.Module._apply`` replaces parameters without a registration hook when the new
        tensor cannot be copied into the old one (``to_empty`` from the meta device, or
        ``torch.__future__.set_overwrite_module_params_on_conversion(True)``); the identity
        check sees those swaps (about 10 microseconds per forward for BERT-base).
        """
        return self.generation == _generation and all(
            map(operator.is_, (slots.get(name) for slots, name in self.slots), self.held))


def encoder_view(model: nn.Module) -> EncoderView:
    """The canonical view of a backbone of any family in :data:`FAMILIES`, cached on ``model``."""
    cached = model.__dict__.get("_fastbert_view")
    if cached is not None and cached.current():
        return cached.view
    family = family_of(model)
    if family is None:
        raise TypeError(f"fastbert has no view of {type(model).__name__}; supported backbones: "
                        f"{', '.join(n for f in FAMILIES for n in f.backbones)}")
    generation, slots = _generation, _slots(model)
    view = family.read(model)
    model.__dict__["_fastbert_view"] = _CachedView(generation, view, slots,
                                                   tuple(held.get(name) for held, name in slots))
    return view


def clear(model: nn.Module) -> None:
    """Drop the view (and its fused weights) kept on ``model``."""
    model.__dict__.pop("_fastbert_view", None)
