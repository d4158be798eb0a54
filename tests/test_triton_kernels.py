"""The Triton kernels against their references (``fastbert.reference``) computed in float64.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (fp32 and fp16; the
interpreter's bf16 arithmetic is wrong, so bf16 runs on CUDA only). Shapes are tiny but
awkward: sequence lengths 1, 7, 33, 129, 257 and 0, one long sequence among short ones, head
dims that are not powers of two, hidden sizes that are not either. Every output is poisoned
with NaN before the call, so an element the kernel fails to write shows up. On a GPU the same
tests run on CUDA, plus bf16 and BERT-large sized shapes.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from fastbert import reference
from fastbert.kernels import add_layernorm, attention, embed_layernorm, linear_gelu
from fastbert.kernels.attention import Config as AttentionConfig
from relative_bias import bad_arguments, columns_with_holes, table
from tolerance import assert_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _runnable(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (set when no GPU is present)")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 wrongly; bf16 is checked on CUDA")


def _poison(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ----------------------------------------------------------------------------- attention


def _packed_qkv(lengths, heads, head_dim, dtype, device):
    """q, k, v as the encoder makes them: strided [T, N, D] views of one [T, 3, N, D] tensor."""
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device=device).to(dtype)
    q, k, v = qkv.unbind(1)
    return q, k, v, cu_seqlens


def _check_attention(q, k, v, cu_seqlens, max_seqlen, causal, bias=None, launch=None, rel_bias=None,
                     positions=None, real=None):
    """Rule check of the kernel on the first ``real`` rows (default: all)."""
    scale = q.shape[-1] ** -0.5
    out = attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions,
                    out=_poison(q.shape, q.dtype, q.device), launch=launch)
    as64 = [t.double() for t in (q, k, v)]
    bias64 = bias.double() if bias is not None else None
    ref64 = reference.attention(*as64, cu_seqlens, max_seqlen, scale, causal, bias64, rel_bias, positions)
    peer = reference.attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, bias, rel_bias, positions)
    assert_within_rule(out[:real], ref64[:real], peer[:real])
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1], [7, 33, 1], [129], [257, 1, 3, 2, 5], [5, 0, 3]],
                         ids=["1", "7-33-1", "129", "long-and-short", "with-empty"])
def test_attention_varlen(device, dtype, lengths, causal):
    _runnable(device, dtype)
    q, k, v, cu = _packed_qkv(lengths, 2, 64, dtype, device)
    _check_attention(q, k, v, cu, max(lengths), causal)


@pytest.mark.parametrize("launch", [AttentionConfig(32, 16, 4, 1), AttentionConfig(16, 32, 4, 1)],
                         ids=["M32-N16", "M16-N32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_block_shapes(device, causal, launch):
    """Query and key blocks of different sizes: where unmasked blocks end and the diagonal lies."""
    _runnable(device, torch.float32)
    lengths = [70, 1, 31, 32, 33, 16]
    q, k, v, cu = _packed_qkv(lengths, 2, 32, torch.float32, device)
    _check_attention(q, k, v, cu, max(lengths), causal, launch=launch)
    bias = torch.randn(1, 2, 33, 33, device=device)
    q, k, v, cu = _packed_qkv([33, 33], 2, 32, torch.float32, device)
    _check_attention(q, k, v, cu, 33, causal, bias=bias, launch=launch)


@pytest.mark.parametrize("head_dim", [16, 32, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_head_dims(device, dtype, head_dim):
    _runnable(device, dtype)
    lengths = [33, 7]
    q, k, v, cu = _packed_qkv(lengths, 2, head_dim, dtype, device)
    _check_attention(q, k, v, cu, max(lengths), causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_bias_padded_path(device, dtype):
    """A per-head 4D additive bias plus a broadcast key-padding bias (dims of stride 0)."""
    _runnable(device, dtype)
    batch, heads, seqlen = 2, 3, 19
    q, k, v, cu = _packed_qkv([seqlen] * batch, heads, 32, dtype, device)
    per_head = torch.randn(batch, heads, seqlen, seqlen, device=device).to(dtype)
    _check_attention(q, k, v, cu, seqlen, causal=False, bias=per_head)
    keep = torch.rand(batch, 1, 1, seqlen, device=device) > 0.3
    keep[..., 0] = True
    padding = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
    _check_attention(q, k, v, cu, seqlen, causal=True, bias=padding.expand(batch, heads, seqlen, seqlen))


def test_attention_fully_masked_rows(device):
    """Rows whose keys are all -inf give zeros (not NaN); rows masked with finfo.min stay finite."""
    _runnable(device, torch.float32)
    batch, heads, seqlen = 2, 2, 9
    q, k, v, cu = _packed_qkv([seqlen] * batch, heads, 16, torch.float32, device)
    bias = torch.zeros(batch, 1, seqlen, seqlen, device=device)
    bias[0, :, 3] = float("-inf")
    bias[1, :, 5] = torch.finfo(torch.float32).min
    out = _check_attention(q, k, v, cu, seqlen, causal=False, bias=bias)
    assert (out[3] == 0).all()
    assert (out[seqlen + 5].abs() > 0).any()


@pytest.mark.parametrize("width", [1, 9, 257])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1, 0, 7], [127, 1], [129, 7]], ids=["1-0-7", "127-1", "129-7"])
def test_attention_rel_bias(device, dtype, lengths, causal, width):
    """The relative-position table, gathered by columns with holes, on the packed path."""
    _runnable(device, dtype)
    q, k, v, cu = _packed_qkv(lengths, 2, 32, dtype, device)
    rel, cols = table(2, width, device), columns_with_holes(lengths, holes=6, device=device)
    _check_attention(q, k, v, cu, max(lengths), causal, rel_bias=rel, positions=cols)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_rel_bias_with_padded_bias_and_dummy_rows(device, dtype, causal):
    """With the padded path's bias, a strided table, and dummy rows past the last sequence
    whose columns are garbage (a static packing's): the real rows stay exact."""
    _runnable(device, dtype)
    batch, heads, seqlen, dummies = 2, 3, 23, 5
    q, k, v, cu = _packed_qkv([seqlen] * batch + [dummies], heads, 32, dtype, device)
    cu = cu[:-1]
    bias = torch.randn(batch, heads, seqlen, seqlen, device=device).to(dtype)
    bias[1, :, 4, 3:] = float("-inf")
    rel = table(heads, 2 * 17 + 1, device).t().contiguous().t()  # head stride 1
    cols = torch.cat([columns_with_holes([seqlen] * batch, device=device),
                      torch.tensor([2**31 - 1, 0, 7, 2**30, 3], dtype=torch.int32, device=device)])
    _check_attention(q, k, v, cu, seqlen, causal, bias=bias, rel_bias=rel, positions=cols, real=batch * seqlen)


@pytest.mark.parametrize("launch", [AttentionConfig(32, 16, 4, 1), AttentionConfig(16, 32, 4, 1)],
                         ids=["M32-N16", "M16-N32"])
def test_attention_rel_bias_block_shapes(device, launch):
    _runnable(device, torch.float32)
    lengths = [70, 1, 31, 32, 33]
    q, k, v, cu = _packed_qkv(lengths, 2, 32, torch.float32, device)
    rel, cols = table(2, 21, device), columns_with_holes(lengths, device=device)
    _check_attention(q, k, v, cu, max(lengths), True, launch=launch, rel_bias=rel, positions=cols)


def test_attention_rel_bias_rejects_bad_arguments(device):
    _runnable(device, torch.float32)
    q, k, v, cu = _packed_qkv([5, 3], 2, 16, torch.float32, device)
    for kwargs, error, match in bad_arguments(q):
        with pytest.raises(error, match=match):
            attention(q, k, v, cu, 5, 0.25, False, None, **kwargs)


@needs_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_bert_large_cuda(dtype, causal):
    """BERT-large shapes: 32 sequences of up to 512 tokens, 16 heads of 64."""
    lengths = torch.randint(1, 513, (32,)).tolist()
    lengths[0] = 512
    q, k, v, cu = _packed_qkv(lengths, 16, 64, dtype, "cuda")
    _check_attention(q, k, v, cu, 512, causal)


# ----------------------------------------------------------------------------- linear_gelu


def _check_linear_gelu(x, weight, bias, approximate):
    out = linear_gelu(x, weight, bias, approximate, out=_poison((*x.shape[:-1], weight.shape[0]), x.dtype, x.device))
    ref64 = reference.linear_gelu(x.double(), weight.double(), bias.double(), approximate)
    assert_within_rule(out, ref64, reference.linear_gelu(x, weight, bias, approximate))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 16, 16), (37, 50, 70), (64, 64, 96), (130, 32, 48), (3, 0, 5)])
