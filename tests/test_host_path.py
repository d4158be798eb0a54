"""The host side of a forward: one readback, no syncs in the layers, the static (bucketed) path.

On a GPU every device-to-host transfer stalls the host until the queue drains, so a forward may
make one, before the first layer. On CPU the profiler still sees the ops that would sync
(``aten::_local_scalar_dense`` behind ``.item()``/``int(t)``, ``aten::nonzero``); the one
intended readback (``fastbert.encoder.readback``, a ``.tolist()``) is counted by wrapping it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch
from torch.profiler import profile

import fastbert
from fastbert import encoder, graphs, ops

transformers = pytest.importorskip("transformers")

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")


def small_model(layers=2, hidden=64, heads=2, **config):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=3 * hidden + 5,
                                  max_position_embeddings=160, type_vocab_size=3, **config)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def tokenizer_batch(lengths, seqlen, left=False):
    """What a tokenizer returns: int64 ids, a 0/1 int64 mask and token types."""
    ids = torch.randint(1, 99, (len(lengths), seqlen))
    cols = torch.arange(seqlen)
    lengths = torch.tensor(lengths)[:, None]
    mask = (cols >= seqlen - lengths) if left else (cols < lengths)
    types = (cols >= seqlen // 2).long().expand(len(lengths), seqlen) * mask
    return ids, mask.long(), types


class Readbacks:
    """Counts calls of the forward's one intended readback."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = encoder.readback

        def counted(values):
            self.count += 1
            return original(values)

        monkeypatch.setattr(encoder, "readback", counted)


def sync_ops(fn) -> dict[str, int]:
    with profile() as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {name: names.count(name) for name in (*SYNC_OPS, "aten::_assert_async")}


@pytest.mark.parametrize("mask_kind", ["2d", "4d", "none"])
def test_a_forward_reads_back_once(monkeypatch, mask_kind):
    model = fastbert.optimize(small_model(layers=3))
    ids, mask, types = tokenizer_batch([7, 23, 1], 23)
    if mask_kind == "4d":
        mask = mask.bool()[:, None, None, :].expand(3, 1, 23, 23)
    elif mask_kind == "none":
        mask = None
    readbacks = Readbacks(monkeypatch)
    with torch.no_grad():
        counts = sync_ops(lambda: model(input_ids=ids, attention_mask=mask, token_type_ids=types))
    assert readbacks.count == 1
    assert counts == {**dict.fromkeys(SYNC_OPS, 0), "aten::_assert_async": 0}


def test_static_path_reads_nothing_back(monkeypatch):
    model = small_model()
    ids, mask, types = tokenizer_batch([7, 23, 1], 23)
    readbacks = Readbacks(monkeypatch)
    with torch.no_grad():
        counts = sync_ops(lambda: encoder.encode(model, ids, mask, types, token_capacity=40))
    assert readbacks.count == 0
    # On CPU an async assert reads its flag (one _local_scalar_dense each); on a GPU it does not.
    assert counts["aten::_assert_async"] >= 2  # ids, token types (and the mask's values)
    assert counts["aten::_local_scalar_dense"] == counts["aten::item"] == counts["aten::_assert_async"]
    assert counts["aten::nonzero"] == 0


