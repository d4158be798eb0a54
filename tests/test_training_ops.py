"""The training ops: autograd formulas, dropout, and every backend's backward against float64.

- ``gradcheck`` in float64 through the registered autograd (the custom ops of
  :mod:`fastbert.ops` on the torch backend) for every op, with dropout p = 0.3, rows that see no
  key, causal, an additive bias, a relative-bias table and dummy rows;
- ``opcheck`` of every training forward and backward op (schema, fake, autograd registration);
- every backend that runs here against the float64 reference under the accuracy rule, with the
  same dropout mask, and bitwise-identical gradients on a rerun;
- dropout statistics (keep rate within 4 sigma over 1e6 elements, mean preserved, masks differ
  across seeds) and the Philox stream's independence of how the work is split.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastbert import backends, declarations, ops, reference
from tolerance import assert_within_rule

SEED = torch.tensor([1234567], dtype=torch.int64)


def _cpu_backends() -> list[str]:
    """The backends that run the training ops on CPU tensors here (the plan's choices)."""
    found = {"torch"}
    for name in ("cpp", "triton"):
        try:
            module = backends.load(name, "cpu")
        except backends.BackendUnavailable:
            continue
        if all(hasattr(module, op) for op in declarations.TRAINING_OPS):
            found.add(name)
    return sorted(found)


def _packed(lengths, heads, head_dim, dtype=torch.float64, dummy=0, requires_grad=True):
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    qkv = torch.randn(sum(lengths) + dummy, 3, heads, head_dim, dtype=dtype)
    q, k, v = (t.clone().requires_grad_(requires_grad) for t in qkv.unbind(1))
    return q, k, v, cu


def _attention(backend="torch"):
    def run(q, k, v, cu, max_seqlen, causal, bias, rel_bias, positions, p, seed):
        return ops.attention_train(q, k, v, cu, max_seqlen, 0.5, causal, bias, rel_bias, positions, p, seed,
                                   backend, backend)[0]
    return run


# ----------------------------------------------------------------------------- gradcheck (torch backend)


@pytest.mark.parametrize("causal,p", [(False, 0.0), (True, 0.3)])
def test_attention_gradcheck(causal, p):
    q, k, v, cu = _packed([3, 0, 5, 1], heads=2, head_dim=4, dummy=2)
    table = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([0, 2, 3, 0, 1, 2, 5, 6, 0, 9, 9], dtype=torch.int32)  # holes, dummy rows
    run = _attention()
    torch.autograd.gradcheck(lambda q, k, v, t: run(q, k, v, cu, 5, causal, None, t, positions, p, SEED),
                             (q, k, v, table))


def test_attention_gradcheck_padded_bias_with_dead_rows():
    q, k, v, cu = _packed([4, 4], heads=2, head_dim=3)
    bias = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    bias[0, :, 1] = float("-inf")  # query row 1 of sequence 0 sees no key
    run = _attention()
    torch.autograd.gradcheck(lambda q, k, v: run(q, k, v, cu, 4, False, bias, None, None, 0.3, SEED), (q, k, v))
    out = run(q, k, v, cu, 4, False, bias, None, None, 0.3, SEED)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1] == 0).all() and (out[1] == 0).all()


def test_attention_bias_that_requires_grad_is_refused():
    q, k, v, cu = _packed([4], heads=1, head_dim=2)
    bias = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        _attention()(q, k, v, cu, 4, False, bias, None, None, 0.0, None)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_gradcheck(approximate):
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((5, 6), (7, 6), (7,)))
    torch.autograd.gradcheck(lambda x, w, b: ops.linear_gelu_train(x, w, b, approximate, "torch", "torch")[0],
                             (x, w, b))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_add_layernorm_gradcheck(p):
    x, res, b, w, lb = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                        for s in ((6, 10), (6, 10), (10,), (10,), (10,)))
    torch.autograd.gradcheck(
        lambda *t: ops.add_layernorm_train(*t, 1e-5, p, SEED, "torch", "torch")[0], (x, res, b, w, lb))


