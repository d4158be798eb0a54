"""The extension's CPU training kernels (the ``cpp`` backend) against the float64 references.

Every op is held to the accuracy rule of tolerance.py against the reference run on float64
copies of the same inputs, with the reference in the op's own dtype as the peer. Dropout is on
in most cases (p = 0.3): the kernels draw the reference's Philox mask, so outputs with dropout
are compared with reference outputs with the same dropout. The ops allocate their outputs, so
there is nothing to poison; every output is checked finite instead (unwritten memory would show
as NaN or garbage) and zero where it must be exactly zero. Results must not depend on the
thread count, nor change on a rerun.
"""

import os

import pytest
import torch

from fastbert import backends, declarations, reference
from relative_bias import columns_with_holes, table
from tolerance import assert_within_rule

if os.environ.get("FASTBERT_SKIP_EXT") == "1":
    pytest.skip("FASTBERT_SKIP_EXT=1: fastbert._C not built", allow_module_level=True)

from fastbert import _C, extension  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
P = 0.3
SEED = torch.tensor([0x5EED_1234_ABCD], dtype=torch.int64)


def _double(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def _check_all(ours, ref64, peer):
    for o, r, p in zip(ours, ref64, peer, strict=True):
        assert o.dtype == p.dtype, f"dtype {o.dtype} != the reference's {p.dtype}"
        assert_within_rule(o, r, p)


def _threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _same_on_rerun_and_threads(fn):
    """fn() gives bitwise the same tensors twice, and with 1 and 2 threads."""
    first = _threads(2, fn)
    for again in (_threads(2, fn), _threads(1, fn)):
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b), "results differ between runs or thread counts"


# ----------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63), -(2**62) + 987])
def test_philox_is_the_reference_stream_bit_for_bit(seed):
    seed = torch.tensor([seed], dtype=torch.int64)
    offsets = torch.cat([
        torch.arange(0, 1000),                                # vector runs and a scalar tail
        torch.arange(2**32 - 37, 2**32 + 41),                 # starting mid-call, into the high word
        torch.arange(2**34 - 64, 2**34 + 64),                 # calls 2**32 - 16 ...: a run carrying
        torch.arange(2**34 - 40, 2**34 + 88),                 # ... into the call counter's high word
        torch.arange(2**62 - 5, 2**62 + 300),
        torch.randint(0, 2**63 - 1, (517,)),                  # scattered: the scalar code
        torch.tensor([2**63 - 1, 2**31, 2**31 - 1]),
    ])
    expected = reference.philox_uniform(seed, offsets)
    for ours in (_C.cpu.philox_uniform(seed, offsets), torch.ops.fastbert.ext_philox_uniform(seed, offsets)):
        assert torch.equal(ours, expected)


# ----------------------------------------------------------------------------- attention


def _packed(lengths, heads, head_dim, dtype, dummy=0):
    """q, k, v as strided views of one [T, 3, N, D] projection, plus ``dummy`` rows past the last sequence."""
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]) + dummy, 3, heads, head_dim, dtype=dtype)
    return (*qkv.unbind(1), cu)


def _grad_like(q):
    """A non-contiguous gradient (a transposed [N, T, D] buffer) with q's shape."""
    T, N, D = q.shape
    return torch.randn(N, T, D, dtype=q.dtype).transpose(0, 1)


def _attention_backward64(grad, q, k, v, tail, bias64, rel, cols, p):
    """reference.attention_backward on float64 copies. With a relative bias it raises (it casts the
    table to float64, which its own check_rel_bias refuses), so the gradients come by autograd
    through reference.attention_train, the table kept float32 (its gradient is summed in float64
    and rounded once)."""
    as64 = [t.double() for t in (grad, q, k, v)]
    if rel is None:
        return reference.attention_backward(as64[0], *as64[1:], None, None, *tail, bias64, rel, cols, p, SEED)
    leaves = [t.requires_grad_() for t in as64[1:]] + [rel.detach().clone().requires_grad_()]
    out, _ = reference.attention_train(*leaves[:3], *tail, bias64, leaves[3], cols, p, SEED)
    dq, dk, dv, d_rel = torch.autograd.grad(out, leaves, as64[0])
    return torch.stack([dq, dk, dv], dim=1), d_rel


