"""Op level: the custom ops of the seam on the ``torch`` backend.

Each op runs in the test dtype and is held to the accuracy rule against its float64 reference,
with plain PyTorch (SDPA, F.layer_norm, F.gelu...) in the same dtype as the peer. The attention
reference is also checked against an independent per-sequence loop, so the varlen, causal,
bias and relative-bias semantics every backend is tested against are themselves checked. ``opcheck`` verifies
each op's schema and fake implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastbert import ops, reference
from relative_bias import bad_arguments, columns_with_holes, table
from tolerance import assert_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def packed(lengths, heads, head_dim, dtype, device="cpu"):
    """Random q, k, v as strided views of one [T, 3, N, D] tensor, like the QKV GEMM's output."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qkv = torch.randn(int(cu[-1]), 3, heads, head_dim, device=device).to(dtype)
    q, k, v = qkv.unbind(1)
    return q, k, v, cu, max(lengths)


def attention_by_loop(q, k, v, cu, scale, causal, bias, rel_bias=None, positions=None):
    """Independent attention: one sequence, one head at a time, plain softmax."""
    out = torch.zeros_like(q)
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        for h in range(q.shape[1]):
            scores = q[s:e, h] @ k[s:e, h].T * scale
            if rel_bias is not None:
                radius = rel_bias.shape[1] // 2
                cols = positions[s:e].long()
                key_minus_query = cols[None, :] - cols[:, None]
                index = torch.minimum(torch.maximum(key_minus_query, torch.tensor(-radius)), torch.tensor(radius))
                scores = scores + rel_bias[h].double()[index + radius].to(scores.dtype)
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


@pytest.mark.parametrize("width", [1, 9, 257])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[1], [7, 1, 129], [33, 0, 5], [127, 3]])
def test_attention_reference_rel_bias_matches_loop(lengths, causal, width):
    q, k, v, cu, max_len = packed(lengths, 2, 16, torch.float64)
    rel, cols = table(2, width), columns_with_holes(lengths, holes=5)
    got = reference.attention(q, k, v, cu, max_len, 0.25, causal, None, rel, cols)
    torch.testing.assert_close(got, attention_by_loop(q, k, v, cu, 0.25, causal, None, rel, cols))


def test_attention_reference_rel_bias_with_padded_bias_and_dummy_rows():
    B, N, S, D = 2, 3, 11, 8
    q, k, v, cu, _ = packed([S] * B, N, D, torch.float64)
    q, k, v = (torch.cat([t, torch.randn(4, N, D, dtype=torch.float64)]) for t in (q, k, v))  # 4 dummy rows
    bias = torch.randn(B, N, S, S, dtype=torch.float64)
    bias[0, :, 2, 5:] = -math.inf
    rel = table(N, 7)
    cols = torch.cat([columns_with_holes([S] * B, holes=4), torch.tensor([-(2**31), 2**31 - 1, 0, 5], dtype=torch.int32)])
    for causal in (False, True):
        got = reference.attention(q, k, v, cu, S, 0.3, causal, bias, rel, cols)
        torch.testing.assert_close(got[: B * S], attention_by_loop(q, k, v, cu, 0.3, causal, bias, rel, cols)[: B * S])


def test_attention_reference_rel_bias_looks_up_key_minus_query_columns():
    # Zero scores and a table that is 0 except +40 at distance +2: each query attends (almost
    # only) to the key two columns to its right, a column, not a rank, since the row has holes;
    # where no such key exists, the bias is flat and the output is the mean of the values.
    cols = torch.tensor([0, 1, 3, 4, 6, 9, 11], dtype=torch.int32)
    n, radius = cols.numel(), 3
    q, k = torch.zeros(n, 1, 4, dtype=torch.float64), torch.zeros(n, 1, 4, dtype=torch.float64)
    v = torch.randn(n, 1, 4, dtype=torch.float64)
    rel = torch.zeros(1, 2 * radius + 1)
    rel[0, radius + 2] = 40.0
    cu = torch.tensor([0, n], dtype=torch.int32)
    got = reference.attention(q, k, v, cu, n, 1.0, False, None, rel, cols)
    for i, c in enumerate(cols.tolist()):
        target = (cols == c + 2).nonzero().flatten().tolist()
        expected = v[target[0]] if target else v.mean(0)
        torch.testing.assert_close(got[i], expected, atol=1e-12, rtol=0)


def test_attention_reference_rejects_bad_rel_bias_arguments():
    q, k, v, cu, max_len = packed([5, 3], 2, 8, torch.float32)
    for kwargs, error, match in bad_arguments(q):
        with pytest.raises(error, match=match):
            reference.attention(q, k, v, cu, max_len, 0.5, False, None, **kwargs)


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
    got = ops.attention(q, k, v, cu, max_len, scale, causal, None, backend="torch")
    ref = reference.attention(q.double(), k.double(), v.double(), cu, max_len, scale, causal, None)
    assert_within_rule(got, ref, sdpa_peer(q, k, v, cu, scale, causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_op_rel_bias(causal, dtype, device):
    lengths = [1, 7, 129, 0]
    q, k, v, cu, max_len = packed(lengths, 3, 32, dtype, device)
    rel, cols = table(3, 33, device), columns_with_holes(lengths, device=device)
    got = ops.attention(q, k, v, cu, max_len, 32**-0.5, causal, None, rel, cols, backend="torch")
    ref = reference.attention(q.double(), k.double(), v.double(), cu, max_len, 32**-0.5, causal, None, rel, cols)
    assert_within_rule(got, ref, reference.attention(q, k, v, cu, max_len, 32**-0.5, causal, None, rel, cols))


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
    rel, cols = table(2, 5), columns_with_holes([5, 3])
    x, r = torch.randn(8, 16), torch.randn(8, 16)
    ids = torch.randint(0, 4, (8,))
    return [
        (ops.attention, (q, k, v, cu, max_len, 0.5, True, None)),
        (ops.attention, (q, k, v, torch.tensor([0, 4, 8], dtype=torch.int32), 4, 0.5, False, bias[:, :, :4, :4])),
        (ops.attention, (q, k, v, cu, max_len, 0.5, False, None, rel, cols)),
        (ops.attention, (q, k, v, torch.tensor([0, 4, 8], dtype=torch.int32), 4, 0.5, True, bias[:, :, :4, :4], rel, cols)),
        (ops.linear_gelu, (x, torch.randn(24, 16), torch.randn(24), "tanh")),
        (ops.add_layernorm, (x, r, torch.randn(16), torch.randn(16), torch.randn(16), 1e-5)),
        (ops.embed_layernorm, (ids, ids, ids % 2, torch.randn(4, 16), torch.randn(4, 16), torch.randn(2, 16),
                               torch.randn(16), torch.randn(16), 1e-5)),
        (ops.unpad, (torch.randn(2, 4, 16), torch.tensor([0, 1, 4, 6]))),
        (ops.pad, (torch.randn(4, 16), torch.tensor([0, 1, 4, 6]), 2, 4)),
    ]


@pytest.mark.parametrize("op,args", opcheck_cases(), ids=lambda c: getattr(c, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args, {"backend": "torch"})