def _embedding_inputs(dtype=torch.float64):
    ids = torch.tensor([0, 3, 3, 1, 4, 0, 2])
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    types = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    tables = [torch.randn(n, 10, dtype=dtype, requires_grad=True) for n in (5, 4, 2)]
    ln = [torch.randn(10, dtype=dtype, requires_grad=True) for _ in range(2)]
    return ids, pos, types, tables, ln


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_embed_layernorm_gradcheck(p):
    ids, pos, types, tables, ln = _embedding_inputs()
    torch.autograd.gradcheck(
        lambda *t: ops.embed_layernorm_train(ids, pos, types, *t, 1e-5, p, SEED, -1, -1, "torch", "torch")[0],
        (*tables, *ln))


def test_embedding_padding_rows_get_no_gradient():
    ids, pos, types, tables, ln = _embedding_inputs()
    out = ops.embed_layernorm_train(ids, pos, types, *tables, *ln, 1e-5, 0.0, None, 0, 2, "torch", "torch")[0]
    grad = torch.randn_like(out)
    out.backward(grad)
    word, position = tables[0].grad.clone(), tables[1].grad.clone()
    for t in tables:
        t.grad = None
    ops.embed_layernorm_train(ids, pos, types, *tables, *ln, 1e-5, 0.0, None, -1, -1, "torch", "torch")[0].backward(grad)
    assert (word[0] == 0).all() and (position[2] == 0).all() and tables[0].grad[0].abs().sum() > 0
    torch.testing.assert_close(word[1:], tables[0].grad[1:], rtol=0, atol=0)
    torch.testing.assert_close(position[[0, 1, 3]], tables[1].grad[[0, 1, 3]], rtol=0, atol=0)


def test_pad_unpad_gradcheck():
    indices = torch.tensor([0, 1, 2, 4, 5])
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ops.unpad(x, indices, "torch"), (x,))
    packed = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ops.pad(x, indices, 2, 3, "torch"), (packed,))


# ----------------------------------------------------------------------------- opcheck


def _opcheck_cases(backend: str):
    dt = torch.float32
    q, k, v, cu = _packed([3, 5], heads=2, head_dim=8, dtype=dt, dummy=1)
    out, lse = reference.attention_train(q, k, v, cu, 5, 0.3, True, None, None, None, 0.2, SEED)
    x, res = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    ln_out, mean, rstd = reference.add_layernorm_train(x, res, b, w, b, 1e-5, 0.2, SEED)
    gw = torch.randn(24, 16, requires_grad=True)
    gb = torch.randn(24, requires_grad=True)
    _, pre = reference.linear_gelu_train(x, gw, gb, "none")
    ids, pos, types, tables, ln = _embedding_inputs(dt)
    e_out, e_mean, e_rstd = reference.embed_layernorm_train(ids, pos, types, *tables, *ln, 1e-5, 0.2, SEED, 0, -1)
    return [
        (ops.attention_train, (q, k, v, cu, 5, 0.3, True, None, None, None, 0.2, SEED, backend, backend)),
        (ops.attention_backward, (torch.randn_like(out), q, k, v, out, lse, cu, 5, 0.3, True, None, None, None, 0.2,
                                  SEED, backend)),
        (ops.add_layernorm_train, (x, res, b, w, b, 1e-5, 0.2, SEED, backend, backend)),
        (ops.add_layernorm_backward, (torch.randn_like(ln_out), x, res, b, w, b, mean, rstd, 1e-5, 0.2, SEED,
                                      backend)),
        (ops.linear_gelu_train, (x, gw, gb, "none", backend, backend)),
        (ops.linear_gelu_backward, (torch.randn(4, 24), x, gw, pre, "none", backend)),
        (ops.embed_layernorm_train, (ids, pos, types, *tables, *ln, 1e-5, 0.2, SEED, 0, -1, backend, backend)),
        (ops.embed_layernorm_backward, (torch.randn_like(e_out), ids, pos, types, *tables, *ln, e_mean, e_rstd, 1e-5,
                                        0.2, SEED, 0, -1, backend)),
    ]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("index", range(8))
