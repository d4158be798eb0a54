"""CPU GEMMs: every library against float64, the choice rule, and packed weights kept current.

oneDNN's and the panel GEMM's paths run only while gradients are off (inference), so the calls
here are under no_grad.
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
needs_panels = pytest.mark.skipif(not cpu_gemm.PANELS_AVAILABLE, reason="fastbert._C is not built")
AVAILABLE = {"aten": True, "onednn": cpu_gemm.ONEDNN_AVAILABLE, "panels": cpu_gemm.PANELS_AVAILABLE}


@pytest.fixture(params=["aten", "onednn", "panels"])
def gemm(request):
    if not AVAILABLE[request.param]:
        pytest.skip(f"{request.param} is not available here")
    cpu_gemm.set_choice(request.param)
    yield request.param
    cpu_gemm.set_choice("auto")


# Widths that are and are not a multiple of the panel width and of three panels; rows that end
# on and off the panel GEMM's row tile.
SHAPES = [(1, 256, 768), (16, 768, 256), (128, 300, 260), (129, 257, 256), (7, 32, 96), (13, 37, 80), (70, 64, 48)]


@pytest.mark.parametrize("rows,K,N", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_within_rule(gemm, rows, K, N, with_bias):
    x, w = torch.randn(rows, K), torch.randn(N, K) / K**0.5
    b = torch.randn(N) if with_bias else None
    with torch.no_grad():
        got = cpu_gemm.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if with_bias else None)
    assert_within_rule(got, ref, F.linear(x, w, b))


@pytest.mark.parametrize("rows,K,N", [(1, 256, 768), (9, 768, 3072), (13, 37, 80), (200, 256, 512)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_gelu_within_rule(gemm, rows, K, N, approximate, dtype):
    from fastbert import extension

    x, w, b = (t.to(dtype) for t in (torch.randn(rows, K), torch.randn(N, K) / K**0.5, torch.randn(N)))
    with torch.no_grad():
        got = extension.function("linear_gelu", "cpu", direct=True)(x, w, b, approximate)
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate=approximate)
    assert_within_rule(got, ref, F.gelu(F.linear(x, w, b), approximate=approximate))


@pytest.mark.parametrize("rows,K,N", [(1, 256, 256), (64, 768, 768), (3, 40, 96)])
def test_bf16_linear_within_rule(gemm, rows, K, N):
    x, w, b = torch.randn(rows, K).bfloat16(), (torch.randn(N, K) / K**0.5).bfloat16(), torch.randn(N).bfloat16()
    with torch.no_grad():
        got = cpu_gemm.linear(x, w, b)
    assert_within_rule(got, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))


@needs_panels
def test_panel_gemm_refuses_what_it_cannot_run():
    from fastbert import _C

    width = cpu_gemm.PANEL_WIDTH
    with pytest.raises(RuntimeError, match="multiple of"):
        _C.cpu.pack_panels(torch.randn(width + 1, 8))
    panels = _C.cpu.pack_panels(torch.randn(width, 8))
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 8\]"):
        _C.cpu.panel_linear(torch.randn(2, 9), panels, None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.cpu.panel_linear(torch.randn(2, 8), panels, torch.randn(width + 1), None)
    with pytest.raises(RuntimeError, match="approximate must be"):
        _C.cpu.panel_linear(torch.randn(2, 8), panels, None, "erf")


@pytest.fixture
def choice():
    yield cpu_gemm.set_choice
    cpu_gemm.set_choice("auto")


@torch.no_grad()
def test_the_rule(choice):
    choice("auto")
    w = torch.randn(768, 768)
    few, some, many = (torch.randn(rows, 768) for rows in (16, cpu_gemm.ONEDNN_MAX_ROWS, cpu_gemm.ONEDNN_MAX_ROWS + 1))
    onednn = cpu_gemm.ONEDNN if cpu_gemm.ONEDNN_AVAILABLE else cpu_gemm.ATEN
    panels_measured = cpu_gemm.PANELS_AVAILABLE and fastbert.extension.CPU_ISA == "avx512"
    with torch.enable_grad():
        assert cpu_gemm.library(few, w) == cpu_gemm.ATEN  # autograd must see the GEMM
    assert cpu_gemm.library(few, w) == (cpu_gemm.PANELS if panels_measured else onednn)
    assert cpu_gemm.library(few, torch.randn(776, 768)) == onednn  # width not a multiple of the panels
    assert cpu_gemm.library(some, w) == onednn
    assert cpu_gemm.library(many, w) == cpu_gemm.ATEN
    assert cpu_gemm.library(many.bfloat16(), w.bfloat16()) == onednn
    assert cpu_gemm.library(few, w.bfloat16()) == cpu_gemm.ATEN  # mixed dtypes: ATen says what is wrong
    assert cpu_gemm.library(torch.randn(16, 32), torch.randn(96, 32)) == cpu_gemm.ATEN  # tiny: fixed costs lose
    choice("aten")
    assert cpu_gemm.library(few, w) == cpu_gemm.ATEN
    assert cpu_gemm.library(few.bfloat16(), w.bfloat16()) == cpu_gemm.ATEN
    choice("onednn")
    assert cpu_gemm.library(many, w) == onednn
    choice("panels")
    assert cpu_gemm.library(many, w) == (cpu_gemm.PANELS if cpu_gemm.PANELS_AVAILABLE else cpu_gemm.ATEN)
    with pytest.raises(ValueError, match="FASTBERT_CPU_GEMM must be one of"):
        choice("mkl")


def within_rule(x, w):
    with torch.no_grad():
        got = cpu_gemm.linear(x, w)
    assert_within_rule(got, F.linear(x.double(), w.double()), F.linear(x, w))


@pytest.mark.parametrize("layout", ["onednn", "panels"])
def test_packed_weight_follows_the_weight(choice, layout):
    if not AVAILABLE[layout]:
        pytest.skip(f"{layout} is not available here")
    choice(layout)
    pack, table = {"onednn": (cpu_gemm.packed, cpu_gemm._onednn_packed),
                   "panels": (cpu_gemm.panels, cpu_gemm._panel_packed)}[layout]
    # Weights at the scale of a trained layer's (the rule's floor is absolute): oneDNN and the
    # panel GEMM sum K in order, MKL in blocks, so at |y| ~ 30 their fp32 error is ~5x MKL's.
    w, x = torch.randn(256, 256) / 16, torch.randn(8, 256)
    first = pack(w)
    assert pack(w) is first  # made once
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    assert pack(w) is not first
    within_rule(x, w)
    w.data = torch.randn(256, 256) / 16  # new storage, same tensor
    within_rule(x, w)
    key = id(w)
    del w
    gc.collect()
    assert key not in table


def reference_and_optimized(layers: int):
    """A BERT with GEMMs wide enough for oneDNN's and the panel GEMM's paths, and an optimized copy on the cpp backend."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=512)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    return reference, fastbert.optimize(copy.deepcopy(reference), backend="cpp")


@pytest.mark.parametrize("layout", ["onednn", "panels"])
def test_model_matches_hf_after_a_weight_update(choice, layout):
    if not AVAILABLE[layout]:
        pytest.skip(f"{layout} is not available here")
    choice(layout)
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
