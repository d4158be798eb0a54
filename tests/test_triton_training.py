"""The Triton training kernels (forwards that save what their backward needs, and the
backwards) against their references in ``fastbert.reference`` computed in float64.

Without a GPU they run in Triton's interpreter on CPU tensors, fp32 and fp16 (bf16 on CUDA
only: the interpreter's bf16 dots are wrong). The rule is tests/tolerance.py's: at most twice
the error of the reference computed in the same dtype, plus a floor. Shapes are tiny but
awkward (lengths 0, 1, 7, 33, 129; head dims 32, 64, 80; hidden sizes that are not powers of
two), and dropout is compared against the reference drawing the same Philox mask, so the
kernels and the reference must agree on every dropped element, which the probes check
exactly. Outputs the API lets us pass are poisoned with NaN first.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import triton
import triton.language as tl

from fastbert import reference
from fastbert.kernels import attention_backward, attention_train
from fastbert.kernels.dropout import dropout_keep
from relative_bias import columns_with_holes, table
from tolerance import FLOOR, assert_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
P = 0.3


def _runnable(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (set when no GPU is present)")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 wrongly; bf16 is checked on CUDA")


def _poison(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _seed(device, value=0x1234_5678_9ABC) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- dropout mask


@triton.jit
def _keep_tile(seed_ptr, rows_ptr, out_ptr, first, p, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row_counters = tl.load(rows_ptr + tl.arange(0, ROWS))
    keep = dropout_keep(tl.load(seed_ptr), row_counters, first, BLOCK, p)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], keep)


@pytest.mark.parametrize("seed", [0, 0x1234_5678_9ABC, 2**63 - 1, -1, -(2**63) + 5])
def test_dropout_keep_is_the_reference_mask(device, seed):
    """The kernels' mask (four elements to a tl.rand4x call, interleaved back into the tile)
    against the reference's, element for element: tile widths below, at and above a call's four,
    row counters in the high word and past 2**32 calls, and tiles starting mid-row."""
    _runnable(device, torch.float32)
    seed = _seed(device, seed)
    rows = torch.tensor([0, 4, 100, 2**32 - 8, 2**32, 7 << 32, 2**34 - 4, 2**62 + 8], device=device)
    # first: an int32 start column (a key block's, as the kernels pass it)
    for block, first in ((1, 0), (2, 0), (4, 0), (4, 12), (64, 0), (64, 128), (64, 2**31 - 64)):
        out = torch.zeros(rows.numel(), block, dtype=torch.bool, device=device)
        _keep_tile[(1,)](seed, rows, out, first, P, ROWS=rows.numel(), BLOCK=block)
        counters = rows[:, None] + first + torch.arange(block, device=device)
        assert torch.equal(out, reference.dropout_keep(seed, counters, P)), (block, first)


# ----------------------------------------------------------------------------- attention


def _packed_qkv(lengths, heads, head_dim, dtype, device, dummies=0):
    """q, k, v: strided [T, N, D] views of one [T, 3, N, D] tensor; ``dummies`` rows past the end."""
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    qkv = torch.randn(sum(lengths) + dummies, 3, heads, head_dim, device=device).to(dtype)
    return (*qkv.unbind(1), cu_seqlens)


def _reference_backward64(grad, q, k, v, cu, max_seqlen, scale, causal, bias, rel_bias, positions, p, seed):
    """reference.attention_backward on float64 inputs (the fp32 table's gradient summed in fp64)."""
    as64 = [t.double() for t in (grad, q, k, v)]
    bias64 = None if bias is None else bias.double()
    return reference.attention_backward(as64[0], *as64[1:], None, None, cu, max_seqlen, scale, causal, bias64,
                                        rel_bias, positions, p, seed)


def _check_attention_train(q, k, v, cu, max_seqlen, causal, bias=None, rel_bias=None, positions=None, p=0.0,
                           grad=None, real=None):
    """Forward and backward of the kernels against the float64 reference on the first ``real``
    rows; the rest (dummy rows) must give lse +inf and exactly zero gradients. Returns
    (out, lse, dqkv, d_rel) of the kernels."""
    T, N, D = q.shape
    real = T if real is None else real
    scale = D**-0.5
    seed = _seed(q.device)
    args = (cu, max_seqlen, scale, causal, bias, rel_bias, positions, p, seed)
    out, lse = attention_train(q, k, v, *args, out=_poison(q.shape, q.dtype, q.device),
                               lse=_poison((N, T), torch.float32, q.device))
    bias64 = None if bias is None else bias.double()
    args64 = (cu, max_seqlen, scale, causal, bias64, rel_bias, positions, p, seed)
    out64, lse64 = reference.attention_train(q.double(), k.double(), v.double(), *args64)
    peer, peer_lse = reference.attention_train(q, k, v, *args)
    assert_within_rule(out[:real], out64[:real], peer[:real])
    # lse: +inf exactly where the reference has it (rows that see no key, dummy rows), the
    # finite rest within the rule; its floor is the inputs' (their rounding bounds the scores).
    dead = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse) & (lse > 0), dead), "lse is +inf on other rows than the reference's"
    assert torch.isinf(lse[:, real:]).all()
    assert_within_rule(lse[~dead], lse64[~dead], peer_lse[~dead], floor=FLOOR[q.dtype])

    if grad is None:
        grad = torch.randn(T, N, D, device=q.device).to(q.dtype)
    dqkv, d_rel = attention_backward(grad, q, k, v, out, lse, *args,
                                     dqkv=_poison((T, 3, N, D), q.dtype, q.device))
    dqkv64, d_rel64 = _reference_backward64(grad, q, k, v, *args)
    peer_dqkv, peer_rel = reference.attention_backward(grad, q, k, v, peer, peer_lse, *args)
    for i, name in enumerate("qkv"):
        try:
            assert_within_rule(dqkv[:real, i], dqkv64[:real, i], peer_dqkv[:real, i])
        except AssertionError as exc:
            raise AssertionError(f"d{name}: {exc}") from None
    assert (dqkv[real:] == 0).all(), "dummy rows' gradients are not zero"
    dead_rows = dead[:, :real].t()  # [real, N]
    assert (dqkv[:real, 0][dead_rows] == 0).all(), "rows that see no key have a nonzero dq"
    if rel_bias is None:
        assert d_rel.shape == (0,) and d_rel.dtype == torch.float32
    else:
        # Each table entry sums dS = P (dP - D) over rows of a head, and D = rowsum(dO * O) is
        # taken from the output saved in the input dtype (as in FlashAttention; the reference
        # recomputes it unrounded). Rounding O moves D_i by at most u Σ_d |dO_id O_id| (u the
        # unit roundoff), and the P of one row sum to at most 1, so an entry moves by at most
        # Σ_i of that: the floor (tiny in fp32).
        u = torch.finfo(q.dtype).eps / 2
        moved = (grad[:real].double().abs() * out[:real].double().abs()).sum(-1).sum(0).max().item() * u
        assert d_rel.dtype == torch.float32
        assert_within_rule(d_rel, d_rel64, peer_rel, floor=FLOOR[q.dtype] + moved)
    return out, lse, dqkv, d_rel


