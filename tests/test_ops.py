"""Op level: the custom ops of the seam on the ``torch`` backend.

Each op runs in the test dtype and is held to the accuracy rule against its float64 reference,
with plain PyTorch (SDPA, F.layer_norm, F.gelu...) in the same dtype as the peer. The attention
reference is also checked against an independent per-sequence loop, so the varlen, causal and
bias semantics every backend is tested against are themselves checked. ``opcheck`` verifies
each op's schema and fake implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastbert import ops, reference
from tolerance import assert_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def packed(lengths, heads, head_dim, dtype, device="cpu"):
    """Random q, k, v as strided views of one [T, 3, N, D] tensor, like the QKV GEMM's output."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qkv = torch.randn(int(cu[-1]), 3, heads, head_dim, device=device).to(dtype)
    q, k, v = qkv.unbind(1)
    return q, k, v, cu, max(lengths)


def attention_by_loop(q, k, v, cu, scale, causal, bias):
    """Independent attention: one sequence, one head at a time, plain softmax."""
    out = torch.zeros_like(q)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        for h in range(q.shape[1]):
            scores = q[s:e, h] @ k[s:e, h].T * scale
            if bias is not None:
                scores = scores + bias[b, h, : e - s, : e - s]
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
            probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
            out[s:e, h] = probs @ v[s:e, h]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[1], [7, 1, 129], [33, 0, 5], [127, 3]])
def test_attention_reference_matches_loop(lengths, causal):
    q, k, v, cu, max_len = packed(lengths, 2, 16, torch.float64)
    scale = 16**-0.5
    got = reference.attention(q, k, v, cu, max_len, scale, causal, None)
    torch.testing.assert_close(got, attention_by_loop(q, k, v, cu, scale, causal, None))


def test_attention_reference_bias_and_fully_masked_rows():
    B, N, S, D = 3, 2, 9, 8
    q, k, v, cu, _ = packed([S] * B, N, D, torch.float64)
    bias = torch.randn(B, N, S, S, dtype=torch.float64)
    bias[1, :, 4, :] = -math.inf  # a query row with every key masked -> zeros, not NaN
    bias[2, :, :, 0] = -math.inf
    got = reference.attention(q, k, v, cu, S, 0.3, False, bias)
    torch.testing.assert_close(got, attention_by_loop(q, k, v, cu, 0.3, False, bias))
    assert torch.all(got[S + 4] == 0)


def sdpa_peer(q, k, v, cu, scale, causal):
    """PyTorch's own attention in the test dtype, sequence by sequence."""
    out = torch.empty_like(q)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        if e > s:
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths,head_dim", [([1, 7, 129], 32), ([257, 2], 80), ([33, 0, 20], 96), ([64], 128)])
def test_attention_op(lengths, head_dim, causal, dtype, device):
    q, k, v, cu, max_len = packed(lengths, 3, head_dim, dtype, device)
    scale = head_dim**-0.5
    got = ops.attention(q, k, v, cu, max_len, scale, causal, None, "torch")
    ref = reference.attention(q.double(), k.double(), v.double(), cu, max_len, scale, causal, None)
    assert_within_rule(got, ref, sdpa_peer(q, k, v, cu, scale, causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("tokens,k,n", [(1, 64, 96), (37, 384, 1536), (129, 100, 300)])
def test_linear_gelu_op(tokens, k, n, approximate, dtype, device):
    x = torch.randn(tokens, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    got = ops.linear_gelu(x, w, b, approximate, "torch")
    ref = reference.linear_gelu(x.double(), w.double(), b.double(), approximate)
    peer = F.gelu(F.linear(x, w, b), approximate=approximate)
    assert_within_rule(got, ref, peer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [384, 768, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layernorm_op(hidden, with_bias, dtype, device):
    x, r = (torch.randn(19, hidden, device=device).to(dtype) for _ in range(2))
    bias = torch.randn(hidden, device=device).to(dtype) if with_bias else None
    w, lb = torch.randn(hidden, device=device).to(dtype), torch.randn(hidden, device=device).to(dtype)
    got = ops.add_layernorm(x, r, bias, w, lb, 1e-6, "torch")
    ref = reference.add_layernorm(x.double(), r.double(), None if bias is None else bias.double(), w.double(), lb.double(), 1e-6)
    summed = x + r if bias is None else x + bias + r
    assert_within_rule(got, ref, F.layer_norm(summed, (hidden,), w, lb, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_layernorm_op(dtype, device):
    V, P, TT, H, T = 50, 20, 3, 96, 41
    tables = [torch.randn(n, H, device=device).to(dtype) for n in (V, P, TT)]
    w, lb = torch.randn(H, device=device).to(dtype), torch.randn(H, device=device).to(dtype)
    ids = [torch.randint(0, n, (T,), device=device) for n in (V, P, TT)]
    got = ops.embed_layernorm(*ids, *tables, w, lb, 1e-12, "torch")
    ref = reference.embed_layernorm(*ids, *(t.double() for t in tables), w.double(), lb.double(), 1e-12)
    word, pos, tt = (F.embedding(i, t) for i, t in zip(ids, tables))
    assert_within_rule(got, ref, F.layer_norm(word + tt + pos, (H,), w, lb, 1e-12))


def test_pad_unpad_round_trip(device):
    B, S, H = 4, 9, 5
    mask = torch.rand(B, S, device=device) > 0.4
    mask[2] = False  # a sequence of length 0
    indices = mask.flatten().nonzero().flatten()
    x = torch.randn(B, S, H, device=device)
    packed_x = ops.unpad(x, indices, "torch")
    assert torch.equal(packed_x, x[mask])
    back = ops.pad(packed_x, indices, B, S, "torch")
    assert torch.equal(back[mask], x[mask]) and torch.all(back[~mask] == 0)


def opcheck_cases():
    q, k, v, cu, max_len = packed([5, 3], 2, 8, torch.float32)
    bias = torch.randn(1, 2, 5, 5).expand(2, 2, 5, 5)
    x, r = torch.randn(8, 16), torch.randn(8, 16)
    ids = torch.randint(0, 4, (8,))
    return [
        (ops.attention, (q, k, v, cu, max_len, 0.5, True, None, "torch")),
        (ops.attention, (q, k, v, torch.tensor([0, 4, 8], dtype=torch.int32), 4, 0.5, False, bias[:, :, :4, :4], "torch")),
        (ops.linear_gelu, (x, torch.randn(24, 16), torch.randn(24), "tanh", "torch")),
        (ops.add_layernorm, (x, r, torch.randn(16), torch.randn(16), torch.randn(16), 1e-5, "torch")),
        (ops.embed_layernorm, (ids, ids, ids % 2, torch.randn(4, 16), torch.randn(4, 16), torch.randn(2, 16),
                               torch.randn(16), torch.randn(16), 1e-5, "torch")),
        (ops.unpad, (torch.randn(2, 4, 16), torch.tensor([0, 1, 4, 6]), "torch")),
        (ops.pad, (torch.randn(4, 16), torch.tensor([0, 1, 4, 6]), 2, 4, "torch")),
    ]


@pytest.mark.parametrize("op,args", opcheck_cases(), ids=lambda c: getattr(c, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
