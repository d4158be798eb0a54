"""The extension's CPU kernels (the ``cpp`` backend) against the references, by the accuracy rule.

Ops that also have a CUDA kernel (all but attention) run the same tests on CUDA where a GPU is
present (the ``device`` fixture); there a build without CUDA fails rather than skips. Needs ``fastbert._C`` built (``python setup.py build_ext --inplace``); the module is skipped only
when the build was switched off with FASTBERT_SKIP_EXT=1, so a failed build shows as an error.
"""

import os

import pytest
import torch

from fastbert import backends, declarations, reference
from relative_bias import bad_arguments, columns_with_holes, table
from tolerance import assert_within_rule

# Slow, out of the fast loop (pytest -m "not slow"):
# every C++ CPU kernel over the full grid of shapes and dtypes (minutes).
pytestmark = pytest.mark.slow

if os.environ.get("FASTBERT_SKIP_EXT") == "1":
    pytest.skip("FASTBERT_SKIP_EXT=1: fastbert._C not built", allow_module_level=True)

from fastbert import extension  # noqa: E402  (an ImportError here means the extension is not built)

DTYPES = [torch.float32, torch.bfloat16]
HIDDEN = [384, 768, 1024, 1000]
TOKENS = [1, 7, 129]


@pytest.fixture
def kernel_device(device):
    """``device`` (conftest: cpu, and cuda where present), failing when the build lacks CUDA."""
    if device == "cuda" and not extension.WITH_CUDA:
        pytest.fail("torch has CUDA but fastbert._C was built without it (see setup.py)")
    return device