@pytest.mark.parametrize("bad", ["input_ids", "token_type_ids", "attention_mask"])
def test_static_path_still_rejects_bad_input(bad):
    model = small_model()
    ids, mask, types = tokenizer_batch([7, 23, 1], 23)
    {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}[bad][1, 3] = 99 if bad != "attention_mask" else 2
    with torch.no_grad(), pytest.raises(RuntimeError, match=bad):
        encoder.encode(model, ids, mask, types, token_capacity=40)


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_static_path_matches_exact_packing(backend):
    model = small_model(layers=3 if backend != "triton" else 2)
    ids, mask, types = tokenizer_batch([7, 23, 0, 1], 23)
    with torch.no_grad():
        exact, exact_states = encoder.encode(model, ids, mask, types, backend=backend,
                                             output_hidden_states=True)
        for rows in (31, 64, 4 * 23):  # 31 valid tokens: no dummy row, then some, then all positions
            static, states = encoder.encode(model, ids, mask, types, backend=backend,
                                            output_hidden_states=True, token_capacity=rows)
            torch.testing.assert_close(static, exact, rtol=0, atol=1e-5)
            for a, b in zip(states, exact_states, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert torch.all(static[mask == 0] == 0)


@pytest.mark.parametrize("tokens,rows", [(1, 64), (64, 64), (65, 128), (300, 320), (3000, 3072), (5000, 5120)])
def test_token_buckets(tokens, rows):
    assert graphs.token_bucket(tokens) == rows
    assert (rows - tokens) <= max(64, rows // 4)


def test_shape_buckets_stay_within_the_position_table():
    assert graphs.shape_bucket(3, 100, 50, 512) == (4, 128, 64)
    assert graphs.shape_bucket(3, 129, 300, 160) == (4, 160, 320)
    assert graphs.shape_bucket(1, 16, 16, 512) == (1, 16, 16)  # never more rows than positions


def test_bucketed_model_matches_eager_model():
    """cuda_graphs=True on CPU tensors runs the bucketed path without capture: same outputs."""
    eager = fastbert.optimize(small_model(layers=3))
    bucketed = fastbert.optimize(copy.deepcopy(eager), cuda_graphs=True, max_graphs=2)
    runner = bucketed._fastbert.graphs
    cases = [([5, 17, 3], 17, False), ([1], 9, False), ([30, 2, 0, 30, 11], 30, True), ([5, 17, 3], 17, True)]
    with torch.no_grad():
        for lengths, seqlen, left in cases:
            ids, mask, types = tokenizer_batch(lengths, seqlen, left)
            want = eager(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
            got = bucketed(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
            assert got.last_hidden_state.shape == want.last_hidden_state.shape
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
            for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert len(runner.graphs) <= 2  # max_graphs: the least recently used bucket went
        # A weight update must reach the bucketed path too (on a GPU: the graphs are recaptured).
        for model in (eager, bucketed):
            model.encoder.layer[1].attention.self.value.weight.mul_(1.5)
        ids, mask, types = tokenizer_batch([5, 17, 3], 17)
        want = eager(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = bucketed(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_replaced_parameter_is_used():
    """The cached weight view is rebuilt when a parameter object is replaced."""
    reference = small_model()
    model = fastbert.optimize(copy.deepcopy(reference))
    ids, mask, types = tokenizer_batch([5, 9], 9)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # builds the view
        for m in (reference, model):
            dense = m.encoder.layer[0].output.dense
            dense.weight = torch.nn.Parameter(torch.ones_like(dense.weight) * 0.01)
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max() <= 1e-4


def test_kernels_skip_the_dispatcher_only_without_gradients():
    from fastbert import backends, extension

    cpu = torch.device("cpu")
    with torch.no_grad():
        assert ops.kernels(cpu, torch.float32, "cpp").attention is extension._C.cpu.attention
    assert ops.kernels(cpu, torch.float32, "cpp").attention is torch.ops.fastbert.ext_attention.default
    # With gradients on, the training ops run (the custom ops with their autograd) and the
    # encoder's weights get gradients.
    model = fastbert.optimize(small_model(), backend="cpp")
    ids, mask, types = tokenizer_batch([5, 9], 9)
    model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_autocast_to_another_dtype_runs_the_original_forward():
    reference = small_model()
    model = fastbert.optimize(copy.deepcopy(reference))
    ids, mask, types = tokenizer_batch([5, 9], 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match=r"autocast to torch.bfloat16 over torch.float32 weights"):
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want)


def test_compiled_graph_can_be_captured_by_cuda_graphs():
    """torch.compile(mode="reduce-overhead") needs a graph with no data-dependent size or sync."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    traced = []

    def keep(gm, example_inputs):
        traced.append(gm)
        return gm

    model = fastbert.optimize(small_model())
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep), fullgraph=True)
    ids, mask, types = tokenizer_batch([5, 9, 2], 9)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(traced) == 1
    assert get_first_incompatible_cudagraph_node(traced[0]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layers_never_sync(monkeypatch):
    """After the one readback, any synchronising call in the forward fails the test."""
    model = fastbert.optimize(small_model(layers=3).cuda())
    ids, mask, types = (t.cuda() for t in tokenizer_batch([7, 23, 1], 23))
    original = encoder.readback

    def then_forbid(values):
        result = original(values)
        torch.cuda.set_sync_debug_mode("error")
        return result

    monkeypatch.setattr(encoder, "readback", then_forbid)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_graphs_capture_and_replay(dtype):
    eager = fastbert.optimize(small_model(layers=3).cuda().to(dtype))
    graphed = fastbert.optimize(copy.deepcopy(eager), cuda_graphs=True)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.no_grad():
        for lengths, seqlen in (([5, 17, 3], 17), ([1], 9), ([5, 17, 3], 17), ([30, 2, 9, 30, 11], 30)):
            ids, mask, types = (t.cuda() for t in tokenizer_batch(lengths, seqlen))
            want = eager(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            got = graphed(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            torch.testing.assert_close(got, want, rtol=0, atol=atol)
        assert all(g.graph is not None for g in graphed._fastbert.graphs.graphs.values())
        graphed.encoder.layer[0].attention.self.query.weight.mul_(2)  # must be seen: recapture
        eager.encoder.layer[0].attention.self.query.weight.mul_(2)
        ids, mask, types = (t.cuda() for t in tokenizer_batch([5, 17, 3], 17))
        want = eager(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = graphed(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("first, then", [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)],
                         ids=["inference_mode-then-no_grad", "no_grad-then-inference_mode"])
def test_graph_buffers_serve_inference_mode_and_no_grad_in_either_order(device, first, then):
    """sentence-transformers encodes under inference_mode: a bucket's input buffers made there
    must still take a later no_grad call's inputs (inference tensors refuse in-place updates
    outside inference mode), and the reverse."""
    eager = fastbert.optimize(small_model().to(device))
    graphed = fastbert.optimize(copy.deepcopy(eager), cuda_graphs=True)
    ids, mask, types = (t.to(device) for t in tokenizer_batch([5, 9, 2], 9))
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    for mode in (first, then):
        with mode():
            got = graphed(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(graphed._fastbert.graphs.graphs) == 1  # both calls ran in the same bucket


class FakeCapture:
    """torch.cuda's streams, device context and graphs on a CPU machine, recording the device each
    call names and the device current at capture and replay (the process's current GPU is
    ``cuda:0``; the model is elsewhere). Replays do not recompute: outputs are not checked."""

    def __init__(self, monkeypatch):
        self.current = torch.device("cuda", 0)
        self.calls = []
        fake = self

        @contextlib.contextmanager
        def device(d):
            fake.calls.append(("device", torch.device(d)))
            previous, fake.current = fake.current, torch.device(d)
            try:
                yield
            finally:
                fake.current = previous

        class Stream:
            def __init__(self, device=None):
                self.device = fake.current if device is None else torch.device(device)
                fake.calls.append(("stream", self.device))

            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def replay(self):
                fake.calls.append(("replay", fake.current))

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None):
            fake.calls.append(("capture", fake.current, None if stream is None else stream.device))
            yield

        monkeypatch.setattr(graphs, "captures", lambda device: True)
        for name, value in dict(device=device, Stream=Stream, current_stream=Stream, CUDAGraph=CUDAGraph,
                                graph=graph, stream=lambda s: contextlib.nullcontext(),
                                graph_pool_handle=lambda: None).items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the triton backend on CPU needs the interpreter")
def test_capture_and_replay_run_on_the_models_device(monkeypatch):
    """Multi-GPU: capture and replay on the model's device and its streams, not the current GPU."""
    model = fastbert.optimize(small_model(), backend="triton", cuda_graphs=True)
    fake = FakeCapture(monkeypatch)
    ids, mask, types = tokenizer_batch([5, 9], 9)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    home = ids.device
    kinds = [call[0] for call in fake.calls]
    assert "capture" in kinds and "replay" in kinds
    for call in fake.calls:
        assert all(d == home for d in call[1:]), call


@pytest.mark.parametrize("backend", [None, "cpp", "torch"])
def test_cuda_graphs_without_triton_attention_run_eagerly_with_one_warning(monkeypatch, backend):
    """Only Triton's attention can be captured: elsewhere the calls run eagerly, warned once."""
    monkeypatch.setattr(graphs, "_warned", set())
    eager = fastbert.optimize(small_model(), backend=backend)
    graphed = fastbert.optimize(copy.deepcopy(eager), backend=backend, cuda_graphs=True)
    fake = FakeCapture(monkeypatch)
    with torch.no_grad():
        for lengths, seqlen in (([5, 9], 9), ([3], 4)):
            ids, mask, types = tokenizer_batch(lengths, seqlen)
            want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = graphed(input_ids=ids, attention_mask=mask).last_hidden_state
            messages = [str(w.message) for w in caught]
            if lengths == [5, 9]:
                assert len(messages) == 1 and "cuda_graphs=True needs attention on the triton backend" in messages[0]
                assert f"backend={backend!r}" in messages[0]
            else:
                assert messages == []  # once
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fake.calls == [] and not graphed._fastbert.graphs.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_with_reference_attention_run_eagerly(monkeypatch):
    """backend="torch" on a GPU: the reference attention would sync inside the capture."""
    monkeypatch.setattr(graphs, "_warned", set())
    eager = fastbert.optimize(small_model().cuda(), backend="torch")
    graphed = fastbert.optimize(copy.deepcopy(eager), backend="torch", cuda_graphs=True)
    ids, mask, types = (t.cuda() for t in tokenizer_batch([5, 17, 3], 17))
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        with pytest.warns(UserWarning, match="cuda_graphs=True needs attention on the triton backend"):
            got = graphed(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not graphed._fastbert.graphs.graphs
