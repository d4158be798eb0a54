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

from fastbert import reference
from fastbert.kernels import attention_backward, attention_train
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


# ----------------------------------------------------------------------------- attention


def _packed_qkv(lengths, heads, head_dim, dtype, device, dummies=0):
    """q, k, v: strided [T, N, D] views of one [T, 3, N, D] tensor; ``dummies`` rows past the end."""
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    qkv = torch.randn(sum(lengths) + dummies, 3, heads, head_dim, device=device).to(dtype)
    return (*qkv.unbind(1), cu_seqlens)


def _reference_backward64(grad, q, k, v, cu, max_seqlen, scale, causal, bias, rel_bias, positions, p, seed):
    """reference.attention_backward on float64 inputs. With rel_bias it refuses fp64 (it casts
    the table to fp64, which check_rel_bias rejects), so the table stays an fp32 leaf there:
    the gradient is summed in fp64 and rounded once to fp32."""
    as64 = [t.double() for t in (grad, q, k, v)]
    bias64 = None if bias is None else bias.double()
    if rel_bias is None:
        return reference.attention_backward(as64[0], *as64[1:], None, None, cu, max_seqlen, scale, causal, bias64,
                                            None, positions, p, seed)
    with torch.enable_grad():
        leaves = [t.requires_grad_() for t in as64[1:]]
        tab = rel_bias.detach().clone().requires_grad_()
        out, _ = reference._attention(*leaves, cu, max_seqlen, scale, causal, bias64, tab, positions, p, seed)
        grads = torch.autograd.grad(out, [*leaves, tab], as64[0])
    return torch.stack(grads[:3], 1), grads[3]


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
        # Each table entry sums dS over every row of a head, and each row's dS carries the
        # rounding of D = rowsum(dO * O) from the output saved in the input dtype (as in
        # FlashAttention; the reference recomputes it unrounded): independent per row, so the
        # floor grows with the square root of the rows.
        assert d_rel.dtype == torch.float32
        assert_within_rule(d_rel, d_rel64, peer_rel, floor=FLOOR[q.dtype] * real**0.5)
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
    q, k, v, cu = _packed_qkv(lengths, 2, head_dim, dtype, device)
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