def _check_attention(q, k, v, cu, max_seqlen, causal, bias=None, rel=None, cols=None, p=P, dead_rows=()):
    """attention_train and attention_backward against the reference; returns (out, lse, dqkv, d_rel)."""
    scale = q.shape[-1] ** -0.5
    tail = (cu, max_seqlen, scale, causal)
    bias64 = None if bias is None else bias.double()
    real = int(cu[-1])
    # forward
    out, lse = extension.attention_train(q, k, v, *tail, bias, rel, cols, p, SEED)
    out64, lse64 = reference.attention_train(q.double(), k.double(), v.double(), *tail, bias64, rel, cols, p, SEED)
    peer_out, peer_lse = reference.attention_train(q, k, v, *tail, bias, rel, cols, p, SEED)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert_within_rule(out[:real], out64[:real], peer_out[:real])
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))
    infinite = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse), infinite) and (lse[infinite] > 0).all()
    assert infinite[:, real:].all()
    for row in dead_rows:
        assert infinite[:, row].all()
    assert_within_rule(lse[~infinite], lse64[~infinite], peer_lse[~infinite])
    # backward, from what the forward saved
    grad = _grad_like(q)
    dqkv, d_rel = extension.attention_backward(grad, q, k, v, out, lse, *tail, bias, rel, cols, p, SEED)
    dqkv64, d_rel64 = _attention_backward64(grad, q, k, v, tail, bias64, rel, cols, p)
    peer_dqkv, peer_d_rel = reference.attention_backward(grad, q, k, v, peer_out, peer_lse, *tail, bias, rel, cols,
                                                         p, SEED)
    assert dqkv.shape == (q.shape[0], 3, *q.shape[1:]) and dqkv.dtype == q.dtype
    for i in range(3):
        assert_within_rule(dqkv[:, i], dqkv64[:, i], peer_dqkv[:, i])
    assert torch.equal(dqkv[real:], torch.zeros_like(dqkv[real:])), "dummy rows get gradients"
    for row in dead_rows:
        assert torch.equal(dqkv[row, 0], torch.zeros_like(dqkv[row, 0])), "a row that sees no key gets dq"
    assert d_rel.dtype == torch.float32
    if rel is None:
        assert d_rel.shape == (0,)
    else:
        assert_within_rule(d_rel, d_rel64, peer_d_rel)
    return out, lse, dqkv, d_rel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("lengths,head_dim", [([1], 32), ([7, 0, 129, 1], 80), ([127, 64], 96), ([129, 7], 64),
                                              ([0], 32)])
