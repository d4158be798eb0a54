"""CPU GEMMs: every library against float64, the measured choice, pinned choices, and packed
weights kept current.

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
from fastbert import cpu_gemm, tuning
from tolerance import assert_within_rule

needs_onednn = pytest.mark.skipif(not cpu_gemm.ONEDNN_AVAILABLE, reason="this torch has no oneDNN linear")
needs_panels = pytest.mark.skipif(not cpu_gemm.PANELS_AVAILABLE, reason="fastbert._C is not built")
AVAILABLE = cpu_gemm.AVAILABLE


@pytest.fixture(params=["aten", "onednn", "mkl", "panels"])
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


class Clock:
    """A fake timer for cpu_gemm's table: each library call "takes" its cost in seconds."""

    def __init__(self, costs: dict[str, float]):
        self.now, self.costs, self.calls = 0.0, costs, []

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch, tmp_path):
    """A fresh, empty cpu_gemm table timed by a fake clock; returns a function setting the costs."""
    monkeypatch.setenv("FASTBERT_CACHE_DIR", str(tmp_path))
    clock = Clock({})
    monkeypatch.setattr(cpu_gemm, "TABLE", fastbert.tuning.Table("cpu_gemm", timer=clock))
    real_run = cpu_gemm.run

    def timed(chosen, x, weight, bias):
        clock.calls.append(chosen)
        clock.now += clock.costs.get(chosen, 1.0)
        return real_run(chosen, x, weight, bias)

    monkeypatch.setattr(cpu_gemm, "run", timed)
    return clock


@torch.no_grad()
def test_candidates_and_what_runs_on_aten(choice):
    choice("auto")
    fp32 = cpu_gemm.candidates(torch.float32, True)
    assert fp32[0] == cpu_gemm.ATEN  # preferred on a near-tie: no second copy of the weight
    assert (cpu_gemm.ONEDNN in fp32, cpu_gemm.MKL in fp32, cpu_gemm.PANELS in fp32) == (
        cpu_gemm.ONEDNN_AVAILABLE, cpu_gemm.MKL_AVAILABLE, cpu_gemm.PANELS_AVAILABLE)
    assert cpu_gemm.PANELS not in cpu_gemm.candidates(torch.float32, False)
    assert cpu_gemm.candidates(torch.bfloat16, True) == (cpu_gemm.ATEN, *[cpu_gemm.ONEDNN] * cpu_gemm.ONEDNN_AVAILABLE)
    assert cpu_gemm.candidates(torch.float16, True) == (cpu_gemm.ATEN,)
    assert [tuning.bucket(r) for r in (0, 1, 2, 3, 16, 17, 512, 600)] == [1, 1, 2, 4, 16, 32, 512, 1024]
    w, x = torch.randn(768, 768), torch.randn(16, 768)
    with torch.enable_grad():
        assert cpu_gemm.library(x, w) == cpu_gemm.ATEN  # autograd must see the GEMM
    assert cpu_gemm.library(x, w.bfloat16()) == cpu_gemm.ATEN  # mixed dtypes: ATen says what is wrong
    assert cpu_gemm.library(x.half(), w.half()) == cpu_gemm.ATEN
    assert cpu_gemm.library(x[:0], w) == cpu_gemm.ATEN and cpu_gemm.linear(x[:0], w).shape == (0, 768)


@torch.no_grad()
def test_measures_once_per_key_and_keeps_the_fastest(choice, fake_clock):
    choice("auto")
    fastest = cpu_gemm.PANELS if cpu_gemm.PANELS_AVAILABLE else cpu_gemm.ATEN
    fake_clock.costs = {fastest: 0.5}
    w = torch.randn(768, 768) / 768**0.5
    assert cpu_gemm.library(torch.randn(20, 768), w) == fastest
    measured = len(fake_clock.calls)
    assert measured > len(cpu_gemm.candidates(torch.float32, True))
    fake_clock.costs = {cpu_gemm.ATEN: 0.1}  # a later call of the same key: the choice stands
    assert cpu_gemm.library(torch.randn(32, 768), w) == fastest  # 20 and 32 rows share a bucket
    assert len(fake_clock.calls) == measured
    if fastest != cpu_gemm.ATEN:  # the layouts that lost keep no packed copy of the weight
        assert [layout for layout, table in cpu_gemm._PACKED.items() if id(w) in table] == [fastest]
    assert cpu_gemm.library(torch.randn(33, 768), w) == cpu_gemm.ATEN  # a new bucket, measured again
    assert len(fake_clock.calls) > measured
    (key, entry), *_ = cpu_gemm.TABLE.entries().items()
    assert key == "linear|float32|768|768|32" and entry["source"] == "measured"


