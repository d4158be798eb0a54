"""Bad input gets a clear error naming the argument; nothing runs on to a wrong result."""

from __future__ import annotations

import pytest
import torch

from fastbert import Bert, BertConfig, encoder

CONFIG = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=40, max_position_embeddings=16, type_vocab_size=2)


@pytest.fixture(scope="module")
def model():
    return Bert(CONFIG).eval()


def ids(batch=2, seqlen=6):
    return torch.randint(0, CONFIG.vocab_size, (batch, seqlen))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(attention_mask=torch.ones(2, 5)), ValueError, r"attention_mask has shape \(2, 5\)"),
        (dict(attention_mask=torch.ones(3, 6)), ValueError, "attention_mask"),
        (dict(attention_mask=torch.full((2, 6), 2)), ValueError, "only 0 .* and 1"),
        (dict(attention_mask=torch.ones(2, 2, 6, 5, dtype=torch.bool)), ValueError, "a 4D mask must be"),
        (dict(attention_mask=torch.ones(2, 1, 1, 1, 6)), ValueError, "attention_mask must be 2D"),
        (dict(attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.long)), TypeError, "bool .* or float"),
        (dict(token_type_ids=torch.full((2, 6), 2)), ValueError, "token_type_ids .* type_vocab_size is 2"),
        (dict(position_ids=torch.full((2, 6), 16)), ValueError, "position_ids .* max_position_embeddings"),
    ],
)
def test_bad_arguments_are_named(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(ids(), **kwargs)


@pytest.mark.parametrize("bad", [CONFIG.vocab_size, -1])
def test_token_id_outside_vocabulary(model, bad):
    x = ids()
    x[1, 3] = bad
    with pytest.raises(ValueError, match="input_ids .* vocab_size is 50"):
        model(x)


def test_sequence_longer_than_position_table(model):
    with pytest.raises(ValueError, match="sequence length 17 .* max_position_embeddings is 16"):
        model(ids(seqlen=17))


def test_float_input_ids(model):
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(ids().float())


def test_input_ids_must_be_2d(model):
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, seq\] tensor"):
        model(ids()[0])


def test_empty_sequences_are_named_and_an_empty_batch_is_empty(model):
    # HF's own forward fails on [B, 0] with a reshape error; there is no first token to pool.
    with pytest.raises(ValueError, match=r"input_ids has sequence length 0 \(shape \(2, 0\)\)"):
        model(ids(seqlen=0))
    with pytest.raises(ValueError, match="input_ids has sequence length 0"):
        encoder.encode(model, ids(seqlen=0), output_hidden_states=True)
    # No sequences at all, each of some length, is well defined: empty outputs of the right shapes.
    hidden, pooled = model(ids(batch=0))
    assert hidden.shape == (0, 6, CONFIG.hidden_size) and pooled.shape == (0, CONFIG.hidden_size)


def test_tensors_on_another_device(model):
    with pytest.raises(ValueError, match="attention_mask is on meta but the model is on cpu"):
        model(ids(), attention_mask=torch.ones(2, 6, device="meta"))


def test_unknown_backend(model):
    with pytest.raises(ValueError, match="unknown fastbert backend 'fast'"):
        model(ids(), backend="fast")
