"""Model level: ``fastbert.optimize`` against the untouched Hugging Face model.

Every supported head class on small random configs, fp32 on CPU: max abs error on valid
tokens <= 1e-4. Outputs shaped like the input (``[B, S, ...]``) are compared on valid tokens
only, because fastbert's pad positions are zero by design; other outputs are compared whole.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastbert

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
HEAD_CLASSES = [
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForMultipleChoice",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertLMHeadModel",
]


def hf_config(hidden=64, heads=2, layers=2, act="gelu", eps=1e-12, decoder=False, max_pos=160):
    return transformers.BertConfig(
        vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 3 + 5, hidden_act=act, layer_norm_eps=eps, max_position_embeddings=max_pos,
        type_vocab_size=3, is_decoder=decoder, num_labels=2,  # QA needs exactly 2
    )


def make_pair(class_name, config):
    """(untouched HF model, optimized deep copy), both in eval mode."""
    model = getattr(transformers, class_name)(config).eval()
    return model, fastbert.optimize(copy.deepcopy(model))


def padding_mask(lengths, seqlen, left=False):
    pos = torch.arange(seqlen)[None]
    lengths = torch.tensor(lengths)[:, None]
    return (pos >= seqlen - lengths) if left else (pos < lengths)


def max_error(ref, out, valid):
    """Largest abs difference over all tensor outputs, on valid tokens where shaped like the input.

    A KV cache (decoders with use_cache) is not compared: fastbert builds none (documented).
    """
    worst = 0.0
    for key, r in ref.items():
        if not isinstance(r, (torch.Tensor, tuple)):
            continue
        o = out[key]
        if isinstance(r, tuple):  # hidden_states
            pairs = list(zip(r, o))
        else:
            pairs = [(r, o)]
        for r_t, o_t in pairs:
            assert r_t.shape == o_t.shape, key
            if r_t.shape[: valid.dim()] == valid.shape:
                r_t, o_t = r_t[valid], o_t[valid]
            worst = max(worst, (r_t - o_t).abs().max().item())
    return worst


def run_both(ref_model, fast_model, **inputs):
    with torch.no_grad():
        return ref_model(**inputs), fast_model(**inputs)


@pytest.mark.parametrize("class_name", HEAD_CLASSES)
def test_every_head_class_matches(class_name):
    config = hf_config(decoder=class_name == "BertLMHeadModel")
    ref_model, fast_model = make_pair(class_name, config)
    B, S = 3, 23
    shape = (B, 2, S) if class_name == "BertForMultipleChoice" else (B, S)
    ids = torch.randint(0, config.vocab_size, shape)
    valid = padding_mask(torch.randint(1, S + 1, (ids.numel() // S,)).tolist(), S).view(shape)
    tt = torch.randint(0, config.type_vocab_size, shape)
    ref, out = run_both(ref_model, fast_model, input_ids=ids, attention_mask=valid.long(), token_type_ids=tt)
    assert type(out) is type(ref)
    assert max_error(ref, out, valid) <= ATOL


@pytest.mark.parametrize(
    "hidden,heads,act,eps",
    [(64, 2, "gelu", 1e-12), (128, 2, "gelu_new", 1e-5), (160, 2, "gelu_pytorch_tanh", 1e-7), (96, 3, "gelu", 1e-6)],
    ids=["hd32-erf", "hd64-tanh", "hd80-tanh", "hd32-3heads"],
)
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_shapes_activations_and_padding_sides(hidden, heads, act, eps, left):
    config = hf_config(hidden=hidden, heads=heads, act=act, eps=eps)
    ref_model, fast_model = make_pair("BertModel", config)
    lengths = [1, 7, 127, 129, 64]
    S = 129
    ids = torch.randint(0, config.vocab_size, (len(lengths), S))
    valid = padding_mask(lengths, S, left=left)
    ref, out = run_both(ref_model, fast_model, input_ids=ids, attention_mask=valid.long())
    assert (ref.last_hidden_state - out.last_hidden_state)[valid].abs().max() <= ATOL
    assert torch.all(out.last_hidden_state[~valid] == 0), "pad positions must be exactly zero"


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_causal_lm_with_padding(left):
    config = hf_config(decoder=True, act="gelu_new")
    ref_model, fast_model = make_pair("BertLMHeadModel", config)
    S = 40
    ids = torch.randint(0, config.vocab_size, (4, S))
    valid = padding_mask([40, 1, 17, 33], S, left=left)
    ref, out = run_both(ref_model, fast_model, input_ids=ids, attention_mask=valid.long())
    assert (ref.logits - out.logits)[valid].abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["bool", "float", "none"])
def test_mask_dtypes_and_no_mask(kind):
    ref_model, fast_model = make_pair("BertForSequenceClassification", hf_config())
    ids = torch.randint(0, 99, (3, 12))
    valid = padding_mask([12, 5, 9], 12) if kind != "none" else torch.ones(3, 12, dtype=torch.bool)
    mask = {"bool": valid, "float": valid.float(), "none": None}[kind]
    ref, out = run_both(ref_model, fast_model, input_ids=ids, attention_mask=mask)
    assert (ref.logits - out.logits).abs().max() <= ATOL


def test_4d_additive_mask_takes_padded_path():
    """An arbitrary (non key-padding) mask: every position computed, mask used as additive bias."""
    ref_model, fast_model = make_pair("BertModel", hf_config())
    B, S = 2, 10
    ids = torch.randint(0, 99, (B, S))
    allowed = torch.rand(B, 1, S, S) > 0.3
    allowed |= torch.eye(S, dtype=torch.bool)  # every query keeps at least itself
    for mask in (allowed, torch.zeros(B, 1, S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)):
        ref, out = run_both(ref_model, fast_model, input_ids=ids, attention_mask=mask)
        assert (ref.last_hidden_state - out.last_hidden_state).abs().max() <= ATOL


def test_position_ids_hidden_states_and_tuple_output():
    ref_model, fast_model = make_pair("BertModel", hf_config(layers=3))
    ids = torch.randint(0, 99, (2, 15))
    valid = padding_mask([15, 6], 15)
    position_ids = torch.randint(0, 160, (2, 15))
    kwargs = dict(input_ids=ids, attention_mask=valid, position_ids=position_ids, output_hidden_states=True)
    ref, out = run_both(ref_model, fast_model, **kwargs)
    assert len(out.hidden_states) == 4
    assert max_error(ref, out, valid) <= ATOL
    _, as_tuple = run_both(ref_model, fast_model, input_ids=ids, attention_mask=valid, position_ids=position_ids,
                           return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert (as_tuple[0] - ref.last_hidden_state)[valid].abs().max() <= ATOL


def test_all_padding_row_does_not_poison_others():
    ref_model, fast_model = make_pair("BertModel", hf_config())
    ids = torch.randint(0, 99, (3, 8))
    valid = padding_mask([8, 0, 3], 8)
    ref, out = run_both(ref_model, fast_model, input_ids=ids, attention_mask=valid.long())
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert (ref.last_hidden_state - out.last_hidden_state)[valid].abs().max() <= ATOL
    assert torch.all(out.last_hidden_state[1] == 0)


@pytest.mark.parametrize("output_hidden_states", [False, True])
def test_empty_sequences_are_named(output_hidden_states):
    # HF's own forward fails on [B, 0] (a reshape error in its attention); ours says what is wrong.
    _, fast_model = make_pair("BertModel", hf_config())
    with pytest.raises(ValueError, match=r"input_ids has sequence length 0 \(shape \(2, 0\)\)"):
        fast_model(torch.zeros(2, 0, dtype=torch.long), output_hidden_states=output_hidden_states)


def test_unoptimize_restores_original_forward():
    model = transformers.BertModel(hf_config()).eval()
    ids = torch.randint(0, 99, (2, 6))
    mask = padding_mask([6, 2], 6)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        fastbert.optimize(model)
        assert fastbert.is_optimized(model)
        fastbert.unoptimize(model)
        assert not fastbert.is_optimized(model)
        after = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(before, after)  # pad positions included: the HF forward is back


def test_weight_changes_after_optimize_are_seen():
    ref_model, fast_model = make_pair("BertModel", hf_config())
    with torch.no_grad():
        for m in (ref_model, fast_model):
            m.encoder.layer[0].attention.self.key.weight.mul_(1.5)
    ids = torch.randint(0, 99, (2, 9))
    ref, out = run_both(ref_model, fast_model, input_ids=ids)
    assert (ref.last_hidden_state - out.last_hidden_state).abs().max() <= ATOL


@pytest.mark.parametrize("feature", ["output_attentions", "inputs_embeds"])
def test_unsupported_call_features_fall_back_with_warning(feature):
    ref_model, fast_model = make_pair("BertModel", hf_config())
    ids = torch.randint(0, 99, (2, 5))
    if feature == "inputs_embeds":
        call = {"inputs_embeds": ref_model.embeddings.word_embeddings(ids).detach()}
    else:
        call = {"input_ids": ids, "output_attentions": True}
    with pytest.warns(UserWarning, match=feature):
        ref, out = run_both(ref_model, fast_model, **call)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


def test_training_mode_runs_fused(recwarn):
    model = fastbert.optimize(transformers.BertModel(hf_config()))
    model.train()
    out = model(torch.randint(0, 99, (2, 5)))
    assert not [w for w in recwarn if "fastbert" in str(w.message)]
    out.last_hidden_state.sum().backward()
    assert model.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"is_decoder": True, "add_cross_attention": True}, "cross-attention"),
    ],
)
def test_unsupported_configs_are_refused(change, match):
    config = hf_config()
    for key, value in change.items():
        setattr(config, key, value)
    model = transformers.BertModel(config) if "add_cross_attention" not in change else transformers.BertLMHeadModel(config)
    with pytest.raises(fastbert.UnsupportedConfigError, match=match):
        fastbert.optimize(model)
    assert not fastbert.is_optimized(model)


def test_optimize_rejects_non_bert_models():
    with pytest.raises(TypeError, match="BertModel"):
        fastbert.optimize(torch.nn.Linear(2, 2))