@torch.no_grad()
def test_a_near_tie_keeps_aten(choice, fake_clock):
    choice("auto")
    fake_clock.costs = {lib: 1.0 - 0.01 * i for i, lib in enumerate(cpu_gemm.candidates(torch.float32, True))}
    assert cpu_gemm.library(torch.randn(8, 256), torch.randn(256, 256)) == cpu_gemm.ATEN


@torch.no_grad()
def test_a_pinned_choice_wins_without_measuring(choice, fake_clock):
    w, x = torch.randn(768, 768), torch.randn(600, 768)
    for pinned in ("aten", "onednn", "mkl", "panels"):
        choice(pinned)
        assert cpu_gemm.library(x, w) == (pinned if AVAILABLE[pinned] else cpu_gemm.ATEN)
    choice("panels")
    assert cpu_gemm.library(x, torch.randn(776, 768)) == cpu_gemm.ATEN  # width not a multiple of the panels
    choice("mkl")
    assert cpu_gemm.library(x.bfloat16(), w.bfloat16()) == cpu_gemm.ATEN  # MKL's packed format is fp32 only
    assert fake_clock.calls == [] and cpu_gemm.TABLE.entries() == {}
    with pytest.raises(ValueError, match="FASTBERT_CPU_GEMM must be one of"):
        choice("mkl-dnn")
    choice("auto")
    with cpu_gemm.using("aten"):  # pinned inside the block only
        assert cpu_gemm.library(x, w) == cpu_gemm.ATEN and fake_clock.calls == []
    fake_clock.costs = {lib: 0.5 for lib in cpu_gemm.AVAILABLE if lib != cpu_gemm.ATEN}
    assert cpu_gemm.library(x, w) == cpu_gemm.candidates(torch.float32, True)[1] and fake_clock.calls


# A second process: loads the first one's decisions from the cache, times nothing, and computes
# bitwise the same outputs.
SECOND_PROCESS = """
import hashlib, json, torch
from fastbert import cpu_gemm, tuning
torch.manual_seed(0)
digest = hashlib.sha256()
with torch.no_grad():
    for rows, n, k in [(16, 768, 256), (16, 512, 256), (300, 768, 256), (300, 256, 768)]:
        x, w, b = torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.randn(n)
        digest.update(cpu_gemm.linear(x, w, b).numpy().tobytes())
entries = tuning.decisions()["cpu_gemm"]
print(json.dumps({"digest": digest.hexdigest(), "choices": {k: e["choice"] for k, e in entries.items()},
                  "sources": sorted({e["source"] for e in entries.values()})}))
"""


def test_a_second_process_makes_the_same_choice_and_bitwise_the_same_outputs(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FASTBERT_CACHE_DIR": str(tmp_path), "FASTBERT_CPU_GEMM": "auto",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    first, second = (json.loads(subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, check=True,
                                               capture_output=True, text=True).stdout) for _ in range(2))
    assert first["sources"] == ["measured"] and second["sources"] == ["cache"]
    assert second["choices"] == first["choices"] and second["digest"] == first["digest"]


def within_rule(x, w):
    with torch.no_grad():
        got = cpu_gemm.linear(x, w)
    assert_within_rule(got, F.linear(x.double(), w.double()), F.linear(x, w))


@pytest.mark.parametrize("layout", ["onednn", "mkl", "panels"])
def test_packed_weight_follows_the_weight(choice, layout):
    if not AVAILABLE[layout]:
        pytest.skip(f"{layout} is not available here")
    choice(layout)
    pack = {"onednn": cpu_gemm.packed, "mkl": cpu_gemm.mkl_packed, "panels": cpu_gemm.panels}[layout]
    table = cpu_gemm._PACKED[layout]
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


@pytest.mark.parametrize("layout", ["auto", "onednn", "mkl", "panels"])
def test_model_matches_hf_after_a_weight_update(choice, layout):
    if not AVAILABLE.get(layout, True):
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
