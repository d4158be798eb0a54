"""Model level, every family: ``fastbert.optimize`` against the untouched Hugging Face model.

RoBERTa, XLM-R, CamemBERT, Data2VecText, ELECTRA, ALBERT, DistilBERT MPNet (BERT itself is
in test_hf_models.py) with every head class, on tiny random configs, fp32 on CPU: max abs error on
valid tokens <= 1e-4, no fallback to the HF forward. Pad slots hold the pad id; batches mix
right and left padding, a masked hole inside a sequence (a token that is not the pad id: it
still advances RoBERTa's positions) and a pad id inside real text (it gets the padding row).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import fastbert
import fastbert.backends
from fastbert import hf
from test_host_path import SYNC_OPS, Readbacks, sync_ops

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VOCAB, PAD = 99, 1
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, intermediate_size=37,
             max_position_embeddings=64, pad_token_id=PAD, num_labels=2)  # QA needs exactly 2 labels
ROBERTA_HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                 "ForQuestionAnswering", "ForMultipleChoice", "ForCausalLM")
HEADS = {
    "Roberta": ROBERTA_HEADS,
    "XLMRoberta": ROBERTA_HEADS,
    "Camembert": ROBERTA_HEADS,
    "Data2VecText": ROBERTA_HEADS,
    "Electra": (*ROBERTA_HEADS, "ForPreTraining"),
    "Albert": tuple(h for h in ROBERTA_HEADS if h != "ForCausalLM") + ("ForPreTraining",),
    "DistilBert": tuple(h for h in ROBERTA_HEADS if h != "ForCausalLM"),
    "MPNet": tuple(h for h in ROBERTA_HEADS if h != "ForCausalLM"),
}
NO_TOKEN_TYPES = ("DistilBert", "MPNet")


def hf_config(family: str, decoder: bool = False, **overrides):
    settings = dict(SIZES, num_hidden_layers=2, is_decoder=decoder)
    if family == "Electra":
        settings.update(embedding_size=16)  # E != H: embeddings_project exists
    if family == "Albert":
        settings.update(embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    if family == "DistilBert":
        settings = dict(vocab_size=VOCAB, dim=32, n_heads=2, hidden_dim=37, n_layers=2, max_position_embeddings=64,
                        pad_token_id=PAD, num_labels=2, activation="gelu")
    settings.update(overrides)
    return getattr(transformers, f"{family}Config")(**settings)


def model_pair(family: str, head: str, config):
    """(untouched HF model, optimized deep copy), both in eval mode."""
    model = getattr(transformers, f"{family}{head}")(config).eval()
    return model, fastbert.optimize(copy.deepcopy(model))


def awkward_batch(seqlen=13):
    """ids and mask [4, seqlen]: right padding, left padding, a masked hole, a pad id in the text."""
    ids = torch.randint(PAD + 1, VOCAB, (4, seqlen))
    mask = torch.ones(4, seqlen, dtype=torch.long)
    mask[0, 9:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    mask[2, 4] = 0  # a masked hole, its id not the pad id
    mask[3, 11:] = 0
    ids[mask == 0] = PAD
    ids[2, 4] = 7
    ids[3, 6] = PAD  # a pad id inside real text, attended to
    return ids, mask


def max_error(ref, out, valid) -> float:
    """Largest abs difference over the tensor outputs, on valid tokens where shaped like the input.

    Outputs per sequence (pooler, sequence logits) read the first token: they are compared on
    rows whose first token is real (with left padding it is a pad, zero by design).
    """
    worst = 0.0
    per_sequence = valid.flatten(0, -2)  # multiple choice: the backbone sees [batch * choices, seq]
    first_real = valid[..., 0]
    for key, r in ref.items():
        if not isinstance(r, (torch.Tensor, tuple)):
            continue
        pairs = list(zip(r, out[key], strict=True)) if isinstance(r, tuple) else [(r, out[key])]
        for r_t, o_t in pairs:
            assert r_t.shape == o_t.shape, key
            if r_t.shape[: valid.dim()] == valid.shape:
                r_t, o_t = r_t[valid], o_t[valid]
            elif r_t.shape[:2] == per_sequence.shape:
                r_t, o_t = r_t[per_sequence], o_t[per_sequence]
            elif r_t.shape[: first_real.dim()] == first_real.shape:
                r_t, o_t = r_t[first_real], o_t[first_real]
            worst = max(worst, (r_t - o_t).abs().max().item())
    return worst


def run_fused(model, *args, **kwargs):
    """``model(...)`` under no_grad, failing if fastbert fell back to the HF forward."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        hf._warned.clear()
        out = model(*args, **kwargs)
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("fastbert:")
                 and "running the original forward" in str(w.message)]
    assert not fallbacks, fallbacks
    return out


