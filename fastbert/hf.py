"""``fastbert.optimize``: run Hugging Face encoders of the BERT family on fastbert's padding-free encoder.

``optimize(model)`` finds every backbone of a family in :data:`fastbert.views.FAMILIES` inside
``model`` (BERT, RoBERTa, XLM-R, CamemBERT, Data2VecText, ELECTRA, ALBERT, DistilBERT, MPNet; the
model itself, the backbone of any of their heads, the backbone of a sentence-transformers
``SentenceTransformer`` or ``CrossEncoder``) and gives that instance a new ``forward``. It binds
its arguments by the family's own forward signature (positional calls too) and returns the
family's own output class; ``inspect.signature(backbone.forward)`` is the family's own. The
heads, the pooler and all weights stay the HF modules' own; nothing is copied except a fused
Q/K/V weight per layer and MPNet's relative-bias table, rebuilt whenever the weights change.
``unoptimize(model)`` undoes it.

The output flags ``output_attentions``, ``output_hidden_states`` and ``return_dict`` take the
config's value when not given, as HF reads them. Calls the fused path cannot honour run the
original HF forward instead, with one warning per reason: ``output_attentions=True`` (given or
from the config), ``output_hidden_states`` selecting layers by index, a ``head_mask``, a KV cache
passed in (generation), cross-attention inputs, ``inputs_embeds``, ``is_causal``, unknown keyword
arguments, autocast to a dtype other than the weights' (fastbert computes in the weights'
dtype). Loss-only keywords that transformers 5 heads pass down to the backbone
(``num_items_in_batch`` from ``Trainer``, ``shift_labels``) are accepted and ignored, as the HF
backbone ignores them. A decoder called with ``use_cache`` on (given or from the config) runs
fused with one warning: no KV cache is built, the output's cache is None. Training runs fused too: with gradients on, the training ops (autograd,
dropout at the HF modules' rates, gradient checkpointing per layer; see :mod:`fastbert.encoder`);
CUDA graphs serve only calls without gradients in eval mode. ``token_type_ids`` given to a family without token types (DistilBERT, MPNet) is
ignored, as their HF forwards do. Configs it cannot reproduce (relative position embeddings,
cross-attention layers, activations other than GELU) are refused by ``optimize``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings

import torch
from torch import nn

from fastbert import backends, encoder, graphs, views
from fastbert.config import check_features

# Keyword arguments the fused path accepts when they have one of these "off" values (ANY: every
# value). use_cache: no cache is built, the output's cache is None (a decoder asked for one warns
# once). num_items_in_batch and shift_labels only shape a head's loss: transformers 5 heads pass
# their **kwargs (Trainer's num_items_in_batch among them) down to the backbone, which ignores them.
ANY = object()
_NEUTRAL_KWARGS = {
    "output_attentions": (None, False),
    "output_router_logits": (None, False),
    "head_mask": (None,),
    "cache": (None,),
    "past_key_values": (None,),
    "use_cache": ANY,
    "encoder_hidden_states": (None,),
    "encoder_attention_mask": (None,),
    "inputs_embeds": (None,),
    "is_causal": (None,),
    "num_items_in_batch": ANY,
    "shift_labels": ANY,
}
_warned: set[str] = set()
SUPPORTED = "; ".join(f"{f.name} ({', '.join(f.backbones)})" for f in views.FAMILIES)


@dataclasses.dataclass
class _State:
    family: views.Family
    backend: str | None
    graphs: graphs.GraphedEncoder | None  # None: eager
    parameters: tuple[str, ...]  # the HF forward's parameters that positional arguments bind to
    output: type  # the HF forward's output class


def _backbones(model: nn.Module) -> list[nn.Module]:
    from fastbert.model import Bert  # standalone: already fastbert's own forward

    found = [m for m in model.modules() if views.family_of(m) is not None and not isinstance(m, Bert)]
    if not found:
        raise TypeError(
            f"fastbert.optimize supports transformers encoders of these families, any of their heads and "
            f"sentence-transformers models built on one: {SUPPORTED}; found no such backbone inside "
            f"{type(model).__name__}"
        )
    return found


def _positional_parameters(cls: type) -> tuple[str, ...]:
    """The names positional arguments bind to in ``cls.forward`` (decorators unwrapped), without ``self``."""
    names = []
    for p in list(inspect.signature(cls.forward).parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def _check_supported(backbone: nn.Module) -> None:
    """Raise UnsupportedConfigError for what the fused path cannot reproduce (reading the view checks the rest)."""
    config = backbone.config
    check_features(getattr(config, "position_embedding_type", "absolute") or "absolute",
                   bool(getattr(config, "add_cross_attention", False)))
    views.clear(backbone)
    views.encoder_view(backbone)


def optimize(model: nn.Module, backend: str | None = None, cuda_graphs: bool = False,
             max_graphs: int = 16) -> nn.Module:
    """Make every encoder backbone inside ``model`` run padding-free on fastbert's ops, in place.

    ``backend`` ("triton", "cuda", "cpp" or "torch") forces one backend; None picks per device
    (see :mod:`fastbert.backends`). ``cuda_graphs=True`` replays one CUDA graph per shape
    bucket, keeping at most ``max_graphs`` (see :mod:`fastbert.graphs`); only attention on the
    triton backend can be captured, elsewhere calls run eagerly with one warning. Returns ``model``.
    Raises TypeError when ``model`` holds no supported backbone (the message lists the
    families) and UnsupportedConfigError for configs the fused path cannot reproduce. Outputs
    at pad positions of ``last_hidden_state`` are zero.
    """
    if backend is not None:
        backends.requested_backend(backend)  # validates the name
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    found = _backbones(model)
    for backbone in found:
        _check_supported(backbone)
    from transformers import modeling_outputs

    for backbone in found:
        family = views.family_of(backbone)
        backbone._fastbert = _State(family, backend, graphs.GraphedEncoder(max_graphs) if cuda_graphs else None,
                                    _positional_parameters(type(backbone)), getattr(modeling_outputs, family.output))
        backbone.forward = types.MethodType(_forward_with_signature(type(backbone)), backbone)
    return model


def _forward_with_signature(cls: type):
    """``_fast_forward`` under ``cls.forward``'s name, docs and signature: ``inspect.signature``
    (HF's tests, Trainer's column filter, kwargs filters) sees ``input_ids``, ``attention_mask``..."""
    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return _fast_forward(self, *args, **kwargs)

    return forward


def unoptimize(model: nn.Module) -> nn.Module:
    """Restore the original HF forward of every backbone inside ``model``; returns ``model``."""
    for backbone in _backbones(model):
        if "_fastbert" in backbone.__dict__:
            del backbone.forward, backbone._fastbert
            views.clear(backbone)
    return model


def is_optimized(model: nn.Module) -> bool:
    return any("_fastbert" in b.__dict__ for b in _backbones(model))


def _fallback_reason(backbone: nn.Module, kwargs: dict, output_hidden_states) -> str | None:
    for name, value in kwargs.items():
        if name not in _NEUTRAL_KWARGS:
            return f"keyword argument {name!r}"
        neutral = _NEUTRAL_KWARGS[name]
        if neutral is not ANY and not any(value is v for v in neutral):
            return f"{name}={'<tensor>' if isinstance(value, torch.Tensor) else repr(value)}"
    if output_hidden_states is not None and not isinstance(output_hidden_states, bool):
        return "output_hidden_states selecting layers by index"
    weights = views.encoder_view(backbone).word_embeddings
    device_type = weights.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != weights.dtype:
        return (f"autocast to {torch.get_autocast_dtype(device_type)} over {weights.dtype} weights (fastbert runs "
                f"in the weights' dtype; convert the model instead, e.g. model.half())")
    return None


def _pool(self: nn.Module, family: views.Family, hidden: torch.Tensor) -> torch.Tensor | None:
    if family.pooling == "none" or self.pooler is None:
        return None
    if family.pooling == "linear":  # ALBERT: a bare Linear over the first token, then its activation
        return self.pooler_activation(self.pooler(hidden[:, 0]))
    return self.pooler(hidden)


def _fast_forward(self: nn.Module, *args, **kwargs):
    state: _State = self._fastbert
    if args:
        if len(args) > len(state.parameters):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(state.parameters)} positional "
                            f"arguments, got {len(args)}")
        call = dict(zip(state.parameters, args))
        for name, value in kwargs.items():
            if name in call:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
            call[name] = value
    else:
        call = dict(kwargs)
    input_ids = call.pop("input_ids", None)
    attention_mask = call.pop("attention_mask", None)
    token_type_ids = call.pop("token_type_ids", None)
    position_ids = call.pop("position_ids", None)
    # Output flags not given (or None) take the config's value, as the HF forwards read them.
    config = self.config
    output_hidden_states = _given_or_config(config, "output_hidden_states", call.pop("output_hidden_states", None))
    return_dict = _given_or_config(config, "return_dict", call.pop("return_dict", None))
    call["output_attentions"] = _given_or_config(config, "output_attentions", call.get("output_attentions"))
    reason = _fallback_reason(self, call, output_hidden_states)
    if reason is not None:
        _warn_once(f"fastbert: {reason} is not supported by the fused path; running the original forward")
        return type(self).forward(self, *args, **kwargs)
    if views.encoder_view(self).causal and _given_or_config(config, "use_cache", call.get("use_cache")):
        _warn_once("fastbert: use_cache=True on a decoder: the fused path builds no KV cache (the output's cache "
                   "is None); pass use_cache=False to run without one")

    if input_ids is None:
        raise ValueError("input_ids is required (inputs_embeds runs the original forward)")
    # CUDA graphs replay inference only: a call that trains (or could) runs eagerly.
    graphed = state.graphs is not None and not self.training and not torch.is_grad_enabled()
    run = state.graphs if graphed else encoder.encode
    hidden, states = run(self, input_ids, attention_mask, token_type_ids, position_ids, backend=state.backend,
                         output_hidden_states=bool(output_hidden_states))
    fields = dict(last_hidden_state=hidden, hidden_states=states)
    if state.family.pooling != "none":
        fields["pooler_output"] = _pool(self, state.family, hidden)
    output = state.output(**fields)
    return output if return_dict is not False else output.to_tuple()


def _given_or_config(config, name: str, given):
    """``given``, or the config's ``name`` when ``given`` is None (None when the config has none)."""
    return getattr(config, name, None) if given is None else given


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