def test_linear_gelu(device, dtype, approximate, M, K, N):
    _runnable(device, dtype)
    wide = torch.randn(M, K + 3, device=device).to(dtype)
    x = wide[:, :K]  # rows with a stride wider than K
    weight = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    _check_linear_gelu(x, weight, bias, approximate)


def test_linear_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        linear_gelu(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3), "sigmoid")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_gelu_bert_large_cuda(dtype):
    """The BERT-large FFN up-projection at 32 x 512 tokens: [16384, 1024] x [4096, 1024]ᵀ."""
    x = torch.randn(32 * 512, 1024, device="cuda").to(dtype)
    weight = (torch.randn(4096, 1024, device="cuda") / 32).to(dtype)
    bias = torch.randn(4096, device="cuda").to(dtype)
    _check_linear_gelu(x, weight, bias, "none")


# ----------------------------------------------------------------------------- add_layernorm


def _check_add_layernorm(x, residual, bias, weight, ln_bias, eps=1e-12):
    out = add_layernorm(x, residual, bias, weight, ln_bias, eps, out=_poison(x.shape, x.dtype, x.device))
    as64 = [t.double() if t is not None else None for t in (x, residual, bias, weight, ln_bias)]
    ref64 = reference.add_layernorm(*as64, eps)
    assert_within_rule(out, ref64, reference.add_layernorm(x, residual, bias, weight, ln_bias, eps))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 7), (33, 384), (5, 768), (3, 1000), (2, 1024), (2, 4096)])
