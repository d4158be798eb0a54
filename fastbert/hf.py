"""``fastbert.optimize``: run Hugging Face BERT models on fastbert's padding-free encoder.

``optimize(model)`` finds every ``transformers.BertModel`` inside ``model`` (the model itself,
the ``.bert`` of any ``BertFor*`` head or ``BertLMHeadModel``, the backbone of a
sentence-transformers ``SentenceTransformer``) and gives that instance a new ``forward``. The
heads, the pooler and all weights stay the HF modules' own; nothing is copied except a fused
Q/K/V weight per layer, rebuilt whenever the weights change. ``unoptimize(model)`` undoes it.

Calls the fused path cannot honour run the original HF forward instead, with one warning per
reason: ``output_attentions=True``, a ``head_mask``, a KV cache passed in (generation),
cross-attention inputs, ``inputs_embeds``, unknown keyword arguments, autocast to a dtype other
than the weights' (fastbert computes in the weights' dtype), and training mode (fastbert is
inference-only for now: in eval mode the forward runs fused, and a backward through it raises
an error rather than giving the encoder no gradients). Configs it cannot
reproduce (relative position embeddings, cross-attention layers, activations other than GELU)
are refused by ``optimize``.
"""

from __future__ import annotations

import dataclasses
import types
import warnings

import torch
from torch import nn

from fastbert import backends, encoder, graphs, views
from fastbert.config import BertConfig

# Keyword arguments the fused path accepts when they have one of these "off" values
# (ANY: every value; use_cache is accepted because no cache is built, the output's cache is None).
ANY = object()
_NEUTRAL_KWARGS = {
    "output_attentions": (None, False),
    "head_mask": (None,),
    "cache": (None,),
    "past_key_values": (None,),
    "use_cache": ANY,
    "encoder_hidden_states": (None,),
    "encoder_attention_mask": (None,),
    "inputs_embeds": (None,),
}
_warned: set[str] = set()


@dataclasses.dataclass
class _State:
    config: BertConfig
    backend: str | None
    graphs: graphs.GraphedEncoder | None  # None: eager


def _bert_models(model: nn.Module) -> list[nn.Module]:
    try:
        from transformers import BertModel
    except ImportError as exc:  # pragma: no cover - transformers is the reason to call this
        raise ImportError("fastbert.optimize needs transformers; pip install 'fastbert[hf]'") from exc
    found = [m for m in model.modules() if isinstance(m, BertModel)]
    if not found:
        raise TypeError(
            f"fastbert.optimize supports transformers BERT models (BertModel, BertFor*, BertLMHeadModel) and "
            f"sentence-transformers models built on one; found no BertModel inside {type(model).__name__}"
        )
    return found


def optimize(model: nn.Module, backend: str | None = None, cuda_graphs: bool = False,
             max_graphs: int = 16) -> nn.Module:
    """Make every BERT encoder inside ``model`` run padding-free on fastbert's ops, in place.

    ``backend`` ("triton", "cuda", "cpp" or "torch") forces one backend; None picks per device
    (see :mod:`fastbert.backends`). ``cuda_graphs=True`` replays one CUDA graph per shape
    bucket, keeping at most ``max_graphs`` (see :mod:`fastbert.graphs`). Returns ``model``.
    Raises UnsupportedConfigError for configs the fused path cannot reproduce. Outputs at pad
    positions of ``last_hidden_state`` are zero.
    """
    if backend is not None:
        backends.requested_backend(backend)  # validates the name
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    berts = _bert_models(model)
    configs = [BertConfig.from_hf(b.config) for b in berts]
    for config in configs:
        config.check_supported()
    for bert, config in zip(berts, configs):
        bert._fastbert = _State(config, backend, graphs.GraphedEncoder(max_graphs) if cuda_graphs else None)
        bert.forward = types.MethodType(_fast_forward, bert)
    return model


def unoptimize(model: nn.Module) -> nn.Module:
    """Restore the original HF forward of every BERT encoder inside ``model``; returns ``model``."""
    for bert in _bert_models(model):
        if "_fastbert" in bert.__dict__:
            del bert.forward, bert._fastbert
            views.clear(bert)
    return model


def is_optimized(model: nn.Module) -> bool:
    return any("_fastbert" in b.__dict__ for b in _bert_models(model))


def _fallback_reason(bert: nn.Module, kwargs: dict) -> str | None:
    for name, value in kwargs.items():
        if name not in _NEUTRAL_KWARGS:
            return f"keyword argument {name!r}"
        neutral = _NEUTRAL_KWARGS[name]
        if neutral is not ANY and not any(value is v for v in neutral):
            return f"{name}={'<tensor>' if isinstance(value, torch.Tensor) else repr(value)}"
    if bert.training:
        return "training mode (fastbert runs inference only; call model.eval())"
    weights = views.encoder_view(bert).word_embeddings
    device_type = weights.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != weights.dtype:
        return (f"autocast to {torch.get_autocast_dtype(device_type)} over {weights.dtype} weights (fastbert runs "
                f"in the weights' dtype; convert the model instead, e.g. model.half())")
    return None


def _fast_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    **kwargs,
):
    reason = _fallback_reason(self, kwargs)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"fastbert: {reason} is not supported by the fused path; running the original forward",
                          stacklevel=2)
        original = type(self).forward.__get__(self)
        return original(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, output_hidden_states=output_hidden_states,
                        return_dict=return_dict, **kwargs)

    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    state: _State = self._fastbert
    if output_hidden_states is None:
        output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
    if input_ids is None:
        raise ValueError("input_ids is required (inputs_embeds runs the original forward)")
    run = encoder.encode if state.graphs is None else state.graphs
    hidden, states = run(
        self, state.config, input_ids, attention_mask, token_type_ids, position_ids,
        backend=state.backend, output_hidden_states=output_hidden_states,
    )
    pooled = self.pooler(hidden) if self.pooler is not None else None
    output = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=hidden, pooler_output=pooled, hidden_states=states
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return output if return_dict else output.to_tuple()
