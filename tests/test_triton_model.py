"""``fastbert.optimize(model, backend="triton")`` matches the untouched Hugging Face model.

Tiny BERT configs run through every Triton kernel (in the interpreter on CPU): fp32, max abs
error <= 1e-4 on valid tokens, for a padded 2D-mask batch (the packed path), a causal
BertLMHeadModel, and a 4D mask (the padded path with an additive attention bias).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fastbert
import fastbert.backends

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


@pytest.fixture
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    return "cpu"


def _config(**overrides):
    settings = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def _pair(model_cls, config, device):
    """(HF model, optimized copy) in eval mode on ``device``."""
    plan = fastbert.backends.plan(torch.device(device), "triton")
    assert all(plan[op] == "triton" for op in ("attention", "linear_gelu", "add_layernorm", "embed_layernorm")), plan
    hf = model_cls(config).eval().to(device)
    fast = fastbert.optimize(copy.deepcopy(hf), backend="triton")
    return hf, fast


def _batch(device, lengths=(9, 4, 1), vocab=97):
    seqlen = max(lengths)
    input_ids = torch.randint(1, vocab, (len(lengths), seqlen), device=device)
    mask = (torch.arange(seqlen, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
    token_type_ids = torch.randint(0, 2, input_ids.shape, device=device)
    return input_ids, mask, token_type_ids


@pytest.mark.parametrize("overrides", [
    {},
    {"hidden_size": 160, "num_attention_heads": 2, "intermediate_size": 200, "hidden_act": "gelu_new",
     "num_hidden_layers": 1},
], ids=["hd32-erf", "hd80-tanh"])
def test_bert_model_packed(device, overrides):
    hf, fast = _pair(transformers.BertModel, _config(**overrides), device)
    input_ids, mask, token_type_ids = _batch(device)
    with torch.no_grad():
        ours = fast(input_ids, attention_mask=mask, token_type_ids=token_type_ids).last_hidden_state
        theirs = hf(input_ids, attention_mask=mask, token_type_ids=token_type_ids).last_hidden_state
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max().item() <= TOLERANCE


def test_causal_lm_head(device):
    hf, fast = _pair(transformers.BertLMHeadModel, _config(is_decoder=True), device)
    input_ids, mask, _ = _batch(device, lengths=(8, 3, 6))
    with torch.no_grad():
        ours = fast(input_ids, attention_mask=mask).logits
        theirs = hf(input_ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max().item() <= TOLERANCE


def test_4d_mask_padded_path(device):
    """A 4D mask (here: key padding with a per-example banded window) runs as an attention bias."""
    hf, fast = _pair(transformers.BertModel, _config(), device)
    input_ids, mask, token_type_ids = _batch(device, lengths=(7, 5))
    seqlen = input_ids.shape[1]
    pos = torch.arange(seqlen, device=device)
    band = (pos[None, :] - pos[:, None]).abs() <= 3
    keep = band[None, None] & mask.bool()[:, None, None, :]
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours = fast(input_ids, attention_mask=bias, token_type_ids=token_type_ids).last_hidden_state
        theirs = hf(input_ids, attention_mask=bias, token_type_ids=token_type_ids).last_hidden_state
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max().item() <= TOLERANCE