@pytest.mark.parametrize("family,head", [(f, h) for f, heads in HEADS.items() for h in heads])
def test_every_family_and_head_matches(family, head):
    ref_model, fast_model = model_pair(family, head, hf_config(family, decoder=head == "ForCausalLM"))
    ids, mask = awkward_batch()
    if head == "ForMultipleChoice":
        ids, mask = ids.view(2, 2, -1), mask.view(2, 2, -1)
    kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        ref = ref_model(**kwargs)
    out = run_fused(fast_model, **kwargs)
    assert type(out) is type(ref)
    assert out.keys() - {"cache", "past_key_values"} == ref.keys() - {"cache", "past_key_values"}  # no KV cache
    assert max_error(ref, out, mask.bool()) <= ATOL


@pytest.mark.parametrize("family", list(HEADS))
def test_backbone_tuple_output_positional_call_and_token_types(family):
    config = hf_config(family)
    ref_model, fast_model = model_pair(family, "Model", config)
    ids, mask = awkward_batch()
    valid = mask.bool()
    # Positional, as each family's forward orders its parameters (DistilBERT, MPNet: no token types).
    args = (ids, mask) if family in NO_TOKEN_TYPES else (ids, mask, torch.zeros_like(ids))
    with torch.no_grad():
        ref = ref_model(*args, return_dict=False)
    out = run_fused(fast_model, *args, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    for r, o in zip(ref, out):
        assert ((r - o)[valid] if r.dim() == 3 else (r - o)[valid[:, 0]]).abs().max() <= ATOL  # pooler: first token
    if family in NO_TOKEN_TYPES:  # sentence-transformers passes token types: ignored, as by HF
        with torch.no_grad():
            ref = ref_model(ids, mask).last_hidden_state
        out = run_fused(fast_model, ids, mask, token_type_ids=torch.ones_like(ids)).last_hidden_state
        assert (ref - out)[valid].abs().max() <= ATOL


@pytest.mark.parametrize("family", ["Roberta", "Electra"])
def test_token_types_and_position_ids(family):
    config = hf_config(family, type_vocab_size=2)
    ref_model, fast_model = model_pair(family, "Model", config)
    ids, mask = awkward_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.randint(0, 2, ids.shape),
                  position_ids=torch.randint(0, 64, ids.shape))
    with torch.no_grad():
        ref = ref_model(**kwargs)
    assert max_error(ref, run_fused(fast_model, **kwargs), mask.bool()) <= ATOL


@pytest.mark.parametrize("family", ["XLMRoberta", "MPNet"])
def test_positions_from_ids_add_no_readback(monkeypatch, family):
    """Positions counted from the ids and the bias table's columns are computed on the device: still one readback."""
    _, fast_model = model_pair(family, "Model", hf_config(family))
    ids, mask = awkward_batch()
    readbacks = Readbacks(monkeypatch)
    with torch.no_grad():
        counts = sync_ops(lambda: fast_model(input_ids=ids, attention_mask=mask))
    assert readbacks.count == 1
    assert counts == {**dict.fromkeys(SYNC_OPS, 0), "aten::_assert_async": 0}