def _check(ours, fn, *args):
    """Rule check of ``ours`` against ``fn`` in float64 (ref) and in ``ours``' dtype (peer)."""
    ref64 = fn(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
    peer = fn(*args)
    assert_within_rule(ours, ref64, peer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layernorm(tokens, hidden, dtype, with_bias, kernel_device):
    new = dict(dtype=dtype, device=kernel_device)
    x, residual = torch.randn(tokens, hidden, **new), torch.randn(tokens, hidden, **new) * 3
    bias = torch.randn(hidden, **new) if with_bias else None
    weight, ln_bias = torch.randn(hidden, **new), torch.randn(hidden, **new)
    args = (x, residual, bias, weight, ln_bias, 1e-12)
    _check(extension.add_layernorm(*args), reference.add_layernorm, *args)


@pytest.mark.parametrize("offset", [1e3, -3e4])
def test_add_layernorm_rows_far_from_zero(offset, kernel_device):
    # mean >> std, and an outlier in the first columns: a one-pass E[h^2] - E[h]^2 variance
    # cancels to noise here; the kernels' shifted sums must not.
    new = dict(device=kernel_device)
    x, residual = torch.randn(64, 768, **new) + offset, torch.randn(64, 768, **new)
    x[:, 3] += 25
    weight, ln_bias = torch.randn(768, **new), torch.randn(768, **new)
    args = (x, residual, None, weight, ln_bias, 1e-12)
    _check(extension.add_layernorm(*args), reference.add_layernorm, *args)


def test_add_layernorm_strided_input(kernel_device):
    x = torch.randn(768, 129, device=kernel_device).t()  # non-contiguous [129, 768]
    residual = torch.randn(129, 768, device=kernel_device)
    weight, ln_bias = torch.randn(768, device=kernel_device), torch.randn(768, device=kernel_device)
    args = (x, residual, None, weight, ln_bias, 1e-5)
    _check(extension.add_layernorm(*args), reference.add_layernorm, *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden,ffn", [(384, 1536), (1000, 1000), (768, 3072)])
def test_linear_gelu(tokens, hidden, ffn, approximate, dtype, kernel_device):
    new = dict(dtype=dtype, device=kernel_device)
    x = torch.randn(tokens, hidden, **new)
    weight = torch.randn(ffn, hidden, **new) / hidden**0.5
    bias = torch.randn(ffn, **new)
    args = (x, weight, bias, approximate)
    _check(extension.linear_gelu(*args), reference.linear_gelu, *args)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_in_place_over_the_whole_range(approximate, kernel_device):
    # Large |x| included: the tanh form must neither overflow nor give NaN there.
    y = torch.linspace(-30, 30, 7 * 1000, device=kernel_device).view(7, 1000)
    bias = torch.randn(1000, device=kernel_device)
    expected = reference.gelu((y + bias).double(), approximate)
    peer = reference.gelu(y + bias, approximate)
    torch.ops.fastbert.ext_bias_gelu_(y, bias, approximate)
    assert_within_rule(y, expected, peer)


def _packed(lengths, heads, head_dim, dtype):
    """q, k, v as strided views of one [T, 3, N, D] projection, as the encoder produces them."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, heads, head_dim, dtype=dtype)
    return (*qkv.unbind(1), cu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[1], [7], [129], [7, 0, 129, 1], [64, 65, 33]])
@pytest.mark.parametrize("head_dim", [16, 32, 40, 64, 80, 96, 128])
def test_attention(lengths, head_dim, causal, dtype):
    q, k, v, cu = _packed(lengths, 2, head_dim, dtype)
    args = (q, k, v, cu, max(lengths), head_dim**-0.5, causal, None)
    _check(extension.attention(*args), reference.attention, *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [(3, 1, 70, 70), (1, 2, 70, 70), (70, 70)])
def test_attention_additive_bias(bias_shape, dtype):
    # The padded path: every sequence has max_seqlen tokens, the mask is an additive bias
    # (fp32 whatever the model's dtype, as a user's float mask may be).
    q, k, v, cu = _packed([70, 70, 70], 2, 64, dtype)
    bias = torch.randn(bias_shape)
    bias[..., 5, :] = float("-inf")  # a query row with every key masked gives zeros
    bias[..., 6, 10:] = float("-inf")
    args = (q, k, v, cu, 70, 0.125, False, bias)
    out = extension.attention(*args)
    _check(out, reference.attention, *args)
    assert out.view(3, 70, 2, 64)[:, 5].abs().max() == 0


def _check_attention_rel_bias(attention, q, k, v, cu, max_seqlen, causal, bias, rel_bias, positions, real):
    """Rule check of ``attention`` (with the relative bias) on the first ``real`` rows."""
    args = (q, k, v, cu, max_seqlen, q.shape[-1] ** -0.5, causal)
    out = attention(*args, bias, rel_bias, positions)
    as64 = [t.double() for t in (q, k, v)]
    bias64 = None if bias is None else bias.double()
    ref64 = reference.attention(*as64, *args[3:], bias64, rel_bias, positions)
    peer = reference.attention(*args, bias, rel_bias, positions)
    assert_within_rule(out[:real], ref64[:real], peer[:real])


# The registered op (what autograd and torch.compile see) and the direct call of the eager path.
ATTENTION_ENTRIES = {"registered": lambda *args: extension.attention(*args),
                     "direct": lambda *args: extension.function("attention", "cpu", True)(*args)}


@pytest.mark.parametrize("entry", ATTENTION_ENTRIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("width", [1, 9, 257])
@pytest.mark.parametrize("lengths", [[1], [7, 0, 129, 1], [127, 64, 300]])
def test_attention_rel_bias(lengths, width, causal, dtype, entry):
    q, k, v, cu = _packed(lengths, 3, 64, dtype)
    rel, cols = table(3, width), columns_with_holes(lengths, holes=7)
    _check_attention_rel_bias(ATTENTION_ENTRIES[entry], q, k, v, cu, max(lengths), causal, None, rel, cols, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_rel_bias_with_padded_bias_and_dummy_rows(causal, dtype):
    # The padded path's bias on top, a table that is a strided view, and dummy rows past the
    # last sequence (a static packing's) whose columns are garbage: the real rows stay exact.
    q, k, v, cu = _packed([70, 70, 4], 2, 32, dtype)
    cu = cu[:-1]
    bias = torch.randn(2, 1, 70, 70)
    bias[1, :, 6, 10:] = float("-inf")
    rel = table(5, 41)[1:4:2]  # rows 1 and 3: [2, 41], head stride 2 x 41
    cols = torch.cat([columns_with_holes([70, 70], holes=30),
                      torch.tensor([-(2**31), 2**31 - 1, 0, 5], dtype=torch.int32)])
    _check_attention_rel_bias(extension.attention, q, k, v, cu, 70, causal, bias, rel, cols, 140)


@pytest.mark.parametrize("entry", ATTENTION_ENTRIES)
def test_attention_rel_bias_rejects_bad_arguments(entry):
    q, k, v, cu = _packed([5, 3], 2, 16, torch.float32)
    for kwargs, error, match in bad_arguments(q):
        if entry == "registered" and any(t is not None and t.device != q.device for t in kwargs.values()):
            # The dispatcher picks the kernel by the tensors' devices: there is none for a
            # tensor on another device, and it says so, naming the op.
            error, match = NotImplementedError, "ext_attention"
        with pytest.raises(error, match=match):
            ATTENTION_ENTRIES[entry](q, k, v, cu, 5, 0.25, False, None, kwargs["rel_bias"], kwargs["positions"])


@pytest.mark.parametrize("threads", [1, 3, 7])
def test_attention_work_split_across_threads(threads):
    # The query blocks are shared out by cost, so a thread's share can start or end inside a
    # (sequence, head): every split must still cover each block exactly once.
    q, k, v, cu = _packed([3, 200, 0, 17, 96, 1], 3, 32, torch.float32)
    args = (q, k, v, cu, 200, 32**-0.5, False, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = extension.attention(*args)
    finally:
        torch.set_num_threads(before)
    _check(out, reference.attention, *args)


def test_attention_rejects_a_sequence_longer_than_max_seqlen():
    q, k, v, cu = _packed([10, 20], 2, 32, torch.float32)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        extension.attention(q, k, v, cu, 15, 1.0, False, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [384, 1000])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_embed_layernorm(tokens, hidden, dtype, id_dtype, kernel_device):
    new = dict(dtype=dtype, device=kernel_device)
    tables = [torch.randn(n, hidden, **new) for n in (50, 130, 2)]
    ids = [torch.randint(0, t.shape[0], (tokens,), dtype=id_dtype, device=kernel_device) for t in tables]
    weight, ln_bias = torch.randn(hidden, **new), torch.randn(hidden, **new)
    args = (ids[0], ids[1], ids[2], *tables, weight, ln_bias, 1e-12)
    _check(extension.embed_layernorm(*args), reference.embed_layernorm, *args)


def test_embed_layernorm_rejects_out_of_range_ids():
    tables = [torch.randn(n, 8) for n in (50, 130, 2)]
    ids = torch.tensor([0, 50])
    zeros = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="input id 50"):
        extension.embed_layernorm(ids, zeros, zeros, *tables, torch.ones(8), torch.zeros(8), 1e-12)


@pytest.mark.parametrize("trailing", [(), (1000,), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_unpad_and_pad(trailing, dtype, kernel_device):
    lengths = torch.tensor([7, 0, 129, 1], device=kernel_device)
    batch, seqlen = len(lengths), 130
    valid = torch.arange(seqlen, device=kernel_device)[None, :] < lengths[:, None]
    indices = valid.flatten().nonzero().flatten()
    x = (torch.randn(batch, seqlen, *trailing, device=kernel_device) * 100).to(dtype)
    packed = extension.unpad(x, indices)
    assert torch.equal(packed, reference.unpad(x, indices))
    padded = extension.pad(packed, indices, batch, seqlen)
    assert torch.equal(padded, reference.pad(packed, indices, batch, seqlen))  # pad positions exactly 0


def test_cpu_plan_uses_the_extension_for_every_op():
    assert extension.unavailable_reason("cpu") is None
    plan = backends.plan(torch.device("cpu"), "cpp")
    assert plan == {op: "cpp" for op in declarations.NAMES}


def test_cuda_plan_has_no_extension_attention():
    assert not backends.implements("cuda", extension, "attention", "cuda")
    assert all(backends.implements("cpp", extension, op, "cpu") for op in declarations.NAMES)
    if not extension.WITH_CUDA:
        assert extension.unavailable_reason("cuda") == "fastbert._C was built without CUDA"
