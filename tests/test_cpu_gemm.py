"""CPU GEMMs: both libraries against float64, the choice rule, and packed weights kept current.

oneDNN's path runs only while gradients are off (inference), so the calls here are under no_grad.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import cpu_gemm
from tolerance import assert_within_rule

needs_onednn = pytest.mark.skipif(not cpu_gemm.ONEDNN_AVAILABLE, reason="this torch has no oneDNN linear")


@pytest.fixture(params=["aten", "onednn"])
def gemm(request):
    if request.param == "onednn" and not cpu_gemm.ONEDNN_AVAILABLE:
        pytest.skip("this torch has no oneDNN linear")
    cpu_gemm.set_choice(request.param)
    yield request.param
    cpu_gemm.set_choice("auto")


@pytest.mark.parametrize("rows,K,N", [(1, 256, 768), (16, 768, 256), (128, 300, 260), (129, 257, 256), (7, 32, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_within_rule(gemm, rows, K, N, with_bias):
    x, w = torch.randn(rows, K), torch.randn(N, K) / K**0.5
    b = torch.randn(N) if with_bias else None
    with torch.no_grad():
        got = cpu_gemm.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if with_bias else None)
    assert_within_rule(got, ref, F.linear(x, w, b))


@pytest.fixture
def choice():
    yield cpu_gemm.set_choice
    cpu_gemm.set_choice("auto")


@torch.no_grad()
def test_the_rule(choice):
    choice("auto")
    w = torch.randn(768, 768)
    small, large = torch.randn(16, 768), torch.randn(cpu_gemm.ONEDNN_MAX_ROWS + 1, 768)
    with torch.enable_grad():
        assert not cpu_gemm.use_onednn(small, w)  # autograd must see the GEMM
    assert cpu_gemm.use_onednn(small, w) == cpu_gemm.ONEDNN_AVAILABLE
    assert not cpu_gemm.use_onednn(large, w)
    assert not cpu_gemm.use_onednn(torch.randn(16, 32), torch.randn(96, 32))  # tiny: oneDNN's fixed cost loses
    assert not cpu_gemm.use_onednn(small.bfloat16(), w.bfloat16())
    choice("aten")
    assert not cpu_gemm.use_onednn(small, w)
    choice("onednn")
    assert cpu_gemm.use_onednn(large, w) == cpu_gemm.ONEDNN_AVAILABLE
    with pytest.raises(ValueError, match="FASTBERT_CPU_GEMM must be one of"):
        choice("mkl")


def within_rule(x, w):
    with torch.no_grad():
        got = cpu_gemm.linear(x, w)
    assert_within_rule(got, F.linear(x.double(), w.double()), F.linear(x, w))


@needs_onednn
def test_packed_weight_follows_the_weight(choice):
    choice("onednn")
    w, x = torch.randn(256, 256), torch.randn(8, 256)
    first = cpu_gemm.packed(w)
    assert cpu_gemm.packed(w) is first  # made once
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    assert cpu_gemm.packed(w) is not first
    within_rule(x, w)
    w.data = torch.randn(256, 256)  # new storage, same tensor
    within_rule(x, w)
    key = id(w)
    del w
    gc.collect()
    assert key not in cpu_gemm._packed


def reference_and_optimized(layers: int):
    """A BERT with GEMMs wide enough for oneDNN's path, and an optimized copy on the cpp backend."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=512)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    return reference, fastbert.optimize(copy.deepcopy(reference), backend="cpp")


@needs_onednn
def test_model_on_onednn_matches_hf_after_a_weight_update(choice):
    choice("onednn")
    reference, model = reference_and_optimized(layers=2)
    ids = torch.randint(0, 99, (3, 11))
    mask = (torch.arange(11)[None] < torch.tensor([11, 4, 7])[:, None]).long()
    valid = mask.bool()
    with torch.no_grad():
        for step in range(2):
            want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert (got[valid] - want[valid]).abs().max() <= 1e-4
            # load_state_dict copies in place: the packed weights must be rebuilt, not reused.
            update = {k: v * 1.1 if k.endswith("weight") else v for k, v in reference.state_dict().items()}
            reference.load_state_dict(update)
            model.load_state_dict(update)


@needs_onednn
def test_model_under_inference_mode(choice):
    """sentence-transformers encodes under torch.inference_mode: weights and fused copies made
    there keep no version counter, and must serve calls outside it too."""
    choice("onednn")
    reference, model = reference_and_optimized(layers=1)
    ids = torch.randint(0, 99, (2, 7))
    want = reference(input_ids=ids).last_hidden_state.detach()
    with torch.inference_mode():
        got = model(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() <= 1e-4
    with torch.no_grad():
        assert (model(input_ids=ids).last_hidden_state - want).abs().max() <= 1e-4
    with torch.inference_mode():  # a model whose own weights are inference tensors
        frozen = fastbert.optimize(copy.deepcopy(reference), backend="cpp")
        for p in frozen.parameters():
            p.data = p.data.clone()
        assert (frozen(input_ids=ids).last_hidden_state - want).abs().max() <= 1e-4