def test_roberta_left_and_right_padding_give_the_same_outputs():
    _, fast_model = model_pair("XLMRoberta", "Model", hf_config("XLMRoberta"))
    ids = torch.randint(PAD + 1, VOCAB, (1, 9))
    right = torch.cat([ids, torch.full((1, 4), PAD)], 1)
    left = torch.cat([torch.full((1, 4), PAD), ids], 1)
    mask = (right != PAD).long()
    a = run_fused(fast_model, right, mask).last_hidden_state[0, :9]
    b = run_fused(fast_model, left, mask.flip(1)).last_hidden_state[0, 4:]
    assert (a - b).abs().max() <= ATOL


def test_electra_without_projection():
    config = hf_config("Electra", embedding_size=32)
    ref_model, fast_model = model_pair("Electra", "ForSequenceClassification", config)
    assert not hasattr(ref_model.electra, "embeddings_project")
    ids, mask = awkward_batch()
    with torch.no_grad():
        ref = ref_model(ids, mask, output_hidden_states=True)
    assert max_error(ref, run_fused(fast_model, ids, mask, output_hidden_states=True), mask.bool()) <= ATOL


def test_albert_hidden_states_count_every_applied_layer():
    ref_model, fast_model = model_pair("Albert", "Model", hf_config("Albert"))
    ids, mask = awkward_batch()
    with torch.no_grad():
        ref = ref_model(ids, mask, output_hidden_states=True)
    out = run_fused(fast_model, ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 1 + 4 * 2
    assert max_error(ref, out, mask.bool()) <= ATOL


@pytest.mark.parametrize("family", ["Roberta", "Albert"])
def test_position_table_bound(family):
    _, fast_model = model_pair(family, "Model", hf_config(family))
    limit = 64 - PAD - 1 if family == "Roberta" else 64
    run_fused(fast_model, torch.randint(PAD + 1, VOCAB, (1, limit)))
    with pytest.raises(ValueError, match=f"truncate the input to at most {limit} tokens"):
        fast_model(torch.randint(PAD + 1, VOCAB, (1, limit + 1)))


def test_mpnet_beyond_the_saturated_buckets():
    """S > 91: distances past the last bucket boundary, where MPNet's buckets saturate."""
    ref_model = transformers.MPNetModel(hf_config("MPNet", max_position_embeddings=128)).eval()
    with torch.no_grad():  # biases large enough that each bucket shows (the init's 0.02 hardly does)
        ref_model.encoder.relative_attention_bias.weight.normal_(0, 3)
    fast_model = fastbert.optimize(copy.deepcopy(ref_model))
    ids = torch.randint(PAD + 1, VOCAB, (3, 120))
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    mask[2, :17] = 0
    mask[0, 50] = 0  # a hole: distances stay between original columns
    ids[mask == 0] = PAD
    ids[0, 50] = 5
    with torch.no_grad():
        ref = ref_model(ids, mask, output_hidden_states=True)
    assert max_error(ref, run_fused(fast_model, ids, mask, output_hidden_states=True), mask.bool()) <= ATOL


def test_mpnet_bias_table_follows_weight_updates():
    ref_model, fast_model = model_pair("MPNet", "Model", hf_config("MPNet"))
    ids, mask = awkward_batch()
    run_fused(fast_model, ids, mask)
    with torch.no_grad():
        for m in (ref_model, fast_model):
            m.encoder.relative_attention_bias.weight.mul_(-3)
        ref = ref_model(ids, mask)
    assert max_error(ref, run_fused(fast_model, ids, mask), mask.bool()) <= ATOL


@pytest.mark.parametrize("family", ["XLMRoberta", "MPNet"])
def test_bucketed_static_path(family):
    """The CUDA-graph buckets' static path (run uncaptured on CPU): positions from the bucket's ids, the bias table."""
    ref_model = getattr(transformers, f"{family}Model")(hf_config(family)).eval()
    fast_model = fastbert.optimize(copy.deepcopy(ref_model), cuda_graphs=True)
    ids, mask = awkward_batch(seqlen=11)
    with torch.no_grad():
        ref = ref_model(ids, mask, output_hidden_states=True)
    assert max_error(ref, run_fused(fast_model, ids, mask, output_hidden_states=True), mask.bool()) <= ATOL


def test_hidden_states_selected_by_index_fall_back():
    ref_model, fast_model = model_pair("Albert", "Model", hf_config("Albert"))
    ids, mask = awkward_batch()
    hf._warned.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="output_hidden_states selecting layers"):
        out = fast_model(ids, mask, output_hidden_states=[0, -1])
    with torch.no_grad():
        ref = ref_model(ids, mask, output_hidden_states=[0, -1])
    assert [s is None for s in out.hidden_states] == [s is None for s in ref.hidden_states]
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


