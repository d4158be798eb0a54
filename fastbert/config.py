"""The BERT configuration fastbert needs, readable without transformers installed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# HF ``hidden_act`` names and the GELU form each one computes.
GELU_BY_HIDDEN_ACT = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


class UnsupportedConfigError(ValueError):
    """The model uses a feature fastbert's fused path cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    is_decoder: bool = False
    add_cross_attention: bool = False
    position_embedding_type: str = "absolute"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return GELU_BY_HIDDEN_ACT[self.hidden_act]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BertConfig":
        """Build from a ``config.json`` dict or an HF config's ``to_dict()``; unknown keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names and v is not None}
        return cls(**known)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BertConfig":
        """Build from a ``transformers`` BERT config object (read by attribute, so any version works).

        Fields the config lacks take BERT's defaults, so this is for BERT configs only; the other
        families are read from their modules (:mod:`fastbert.views`), never through this class.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        return cls.from_dict({n: getattr(hf_config, n, None) for n in names})

    @classmethod
    def from_json_file(cls, path: str | Path) -> "BertConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check_supported(self) -> None:
        """Raise UnsupportedConfigError naming the first feature fastbert cannot run exactly."""
        if not isinstance(self.hidden_act, str) or self.hidden_act not in GELU_BY_HIDDEN_ACT:
            raise UnsupportedConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; fastbert fuses {sorted(GELU_BY_HIDDEN_ACT)}"
            )
        check_features(self.position_embedding_type, self.add_cross_attention)
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )


def check_features(position_embedding_type: str, add_cross_attention: bool) -> None:
    """Raise UnsupportedConfigError for the config features no family's fused path runs."""
    if position_embedding_type != "absolute":
        raise UnsupportedConfigError(
            f"position_embedding_type={position_embedding_type!r} is not supported; only absolute position "
            "embeddings are"
        )
    if add_cross_attention:
        raise UnsupportedConfigError("add_cross_attention=True (cross-attention) is not supported")