CASES = {
    # name: (lengths, head dim, causal, dropout p)
    "1-hd32": ([1], 32, False, 0.0),
    "7-33-1-0-hd64-causal-dropout": ([7, 33, 1, 0], 64, True, P),
    "129-7-hd80-dropout": ([129, 7], 80, False, P),
    "33-0-5-hd32-causal": ([33, 0, 5], 32, True, 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_train_and_backward(device, dtype, case):
    _runnable(device, dtype)
    lengths, head_dim, causal, p = case
    heads = 1 if max(lengths) > 64 else 2  # the interpreter's time grows with the square of the length
    q, k, v, cu = _packed_qkv(lengths, heads, head_dim, dtype, device)
    _check_attention_train(q, k, v, cu, max(lengths), causal, p=p)


@pytest.mark.parametrize("p", [0.0, P], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_train_bias_dead_rows_and_dummies(device, dtype, p):
    """The padded path's additive bias (per head, with a broadcast key-padding part), a row
    whose keys are all -inf (a dead row: lse +inf, zero dq), dummy rows past the last sequence,
    and a non-contiguous incoming gradient."""
    _runnable(device, dtype)
    batch, heads, seqlen, dummies = 2, 2, 19, 3
    q, k, v, cu = _packed_qkv([seqlen] * batch, heads, 32, dtype, device, dummies=dummies)
    bias = torch.randn(batch, heads, seqlen, seqlen, device=device)
    bias[:, :, :, -2:] = float("-inf")  # masked keys
    bias[1, 0, 4] = float("-inf")  # a dead row in head 0
    T = q.shape[0]
    grad = torch.randn(heads, 32, T, device=device).to(dtype).permute(2, 0, 1)  # strided
    _, lse, dqkv, _ = _check_attention_train(q, k, v, cu, seqlen, True, bias=bias.to(dtype), p=p, grad=grad,
                                             real=batch * seqlen)
    assert torch.isinf(lse[0, seqlen + 4]) and (dqkv[seqlen + 4, 0, 0] == 0).all()


@pytest.mark.parametrize("p", [0.0, P], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_train_rows_masked_by_a_finite_minimum(device, causal, p):
    """Hugging Face masks with finfo(float32).min, not -inf: a row whose keys all carry it
    attends uniformly to them (the scores are absorbed into the bias), so each probability is
    1/n. Its log-sum-exp, min + log n, rounds to min in fp32; the backward must still see 1/n,
    not 1 (which made dq n times too large). Also a row whose visible keys all carry min / 2.
    Out, dq, dk and dv against float64 (not lse: such rows' scores are clamped to fit base 2,
    see the kernel's notes)."""
    _runnable(device, torch.float32)
    seqlen, heads = 8, 2
    q, k, v, cu = _packed_qkv([seqlen, seqlen], heads, 16, torch.float32, device)
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(2, heads, seqlen, seqlen, device=device)
    bias[:, :, :, -3:] = low  # masked keys; the other rows still see some
    bias[1, 0, 5] = low  # a row with every key masked
    bias[0, 1, 6, :5] = low / 2  # every visible key at a finite minimum, above the masked ones
    T, N, D = q.shape
    args = (cu, seqlen, D**-0.5, causal, bias, None, None, p, _seed(device))
    out, lse = attention_train(q, k, v, *args)
    out64, _ = reference.attention_train(q.double(), k.double(), v.double(), *args)
    peer, peer_lse = reference.attention_train(q, k, v, *args)
    assert_within_rule(out, out64, peer)
    grad = torch.randn(T, N, D, device=device)
    dqkv, _ = attention_backward(grad, q, k, v, out, lse, *args)
    dqkv64, _ = _reference_backward64(grad, q, k, v, *args)
    peer_dqkv, _ = reference.attention_backward(grad, q, k, v, peer, peer_lse, *args)
    for i, name in enumerate("qkv"):
        try:
            assert_within_rule(dqkv[:, i], dqkv64[:, i], peer_dqkv[:, i])
        except AssertionError as exc:
            raise AssertionError(f"d{name}: {exc}") from None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_train_rel_bias(device, dtype, causal):
    """The relative-position table (columns with holes) with dropout and dummy rows whose
    columns are garbage; its gradient is checked too."""
    _runnable(device, dtype)
    lengths, heads, dummies = [33, 1, 7, 0], 2, 2
    q, k, v, cu = _packed_qkv(lengths, heads, 32, dtype, device, dummies=dummies)
    cols = torch.cat([columns_with_holes(lengths, holes=6, device=device),
                      torch.tensor([2**31 - 1, 5], dtype=torch.int32, device=device)])
    rel = table(heads, 2 * 9 + 1, device)
    _check_attention_train(q, k, v, cu, max(lengths), causal, rel_bias=rel, positions=cols, p=P, real=sum(lengths))


def _keep_mask(lengths, heads, T, seed, p, device):
    """The reference's dropout decisions, [N, T, S]: row (head, packed row), key index."""
    S = max(lengths)
    starts = [0, *itertools.accumulate(lengths)]
    rows = torch.arange(T, device=device)
    offsets = ((torch.arange(heads, device=device)[:, None, None] * T + rows[None, :, None]) << 32) | \
        torch.arange(S, device=device)
    keep = reference.dropout_keep(seed, offsets, p)
    in_seq = torch.zeros(T, S, dtype=torch.bool, device=device)
    for start, n in zip(starts, lengths):
        in_seq[start:start + n, :n] = True
    return keep, in_seq


def test_attention_dropout_mask_probes(device):
    """The dropped elements themselves: with V the identity (one-hot per key), out[i, j] is the
    dropped probability of key j for row i, zero exactly where the mask drops it; with dO the
    identity (one-hot per query), dV[j, i] is the same element seen from the dK/dV kernel, and
    dQ's mask shows through dQ of a K that is one-hot too. All must match the reference's mask."""
    _runnable(device, torch.float32)
    lengths, heads, D = [7, 20, 1], 2, 32
    T, S = sum(lengths), max(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    seed = _seed(device, 987654321)
    starts = cu[:-1].long().repeat_interleave(torch.tensor(lengths, device=device))
    rank = torch.arange(T, device=device) - starts  # each token's index within its sequence
    eye = torch.nn.functional.one_hot(rank, D).float()[:, None, :].expand(T, heads, D).contiguous()
    q = torch.randn(T, heads, D, device=device)
    k = torch.randn(T, heads, D, device=device)
    keep, in_seq = _keep_mask(lengths, heads, T, seed, P, device)
    out, lse = attention_train(q, k, eye, cu, S, 0.5, False, None, None, None, P, seed)
    ref, _ = reference.attention_train(q, k, eye, cu, S, 0.5, False, None, None, None, P, seed)
    kept_fwd = out.permute(1, 0, 2)[..., :S] != 0  # [N, T, S]
    assert torch.equal(kept_fwd & in_seq, keep & in_seq), "the forward's dropout mask differs from the reference's"
    assert torch.allclose(out, ref, atol=1e-6)
    # dV[j, h, i - start] = Σ over rows: P_ij M_ij / (1 - p) dO_i with dO_i one-hot at i's rank.
    dqkv, _ = attention_backward(eye, q, k, eye, out, lse, cu, S, 0.5, False, None, None, None, P, seed)
    dv = dqkv[:, 2].permute(1, 0, 2)[..., :S]  # [N, T (key j), S (query rank)]
    for start, n in zip(cu[:-1].tolist(), lengths):
        block = keep[:, start:start + n, :n].transpose(1, 2)  # [N, key, query rank]
        assert torch.equal(dv[:, start:start + n, :n] != 0, block), "the dK/dV kernel's mask differs"
    # dQ sees the mask through dP: with dO_i one-hot at i's rank and V = identity, dP_ij is
    # [rank(j) == rank(i)] M_ij / (1 - p); compare dq against the reference with the same mask.
    dqkv_ref, _ = reference.attention_backward(eye, q, k, eye, out, lse, cu, S, 0.5, False, None, None, None, P, seed)
    assert torch.allclose(dqkv, dqkv_ref, atol=1e-5)


def test_attention_train_deterministic_and_seeded(device):
    """Bitwise identical on a rerun; a different seed drops differently (the seed is read by the
    kernel, so only its value changes)."""
    _runnable(device, torch.float32)
    lengths = [33, 7]
    q, k, v, cu = _packed_qkv(lengths, 2, 32, torch.float32, device)
    rel, cols = table(2, 9, device), columns_with_holes(lengths, device=device)
    grad = torch.randn_like(q)
    results = []
    for seed in (_seed(device), _seed(device), _seed(device, 7)):
        out, lse = attention_train(q, k, v, cu, 33, 0.2, True, None, rel, cols, P, seed)
        dqkv, d_rel = attention_backward(grad, q, k, v, out, lse, cu, 33, 0.2, True, None, rel, cols, P, seed)
        results.append((out, lse, dqkv, d_rel))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], results[2][0])


def test_attention_train_rejects_bad_dropout(device):
    _runnable(device, torch.float32)
    q, k, v, cu = _packed_qkv([5], 1, 16, torch.float32, device)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_train(q, k, v, cu, 5, 0.25, False, None, None, None, 1.0, _seed(device))
    with pytest.raises(ValueError, match="seed"):
        attention_train(q, k, v, cu, 5, 0.25, False, None, None, None, 0.1, None)


# ----------------------------------------------------------------------------- add_layernorm


@pytest.mark.parametrize("p", [0.0, P], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 7), (33, 100), (9, 384)])
def test_add_layernorm_train_and_backward(device, dtype, rows, hidden, with_bias, p):
    _runnable(device, dtype)
    from fastbert.kernels import add_layernorm_backward, add_layernorm_train

    x = (torch.randn(rows, hidden, device=device) * 3 + 1).to(dtype)
    residual = torch.randn(hidden, rows, device=device).to(dtype).t()  # non-contiguous
    bias = torch.randn(hidden, device=device).to(dtype) if with_bias else None
    weight, ln_bias = (torch.randn(hidden, device=device).to(dtype) for _ in range(2))
    seed, eps = _seed(device), 1e-12
    inputs = (x, residual, bias, weight, ln_bias)
    as64 = [t.double() if t is not None else None for t in inputs]
    out, mean, rstd = add_layernorm_train(*inputs, eps, p, seed, out=_poison(x.shape, dtype, device))
    out64, mean64, rstd64 = reference.add_layernorm_train(*as64, eps, p, seed)
    peer = reference.add_layernorm_train(*inputs, eps, p, seed)
    assert_within_rule(out, out64, peer[0])
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (rows,)
    assert_within_rule(mean, mean64, peer[1], floor=FLOOR[dtype])
    assert_within_rule(rstd / rstd64, torch.ones_like(rstd64), peer[2] / rstd64, floor=FLOOR[dtype])  # relative
    if p:
        # The kernel drops the same elements: where the mask drops, dx is exactly zero.
        keep = reference.dropout_keep(seed, reference.row_dropout_counters(rows, hidden, device), p)
    grad = torch.randn(rows, hidden, device=device).to(dtype)
    got = add_layernorm_backward(grad, *inputs, mean, rstd, eps, p, seed)
    want = reference.add_layernorm_backward(grad.double(), *as64, mean64, rstd64, eps, p, seed)
    peers = reference.add_layernorm_backward(grad, *inputs, peer[1], peer[2], eps, p, seed)
    for name, a, b, c in zip(("dx", "dresidual", "dbias", "dweight", "dln_bias"), got, want, peers):
        if name == "dbias" and bias is None:
            assert a.shape == (0,)
            continue
        assert a.dtype == c.dtype, name
        # Column sums over every row: the peer (autograd in fp32, rounded once) and the kernel
        # (fp32 partial sums, rounded once) differ in order only; the floor scales with the rows.
        floor = FLOOR[dtype] * (rows**0.5 if name in ("dbias", "dweight", "dln_bias") else 1)
        try:
            assert_within_rule(a, b, c, floor=floor)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    if p:
        assert torch.equal(got[0] == 0, ~keep | (got[1] == 0))
    rerun = add_layernorm_backward(grad, *inputs, mean, rstd, eps, p, seed)
    assert all(torch.equal(a, b) for a, b in zip(got, rerun))


# ----------------------------------------------------------------------------- embed_layernorm


@pytest.mark.parametrize("p", [0.0, P], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", [(1, 7), (37, 100)])
def test_embed_layernorm_train_and_backward(device, dtype, tokens, hidden, p):
    _runnable(device, dtype)
    from fastbert.kernels import embed_layernorm_backward, embed_layernorm_train

    vocab, n_pos, types = 11, 9, 2  # few rows: ids repeat, so table rows sum several tokens
    ids = [torch.randint(0, n, (tokens,), device=device) for n in (vocab, n_pos, types)]
    ids[0][0] = 1  # the word padding row below
    tables = [torch.randn(n, hidden, device=device).to(dtype) for n in (vocab, n_pos, types)]
    weight, ln_bias = (torch.randn(hidden, device=device).to(dtype) for _ in range(2))
    seed, eps, pads = _seed(device), 1e-12, (1, -1)
    params = (*tables, weight, ln_bias)
    as64 = [t.double() for t in params]
    out, mean, rstd = embed_layernorm_train(*ids, *params, eps, p, seed, *pads,
                                            out=_poison((tokens, hidden), dtype, device))
    out64, mean64, rstd64 = reference.embed_layernorm_train(*ids, *as64, eps, p, seed, *pads)
    peer = reference.embed_layernorm_train(*ids, *params, eps, p, seed, *pads)
    assert_within_rule(out, out64, peer[0])
    assert_within_rule(mean, mean64, peer[1], floor=FLOOR[dtype])
    assert_within_rule(rstd / rstd64, torch.ones_like(rstd64), peer[2] / rstd64, floor=FLOOR[dtype])
    if p:
        offsets = reference.row_dropout_counters(tokens, hidden, device)
        assert torch.equal(out != 0, reference.dropout_keep(seed, offsets, p))
    grad = torch.randn(tokens, hidden, device=device).to(dtype)
    got = embed_layernorm_backward(grad, *ids, *params, mean, rstd, eps, p, seed, *pads)
    want = reference.embed_layernorm_backward(grad.double(), *ids, *as64, mean64, rstd64, eps, p, seed, *pads)
    peers = reference.embed_layernorm_backward(grad, *ids, *params, peer[1], peer[2], eps, p, seed, *pads)
    for name, a, b, c in zip(("dword", "dposition", "dtoken_type", "dweight", "dln_bias"), got, want, peers):
        assert a.dtype == c.dtype and a.shape == c.shape, name
        try:
            assert_within_rule(a, b, c, floor=FLOOR[dtype] * tokens**0.5)  # sums over tokens, as above
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert (got[0][1] == 0).all(), "the padding row got a gradient"


# ----------------------------------------------------------------------------- linear_gelu


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 16, 16), (37, 50, 70)])
def test_linear_gelu_train_and_backward(device, dtype, approximate, M, K, N):
    _runnable(device, dtype)
    from fastbert.kernels import linear_gelu_backward, linear_gelu_train

    x = torch.randn(M, K + 3, device=device).to(dtype)[:, :K]  # strided rows
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    out, pre = linear_gelu_train(x, weight, bias, approximate, out=_poison((M, N), dtype, device))
    out64, pre64 = reference.linear_gelu_train(x.double(), weight.double(), bias.double(), approximate)
    peer, peer_pre = reference.linear_gelu_train(x, weight, bias, approximate)
    assert_within_rule(out, out64, peer)
    assert_within_rule(pre, pre64, peer_pre)
    # The backward from the same saved pre-activation as the reference's, so only it is tested.
    grad = torch.randn(N, M, device=device).to(dtype).t()  # non-contiguous
    got = linear_gelu_backward(grad, x, weight, peer_pre, approximate)
    want = reference.linear_gelu_backward(grad.double(), x.double(), weight.double(), peer_pre.double(), approximate)
    peers = reference.linear_gelu_backward(grad, x, weight, peer_pre, approximate)
    for name, a, b, c in zip(("dx", "dweight", "dbias"), got, want, peers):
        assert a.dtype == c.dtype and a.shape == c.shape, name
        try:
            assert_within_rule(a, b, c)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_implements_leaves_fp32_gemm_ops_on_cuda():
    import fastbert.kernels as kernels

    for op in ("linear_gelu", "linear_gelu_train", "linear_gelu_backward"):
        assert not kernels.implements(op, "cuda", torch.float32)
        assert kernels.implements(op, "cuda", torch.float16) and kernels.implements(op, "cpu", torch.float32)
    assert kernels.implements("attention_backward", "cuda", torch.float32)