def test_opcheck(backend, index):
    op, args = _opcheck_cases(backend)[index]
    if "backward" in op._name:  # no double backward: its inputs are constants
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_add_layernorm_train_on_nd_input(backend):
    """[B, S, H] input: mean and rstd are [B, S] on every backend and in the fake, and the
    backward takes them back."""
    x, res = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    args = (x, res, b, w, b, 1e-5, 0.2, SEED, backend, backend)
    torch.library.opcheck(ops.add_layernorm_train, args)
    out, mean, rstd = ops.add_layernorm_train(*args)
    assert mean.shape == rstd.shape == (2, 3)
    want = reference.add_layernorm_train(x.reshape(6, 16), res.reshape(6, 16), b, w, b, 1e-5, 0.2, SEED)
    torch.testing.assert_close(out, want[0].reshape(2, 3, 16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, want[1].reshape(2, 3), rtol=1e-5, atol=1e-5)
    backward = (torch.randn_like(out), x, res, b, w, b, mean, rstd, 1e-5, 0.2, SEED, backend)
    torch.library.opcheck(ops.add_layernorm_backward,
                          tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in backward))


# ----------------------------------------------------------------------------- every backend against float64


def _rule_check(ours, ref64, peer, name):
    ours, ref64, peer = ours.float(), ref64, peer
    try:
        assert_within_rule(ours.to(peer.dtype), ref64, peer)
    except AssertionError as exc:
        raise AssertionError(f"{name}: {exc}") from None


def _attention_against_float64(backend, q, k, v, args):
    """``backend``'s attention_train and attention_backward (a random incoming gradient) within
    the rule of the float64 reference; returns (out, lse, grad, dqkv, the reference's lse)."""
    impl = backends.implementation
    out, lse = impl("attention_train", backend, "cpu")(q, k, v, *args)
    grad = torch.randn_like(out)
    dqkv, _ = impl("attention_backward", backend, "cpu")(grad, q, k, v, out, lse, *args)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out64, lse64 = reference.attention_train(q64, k64, v64, *args)
    ref64, _ = reference.attention_backward(grad.double(), q64, k64, v64, out64, lse64, *args)
    peer_out, peer_lse = reference.attention_train(q, k, v, *args)
    peer, _ = reference.attention_backward(grad, q, k, v, peer_out, peer_lse, *args)
    _rule_check(out, out64, peer_out, "out")
    _rule_check(dqkv, ref64, peer, "dqkv")
    return out, lse, grad, dqkv, lse64


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_of_every_backend(backend, causal):
    lengths, heads, head_dim, p = [7, 1, 0, 33], 2, 32, 0.3
    q, k, v, cu = _packed(lengths, heads, head_dim, dtype=torch.float32, dummy=3, requires_grad=False)
    args = (cu, max(lengths), head_dim ** -0.5, causal, None, None, None, p, SEED)
    out, lse, grad, dqkv, lse64 = _attention_against_float64(backend, q, k, v, args)
    impl = backends.implementation
    real = int(cu[-1])
    assert (dqkv[real:] == 0).all(), "dummy rows must get zero gradients"
    assert torch.isinf(lse[:, real:]).all() and torch.allclose(lse[:, :real].double(), lse64[:, :real], atol=1e-4)
    again, _ = impl("attention_backward", backend, "cpu")(grad, q, k, v, out, lse, *args)
    assert torch.equal(again, dqkv), "a rerun must give bitwise-identical gradients"


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_of_rows_masked_by_a_finite_minimum(backend, causal):
    """Hugging Face masks with finfo(float32).min: a row whose keys all carry it attends
    uniformly (each probability 1/n), and its lse, min + log n, rounds to min in fp32. A
    backward recomputing P = exp(S - lse) from that lse sees 1 instead of 1/n (dq n times too
    large); the gradients must match float64 (lse itself is not compared on those rows)."""
    seqlen, heads, head_dim = 8, 2, 16
    q, k, v, cu = _packed([seqlen, seqlen], heads, head_dim, dtype=torch.float32, requires_grad=False)
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(2, heads, seqlen, seqlen)
    bias[:, :, :, -3:] = low
    bias[1, 0, 5] = low  # every key masked
    bias[0, 1, 6, :5] = low / 2  # every visible key at a finite minimum, above the masked ones
    _attention_against_float64(backend, q, k, v, (cu, seqlen, head_dim ** -0.5, causal, bias, None, None, 0.3, SEED))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_layernorm_and_gelu_backward_of_every_backend(backend):
    impl = backends.implementation
    T, H = 37, 48
    x, res = torch.randn(T, H), torch.randn(T, H)
    b, w, lb = torch.randn(H), torch.randn(H), torch.randn(H)
    out, mean, rstd = impl("add_layernorm_train", backend, "cpu")(x, res, b, w, lb, 1e-5, 0.3, SEED)
    grad = torch.randn_like(out)
    got = impl("add_layernorm_backward", backend, "cpu")(grad, x, res, b, w, lb, mean, rstd, 1e-5, 0.3, SEED)
    as64 = [t.double() for t in (x, res, b, w, lb)]
    out64, mean64, rstd64 = reference.add_layernorm_train(*as64, 1e-5, 0.3, SEED)
    ref = reference.add_layernorm_backward(grad.double(), *as64, mean64, rstd64, 1e-5, 0.3, SEED)
    peer = reference.add_layernorm_backward(grad, x, res, b, w, lb, mean, rstd, 1e-5, 0.3, SEED)
    _rule_check(out, out64, reference.add_layernorm_train(x, res, b, w, lb, 1e-5, 0.3, SEED)[0], "add_layernorm")
    for name, ours, r, pr in zip(("dx", "dresidual", "dbias", "dweight", "dln_bias"), got, ref, peer):
        _rule_check(ours, r, pr, name)

    xg, wg, bg = torch.randn(T, H), torch.randn(80, H) / math.sqrt(H), torch.randn(80)
    for approximate in ("none", "tanh"):
        y, pre = impl("linear_gelu_train", backend, "cpu")(xg, wg, bg, approximate)
        g = torch.randn_like(y)
        got = impl("linear_gelu_backward", backend, "cpu")(g, xg, wg, pre, approximate)
        x64, w64, b64 = xg.double(), wg.double(), bg.double()
        ref = reference.linear_gelu_backward(g.double(), x64, w64, reference.linear_gelu_train(x64, w64, b64,
                                                                                               approximate)[1],
                                             approximate)
        peer = reference.linear_gelu_backward(g, xg, wg, reference.linear_gelu_train(xg, wg, bg, approximate)[1],
                                              approximate)
        for name, ours, r, pr in zip(("dx", "dweight", "dbias"), got, ref, peer):
            _rule_check(ours, r, pr, f"linear_gelu {approximate} {name}")


