"""A standalone BERT encoder: Hugging Face's parameter layout, no transformers needed.

:class:`Bert` holds the weights under HF's names (so HF state dicts load as they are) and has
two forwards:

- :meth:`Bert.forward` — the fast, padding-free path through the op seam (:mod:`fastbert.encoder`);
- :meth:`Bert.reference_forward` — plain padded PyTorch, short and obviously right: the ground
  truth the tests compare everything against.

Load weights with :meth:`Bert.from_pretrained` (a folder with ``config.json`` and
``model.safetensors`` or ``pytorch_model.bin``), :meth:`Bert.from_state_dict` or :meth:`Bert.from_hf`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from fastbert import encoder, reference
from fastbert.config import BertConfig


def _modules(**children: nn.Module) -> nn.ModuleDict:
    # A ModuleDict gives attribute access with HF's attribute and state-dict names.
    return nn.ModuleDict(children)


def _layer(c: BertConfig) -> nn.ModuleDict:
    H, I = c.hidden_size, c.intermediate_size
    return _modules(
        attention=_modules(
            self=_modules(query=nn.Linear(H, H), key=nn.Linear(H, H), value=nn.Linear(H, H)),
            output=_modules(dense=nn.Linear(H, H), LayerNorm=nn.LayerNorm(H, eps=c.layer_norm_eps)),
        ),
        intermediate=_modules(dense=nn.Linear(H, I)),
        output=_modules(dense=nn.Linear(I, H), LayerNorm=nn.LayerNorm(H, eps=c.layer_norm_eps)),
    )


class Bert(nn.Module):
    """BERT embeddings, encoder layers and (optionally) the pooler, in HF's layout."""

    fastbert_family = "BERT"  # the family fastbert.views reads it as (HF's BertModel tree)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        config.check_supported()
        self.config = config
        H = config.hidden_size
        self.embeddings = _modules(
            word_embeddings=nn.Embedding(config.vocab_size, H),
            position_embeddings=nn.Embedding(config.max_position_embeddings, H),
            token_type_embeddings=nn.Embedding(config.type_vocab_size, H),
            LayerNorm=nn.LayerNorm(H, eps=config.layer_norm_eps),
        )
        self.encoder = _modules(layer=nn.ModuleList(_layer(config) for _ in range(config.num_hidden_layers)))
        self.pooler = _modules(dense=nn.Linear(H, H)) if add_pooling_layer else None

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: BertConfig) -> "Bert":
        """Load HF-named weights; a ``bert.`` prefix (BertFor* checkpoints) and head weights are dropped."""
        stripped = {}
        for name, value in state_dict.items():
            name = name.removeprefix("bert.")
            if name.startswith(("embeddings.", "encoder.", "pooler.")) and not name.endswith("position_ids"):
                stripped[name] = value
        model = cls(config, add_pooling_layer=any(n.startswith("pooler.") for n in stripped))
        missing, unexpected = model.load_state_dict(stripped, strict=False)
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Bert":
        """Load ``config.json`` plus ``model.safetensors`` (preferred) or ``pytorch_model.bin`` from a folder."""
        path = Path(path)
        config = BertConfig.from_json_file(path / "config.json")
        if (path / "model.safetensors").exists():
            from safetensors.torch import load_file

            state_dict = load_file(str(path / "model.safetensors"))
        elif (path / "pytorch_model.bin").exists():
            state_dict = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        return cls.from_state_dict(state_dict, config)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "Bert":
        """Copy the encoder weights of a transformers BERT model (any BertModel or BertFor* class)."""
        base = getattr(hf_model, "bert", hf_model)
        model = cls.from_state_dict(base.state_dict(), BertConfig.from_hf(base.config))
        return model.to(next(base.parameters()).dtype)

    # ----------------------------------------------------------------------------- forwards
    def pool(self, sequence_output: torch.Tensor) -> torch.Tensor | None:
        """HF's pooler: tanh(dense(hidden state of the first token))."""
        if self.pooler is None:
            return None
        return torch.tanh(self.pooler.dense(sequence_output[:, 0]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Padding-free forward: ``(last_hidden_state [B, S, H], pooled [B, H] or None)``.

        Pad positions of ``last_hidden_state`` are zero. See :mod:`fastbert.encoder` for masks.
        """
        hidden, _ = encoder.encode(
            self, input_ids, attention_mask, token_type_ids, position_ids, backend=backend
        )
        return hidden, self.pool(hidden)

    def reference_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The padded plain-PyTorch forward, every position computed, as the original BERT does."""
        c = self.config
        B, S = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(S, device=device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.embeddings
        h = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids) + e.position_embeddings(position_ids)
        h = e.LayerNorm(h)

        if attention_mask is None:
            attention_mask = torch.ones(B, S, device=device)
        if attention_mask.dim() == 2:
            allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
            if c.is_decoder:
                allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=device).tril()
            bias = torch.zeros(allowed.shape, dtype=h.dtype, device=device).masked_fill(~allowed, float("-inf"))
        else:
            mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
            bias = torch.zeros_like(mask, dtype=h.dtype).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask

        N, D = c.num_attention_heads, c.head_dim
        for layer in self.encoder.layer:
            a = layer.attention.self

            def heads(x):
                return x.view(B, S, N, D).transpose(1, 2)

            q, k, v = heads(a.query(h)), heads(a.key(h)), heads(a.value(h))
            scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias
            probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
            ctx = (probs @ v).transpose(1, 2).reshape(B, S, N * D)
            o = layer.attention.output
            h = o.LayerNorm(o.dense(ctx) + h)
            i = reference.gelu(layer.intermediate.dense(h), c.gelu_approximate)
            o = layer.output
            h = o.LayerNorm(o.dense(i) + h)
        return h, self.pool(h)

