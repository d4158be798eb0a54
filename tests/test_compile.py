"""``torch.compile(fullgraph=True)`` over an optimized model: one graph, same outputs.

The ops' fake implementations and the static packing used while tracing (``token_capacity``
rows, no readback) are what make this work; a graph break anywhere in fastbert's forward fails
this test.
"""

from __future__ import annotations

import pytest
import torch

import fastbert

# Slow, out of the fast loop (pytest -m "not slow"): torch.compile (Inductor) compiles.
pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")


def test_compiled_optimized_model_matches_eager():
    config = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=100, num_labels=2)
    reference = transformers.BertForSequenceClassification(config).eval()
    model = fastbert.optimize(transformers.BertForSequenceClassification(config).eval())
    model.load_state_dict(reference.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 99, (3, 17))
    with torch.no_grad():
        for lengths in ([17, 5, 9], [2, 17, 1]):  # a new token count must not need a new graph to be right
            mask = torch.arange(17)[None] < torch.tensor(lengths)[:, None]
            expected = reference(ids, attention_mask=mask).logits
            got = compiled(ids, attention_mask=mask).logits
            assert (got - expected).abs().max() <= 1e-4


def test_compiled_mpnet_with_its_relative_bias():
    """Positions counted from the ids, no token-type table and the relative bias, traced in one graph."""
    config = transformers.MPNetConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=37, max_position_embeddings=64)
    reference = transformers.MPNetModel(config).eval()
    model = fastbert.optimize(transformers.MPNetModel(config).eval())
    model.load_state_dict(reference.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(2, 99, (3, 17))
    mask = torch.arange(17)[None] < torch.tensor([17, 5, 9])[:, None]
    ids[~mask] = config.pad_token_id
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        got = compiled(ids, attention_mask=mask).last_hidden_state
    assert (got - expected)[mask].abs().max() <= 1e-4