def test_relu_distilbert_is_refused():
    model = transformers.DistilBertModel(hf_config("DistilBert", activation="relu"))
    with pytest.raises(fastbert.UnsupportedConfigError, match="activation='relu'"):
        fastbert.optimize(model)
    assert not fastbert.is_optimized(model)


def test_unknown_models_list_the_families():
    with pytest.raises(TypeError, match="RoBERTa .*XLMRobertaModel.*DistilBERT"):
        fastbert.optimize(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_view_follows_resize_token_embeddings():
    ref_model, fast_model = model_pair("Roberta", "ForMaskedLM", hf_config("Roberta"))
    for m in (ref_model, fast_model):
        m.resize_token_embeddings(VOCAB + 30)
    ids, mask = awkward_batch()
    ids[0, 0] = VOCAB + 20
    with torch.no_grad():
        ref = ref_model(ids, mask)
    assert max_error(ref, run_fused(fast_model, ids, mask), mask.bool()) <= ATOL


@pytest.mark.parametrize("family", ["Albert", "MPNet"], ids=["projection", "relative-bias"])
def test_triton_backend(family):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = fastbert.backends.plan(torch.device(device), "triton")
    assert all(plan[op] == "triton" for op in ("attention", "linear_gelu", "add_layernorm", "embed_layernorm")), plan
    settings = dict(num_hidden_layers=2, num_hidden_groups=1, inner_group_num=2) if family == "Albert" else {}
    ref_model = getattr(transformers, f"{family}Model")(hf_config(family, **settings)).eval().to(device)
    fast_model = fastbert.optimize(copy.deepcopy(ref_model), backend="triton")
    ids, mask = (t.to(device) for t in awkward_batch(seqlen=7))
    with torch.no_grad():
        ref = ref_model(ids, mask, output_hidden_states=True)
    assert max_error(ref, run_fused(fast_model, ids, mask, output_hidden_states=True), mask.bool()) <= ATOL


# ----------------------------------------------------------------------------- sentence-transformers


def _save_tiny(tmp_path, family: str, head: str = "Model"):
    """A tiny random checkpoint with a WordPiece tokenizer whose [PAD] is id 1, saved for offline loading."""
    words = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=False)
    config = hf_config(family, num_labels=1) if head != "Model" else hf_config(family)
    getattr(transformers, f"{family}{head}")(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


SENTENCES = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15", "w1 [PAD] w3 w20"]


@pytest.mark.parametrize("family", list(HEADS))
def test_sentence_transformer(tmp_path, family):
    st = pytest.importorskip("sentence_transformers")
    path = _save_tiny(tmp_path, family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no sentence-transformers model found, creating mean pooling"
        original = st.SentenceTransformer(path, device="cpu")
        optimized = fastbert.optimize(st.SentenceTransformer(path, device="cpu"))
    ref = original.encode(SENTENCES, convert_to_tensor=True)
    out = run_fused(optimized.encode, SENTENCES, convert_to_tensor=True)
    assert (ref - out).abs().max() <= ATOL


@pytest.mark.parametrize("family", ["Bert", "XLMRoberta"])
def test_cross_encoder(tmp_path, family):
    st = pytest.importorskip("sentence_transformers")
    path = _save_tiny(tmp_path, family, "ForSequenceClassification")
    original = st.CrossEncoder(path, device="cpu")
    optimized = fastbert.optimize(st.CrossEncoder(path, device="cpu"))
    pairs = list(zip(SENTENCES, reversed(SENTENCES)))
    ref = torch.as_tensor(original.predict(pairs))
    out = torch.as_tensor(run_fused(optimized.predict, pairs))
    assert (ref - out).abs().max() <= ATOL