def test_attention_train_and_backward(lengths, head_dim, p, causal, dtype):
    q, k, v, cu = _packed(lengths, 2, head_dim, dtype, dummy=3)
    _check_attention(q, k, v, cu, max(max(lengths), 1), causal, p=p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_additive_bias_with_dead_rows(dtype):
    # The padded path: an fp32 additive bias (no gradient), rows 5 of every sequence see no key.
    q, k, v, cu = _packed([70, 70, 70], 2, 64, dtype, dummy=2)
    bias = torch.randn(3, 1, 70, 70)
    bias[..., 5, :] = float("-inf")
    bias[..., 6, 10:] = float("-inf")
    _check_attention(q, k, v, cu, 70, False, bias=bias, dead_rows=[5, 75, 145])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("width", [1, 9, 257])
def test_attention_rel_bias(width, causal, dtype):
    lengths = [7, 0, 129, 1, 64]
    q, k, v, cu = _packed(lengths, 3, 32, dtype, dummy=4)
    rel = table(3, width)
    cols = torch.cat([columns_with_holes(lengths, holes=7),
                      torch.tensor([-(2**31), 2**31 - 1, 0, 5], dtype=torch.int32)])  # garbage on dummy rows
    _check_attention(q, k, v, cu, 129, causal, rel=rel, cols=cols)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_rel_bias_with_padded_bias_dead_and_dummy_rows(dtype):
    q, k, v, cu = _packed([70, 70], 2, 32, dtype, dummy=4)
    bias = torch.randn(2, 1, 70, 70)
    bias[1, :, 6, :] = float("-inf")  # row 76 sees no key
    bias[0, :, 9, 3:] = float("-inf")
    rel = table(5, 41)[1:4:2]  # a strided view, as the encoder's MPNet table
    cols = torch.cat([columns_with_holes([70, 70], holes=30), torch.tensor([-7, 2**31 - 1, 0, 5], dtype=torch.int32)])
    _check_attention(q, k, v, cu, 70, False, bias=bias, rel=rel, cols=cols, dead_rows=[76])


def test_attention_deterministic_across_runs_and_threads():
    lengths = [3, 200, 0, 17, 96, 1]
    q, k, v, cu = _packed(lengths, 3, 32, torch.float32, dummy=2)
    rel, cols = table(3, 33), torch.cat([columns_with_holes(lengths), torch.zeros(2, dtype=torch.int32)])
    tail = (cu, 200, 32**-0.5, False, None, rel, cols, P, SEED)
    grad = _grad_like(q)

    def run():
        out, lse = extension.attention_train(q, k, v, *tail)
        return (out, lse, *extension.attention_backward(grad, q, k, v, out, lse, *tail))

    _same_on_rerun_and_threads(run)


def test_attention_train_matches_the_inference_op_without_dropout():
    q, k, v, cu = _packed([7, 129, 1], 2, 64, torch.float32)
    args = (q, k, v, cu, 129, 0.125, True, None)
    out, _ = extension.attention_train(*args, None, None, 0.0, None)
    assert torch.equal(out, extension.attention(*args))


def test_attention_dropout_rejects_a_bad_seed():
    q, k, v, cu = _packed([5], 2, 16, torch.float32)
    with pytest.raises(ValueError, match="seed"):
        extension.attention_train(q, k, v, cu, 5, 0.25, False, None, None, None, 0.1, None)
    with pytest.raises(ValueError, match="dropout_p"):
        extension.attention_train(q, k, v, cu, 5, 0.25, False, None, None, None, 1.0, SEED)


# ----------------------------------------------------------------------------- linear + GELU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("tokens", [1, 7, 129])
@pytest.mark.parametrize("hidden,ffn", [(100, 300), (384, 1536)])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_linear_gelu_train_and_backward(tokens, hidden, ffn, approximate, dtype, grad_mode):
    # Without gradients the forward's GEMM is the inference one's (oneDNN, panels); with them ATen.
    new = dict(dtype=dtype)
    x = torch.randn(tokens, hidden, **new)
    weight = torch.randn(ffn, hidden, **new) / hidden**0.5
    bias = torch.randn(ffn, **new)
    args = (x, weight, bias, approximate)
    with torch.set_grad_enabled(grad_mode):
        ours = extension.linear_gelu_train(*args)
    _check_all(ours, reference.linear_gelu_train(*map(_double, args)), reference.linear_gelu_train(*args))
    grad = torch.randn(tokens, ffn, **new) * 2
    pre = reference.linear_gelu_train(*args)[1]
    bargs = (grad, x, weight, pre, approximate)
    _check_all(extension.linear_gelu_backward(*bargs), reference.linear_gelu_backward(*map(_double, bargs)),
               reference.linear_gelu_backward(*bargs))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_backward_over_the_whole_range(approximate):
    pre = torch.linspace(-30, 30, 7 * 1000).view(7, 1000)
    x, weight, grad = torch.randn(7, 50), torch.randn(1000, 50), torch.randn(7, 1000)
    args = (grad, x, weight, pre, approximate)
    _check_all(extension.linear_gelu_backward(*args), reference.linear_gelu_backward(*map(_double, args)),
               reference.linear_gelu_backward(*args))


def test_linear_gelu_backward_deterministic_across_runs_and_threads():
    # The fused GELU' pass and its bias gradient are ours; dx and dweight are ATen's GEMMs (MKL),
    # which are the same on a rerun but not necessarily across thread counts.
    x, weight, grad, pre = torch.randn(300, 64), torch.randn(1000, 64), torch.randn(300, 1000), torch.randn(300, 1000)
    _same_on_rerun_and_threads(lambda: extension.linear_gelu_backward(grad, x, weight, pre, "none")[2:])
    first = extension.linear_gelu_backward(grad, x, weight, pre, "tanh")
    assert all(torch.equal(a, b) for a, b in zip(first, extension.linear_gelu_backward(grad, x, weight, pre, "tanh")))


# ----------------------------------------------------------------------------- add + LayerNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tokens,hidden", [(1, 384), (7, 1002), (129, 768), (0, 384)])  # 1002: rows of 250.5 calls
def test_add_layernorm_train_and_backward(tokens, hidden, with_bias, p, dtype):
    new = dict(dtype=dtype)
    x, residual = torch.randn(tokens, hidden, **new), torch.randn(tokens, hidden, **new) * 3
    bias = torch.randn(hidden, **new) if with_bias else None
    weight, ln_bias = torch.randn(hidden, **new), torch.randn(hidden, **new)
    args = (x, residual, bias, weight, ln_bias, 1e-5, p, SEED)
    ours = extension.add_layernorm_train(*args)
    _check_all(ours, reference.add_layernorm_train(*map(_double, args)), reference.add_layernorm_train(*args))
    mean, rstd = reference.add_layernorm_train(*args)[1:]
    grad = torch.randn(tokens, hidden, **new)
    bargs = (grad, x, residual, bias, weight, ln_bias, mean, rstd, 1e-5, p, SEED)
    ours = extension.add_layernorm_backward(*bargs)
    ref64 = reference.add_layernorm_backward(*map(_double, bargs))
    peer = reference.add_layernorm_backward(*bargs)
    if not with_bias:
        assert ours[2].shape == (0,)
        ours, ref64, peer = [[t for i, t in enumerate(r) if i != 2] for r in (ours, ref64, peer)]
    _check_all(ours, ref64, peer)


def test_add_layernorm_backward_deterministic_across_runs_and_threads():
    x, residual, bias = torch.randn(300, 768), torch.randn(300, 768), torch.randn(768)
    weight, ln_bias = torch.randn(768), torch.randn(768)
    mean, rstd = reference.add_layernorm_train(x, residual, bias, weight, ln_bias, 1e-5, P, SEED)[1:]
    grad = torch.randn(300, 768)
    _same_on_rerun_and_threads(lambda: (
        *extension.add_layernorm_train(x, residual, bias, weight, ln_bias, 1e-5, P, SEED),
        *extension.add_layernorm_backward(grad, x, residual, bias, weight, ln_bias, mean, rstd, 1e-5, P, SEED)))


# ----------------------------------------------------------------------------- embeddings + LayerNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("tokens,hidden", [(1, 384), (7, 102), (129, 384)])
@pytest.mark.parametrize("padding", [(1, 0), (-1, -1)])
def test_embed_layernorm_train_and_backward(tokens, hidden, p, dtype, padding):
    new = dict(dtype=dtype)
    tables = [torch.randn(n, hidden, **new) for n in (50, 130, 2)]
    ids = [torch.randint(0, t.shape[0], (tokens,)) for t in tables]
    ids[0][0] = 1  # the word padding id appears: its row must still get no gradient
    weight, ln_bias = torch.randn(hidden, **new), torch.randn(hidden, **new)
    args = (*ids, *tables, weight, ln_bias, 1e-12, p, SEED, *padding)
    ours = extension.embed_layernorm_train(*args)
    _check_all(ours, reference.embed_layernorm_train(*map(_double, args)), reference.embed_layernorm_train(*args))
    mean, rstd = reference.embed_layernorm_train(*args)[1:]
    grad = torch.randn(tokens, hidden, **new)
    bargs = (grad, *ids, *tables, weight, ln_bias, mean, rstd, 1e-12, p, SEED, *padding)
    ours = extension.embed_layernorm_backward(*bargs)
    _check_all(ours, reference.embed_layernorm_backward(*map(_double, bargs)),
               reference.embed_layernorm_backward(*bargs))
    if padding[0] >= 0:
        assert torch.equal(ours[0][padding[0]], torch.zeros(hidden, **new))


def test_embed_layernorm_backward_deterministic_across_runs_and_threads():
    tables = [torch.randn(n, 384) for n in (50, 130, 2)]
    ids = [torch.randint(0, t.shape[0], (300,)) for t in tables]
    weight, ln_bias = torch.randn(384), torch.randn(384)
    mean, rstd = reference.embed_layernorm_train(*ids, *tables, weight, ln_bias, 1e-12, P, SEED, 0, -1)[1:]
    grad = torch.randn(300, 384)
    _same_on_rerun_and_threads(lambda: extension.embed_layernorm_backward(
        grad, *ids, *tables, weight, ln_bias, mean, rstd, 1e-12, P, SEED, 0, -1))


def test_no_training_op_on_cuda():
    for op in declarations.TRAINING_OPS:
        assert backends.implements("cpp", extension, op, "cpu", torch.float32)
        assert not backends.implements("cuda", extension, op, "cuda", torch.float32)
        assert not backends.implements("cuda", extension, op, "cuda", torch.bfloat16)