# ----------------------------------------------------------------------------- dropout


def test_dropout_statistics():
    n, p = 1_000_000, 0.3
    offsets = torch.arange(n) * 7919 + (5 << 32)
    keep = reference.dropout_keep(SEED, offsets, p)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) < 4 * sigma
    x = torch.ones(1000, 1000, dtype=torch.float64)
    out = reference._row_dropout(x, p, SEED)
    assert abs(out.mean().item() - 1.0) < 4 * math.sqrt(p / (1 - p) / n)  # E[out] = in
    assert set(out.unique().tolist()) == {0.0, 1 / (1 - p)}
    other = reference.dropout_keep(torch.tensor([SEED.item() + 1]), offsets, p)
    assert (keep != other).float().mean() > 0.3  # independent masks differ in ~2p(1-p) = 42 %


def test_attention_dropout_mask_is_the_reference_counter():
    """The mask the attention applies is dropout_keep at ((head·T + row) << 32) | key (a ones-V probe
    with one key per sequence reads the mask off the output)."""
    lengths, heads = [1, 1, 1], 3
    q, k, v, cu = _packed(lengths, heads, 1, requires_grad=False)
    v = torch.ones_like(v)
    out = reference.attention_train(q, k, v, cu, 1, 1.0, False, None, None, None, 0.5, SEED)[0]
    T = q.shape[0]
    offsets = (torch.arange(heads)[None, :] * T + torch.arange(T)[:, None]) << 32  # key index 0
    assert torch.equal(out[..., 0] != 0, reference.dropout_keep(SEED, offsets, 0.5))