def test_add_layernorm(device, dtype, rows, hidden, with_bias):
    _runnable(device, dtype)
    x = (torch.randn(rows, hidden, device=device) * 3 + 1).to(dtype)
    residual = torch.randn(hidden, rows, device=device).to(dtype).t()  # non-contiguous
    bias = torch.randn(hidden, device=device).to(dtype) if with_bias else None
    weight = torch.randn(hidden, device=device).to(dtype)
    ln_bias = torch.randn(hidden, device=device).to(dtype)
    _check_add_layernorm(x, residual, bias, weight, ln_bias)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_add_layernorm_bert_large_cuda(dtype):
    x, residual = (torch.randn(32 * 512, 1024, device="cuda").to(dtype) for _ in range(2))
    bias, weight, ln_bias = (torch.randn(1024, device="cuda").to(dtype) for _ in range(3))
    _check_add_layernorm(x, residual, bias, weight, ln_bias)


# ----------------------------------------------------------------------------- embed_layernorm


def _check_embed_layernorm(ids, tables, weight, ln_bias, eps=1e-12):
    T, H = ids[0].shape[0], tables[0].shape[1]
    out = embed_layernorm(*ids, *tables, weight, ln_bias, eps, out=_poison((T, H), tables[0].dtype, weight.device))
    ref64 = reference.embed_layernorm(*ids, *(t.double() for t in (*tables, weight, ln_bias)), eps)
    assert_within_rule(out, ref64, reference.embed_layernorm(*ids, *tables, weight, ln_bias, eps))


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", [(1, 7), (37, 384), (5, 1000)])
def test_embed_layernorm(device, dtype, id_dtype, tokens, hidden):
    _runnable(device, dtype)
    vocab, positions, types = 53, 40, 2
    ids = [torch.randint(0, n, (tokens,), device=device, dtype=id_dtype) for n in (vocab, positions, types)]
    ids[0][0] = vocab - 1  # the table's last row
    word_wide = torch.randn(vocab, hidden + 5, device=device).to(dtype)
    tables = [word_wide[:, :hidden]] + [torch.randn(n, hidden, device=device).to(dtype) for n in (positions, types)]
    weight, ln_bias = (torch.randn(hidden, device=device).to(dtype) for _ in range(2))
    _check_embed_layernorm(ids, tables, weight, ln_bias)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_embed_layernorm_bert_large_cuda(dtype):
    T, H = 32 * 512, 1024
    ids = [torch.randint(0, n, (T,), device="cuda") for n in (30522, 512, 2)]
    tables = [(torch.randn(n, H, device="cuda") * 0.05).to(dtype) for n in (30522, 512, 2)]
    weight, ln_bias = (torch.randn(H, device="cuda").to(dtype) for _ in range(2))
    _check_embed_layernorm(ids, tables, weight, ln_bias)


# ----------------------------------------------------------------------------- availability


def test_unavailable_reason_names_old_gpus(monkeypatch):
    """GPUs below compute capability 8.0 get a reason (the backend then falls back), never a crash."""
    import fastbert.kernels as kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))
    reason = kernels.unavailable_reason("cuda")
    assert reason is not None and "8.0" in reason and "Tesla T4" in reason and "7.5" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    assert kernels.unavailable_reason("cuda") is None


def test_availability_reads_the_tensors_gpu_not_the_current_one(monkeypatch):
    """Two GPUs, an sm_90 current and an older sm_75 second: Triton serves the first only."""
    import fastbert.kernels as kernels
    from fastbert import backends

    asked = []
    capabilities = {0: (9, 0), 1: (7, 5)}

    def capability(device=None):
        asked.append(device)
        return capabilities[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {torch.device(device).index}")
    second = torch.device("cuda", 1)
    reason = kernels.unavailable_reason(second)
    assert reason is not None and "GPU 1 is 7.5" in reason
    assert asked == [second]
    monkeypatch.setattr(backends, "_plan_cache", {})
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(UserWarning, match="backend 'triton' unavailable.*GPU 1 is 7.5"):
        assert backends.plan(second, "triton")["attention"] != "triton"
    assert backends.plan(torch.device("cuda", 0), "triton")["attention"] == "triton"
