"""The implementations the benchmarks compare, each built from the same fp32 HF model.

A peer's ``build(model, device, dtype)`` returns a function ``run(input_ids, attention_mask)``
giving the last hidden state ``[batch, seq_len, hidden]``, or raises :class:`Unavailable` when
it cannot run here (wrong device, extension not built); any other exception is a failure,
reported with its message. ``run.detail``, when set, says what exactly runs (which fastbert
ops fell back to another backend, which ops ONNX Runtime's optimizer fused). Only valid tokens
of the output are compared: pad positions differ between peers (fastbert and the nested-tensor
path give zeros there, HF gives values).

Peers that keep HF modules share the weight tensors of one converted model (no copies);
``fastbert.optimize`` patches the model it is given, so each fastbert backend gets a full copy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import fastbert
from fastbert import backends, cpu_gemm

Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CACHE = Path(__file__).resolve().parent / ".cache"


class Unavailable(RuntimeError):
    """The implementation cannot run on this device or build; the message says why."""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    build: Callable[[nn.Module, torch.device, torch.dtype], Run]
    graphable: bool = False  # on CUDA, also timed replayed from a CUDA graph where capture succeeds
    memory_visible: bool = True  # False: it allocates from its own pool, kept between calls


def share_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree and config that shares its parameter and buffer tensors."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def hf_module(model: nn.Module, attn_implementation: str) -> nn.Module:
    """``model`` (weights shared) running HF's ``"eager"`` or ``"sdpa"`` attention."""
    if attn_implementation == "sdpa" and not getattr(model, "_supports_sdpa", False):
        raise Unavailable(f"{type(model).__name__} has no SDPA attention in transformers (only its eager path)")
    clone = share_weights(model)
    clone.config._attn_implementation = attn_implementation
    return clone


def _hidden(module: nn.Module) -> Run:
    def run(input_ids, attention_mask):
        return module(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return run


def _hf(attn_implementation: str):
    def build(model, device, dtype):
        return _hidden(hf_module(model, attn_implementation))

    return build


def _compiled(mode: str | None = None):
    def build(model, device, dtype):
        # One graph per shape (dynamic=False): allow every shape of a grid without hitting the limit.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(_hidden(hf_module(model, "sdpa")), mode=mode, dynamic=False)
        if mode != "max-autotune":
            return compiled

        # mode="max-autotune" replays Inductor's own CUDA graphs (cudagraph trees) on CUDA; each
        # call starts a new step, as in an inference loop (the previous step's output is dead).
        def run(input_ids, attention_mask):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(input_ids, attention_mask)

        return run

    return build


def _compiled_frozen(model, device, dtype):
    """HF SDPA compiled by Inductor with freezing: the weights become constants of the graph,
    folded and, on CPU, prepacked for oneDNN's linear (the oneDNN/MKL path PyTorch recommends for
    CPU inference).

    Freezing has two readers of ``torch._inductor.config.freezing``, both inside the call that
    compiles (the first call of each shape, ``dynamic=False``): Dynamo, when it traces, turns the
    parameters into graph attributes (guarded by identity) only if the flag is on; Inductor then
    folds them in. ``torch.compile(options={"freezing": True})`` reaches Inductor only: the weights
    stay graph inputs and nothing is folded. So every call runs under ``config.patch(freezing=True)``
    (restored on return, about 5 us) and ``no_grad`` (freezing is skipped with grad on); the
    options make this compile's backend distinct, so no other compiled peer's cache entry, made
    with freezing off on the same shared weights, is reused here, nor this one there. ``run.detail``
    says how many linear weights the last compile prepacked."""
    from torch._dynamo.utils import counters
    from torch._inductor import config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(_hidden(hf_module(model, "sdpa")), dynamic=False, options={"freezing": True})
    freezing = config.patch(freezing=True)
    key = "mkldnn_linear_weight_pack_matcher_count"

    def run(input_ids, attention_mask):
        # Looked up each time: torch._dynamo.reset() clears the counters.
        graphs, packs = counters["stats"]["unique_graphs"], counters["inductor"][key]
        with freezing, torch.no_grad():
            out = compiled(input_ids, attention_mask)
        if counters["stats"]["unique_graphs"] != graphs:  # this call compiled (0 packed: e.g. bf16 without AVX-512)
            run.detail = f"Inductor freezing: {counters['inductor'][key] - packs} linear weights prepacked for oneDNN"
        return out

    run.detail = None
    return run


def _fastbert(backend: str, cuda_graphs: bool = False):
    def build(model, device, dtype):
        if backend == "triton" and device.type == "cpu":
            raise Unavailable("Triton runs on CPU only in its interpreter, a correctness tool that is not benchmarked")
        try:
            backends.load(backend, device.type)
        except backends.BackendUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        # optimize() patches the instance and may prepare weights for its backend: a full copy.
        try:
            optimized = fastbert.optimize(copy.deepcopy(model), backend=backend, cuda_graphs=cuda_graphs)
        except fastbert.UnsupportedConfigError as exc:
            raise Unavailable(str(exc)) from exc
        run = _hidden(optimized)
        moved = [f"{op}={b}" for op, b in backends.plan(device, backend, dtype).items() if b != backend]
        run.detail = "ops on fallback backends: " + ", ".join(moved) if moved else None
        return run

    return build


def _fastbert_gemm(library: str):
    """fastbert-cpp with every CPU GEMM pinned to ``library`` (a ``FASTBERT_CPU_GEMM`` value):
    each fixed choice timed in the same rounds as the measured one (fastbert-cpp)."""
    build_cpp = _fastbert("cpp")

    def build(model, device, dtype):
        if device.type != "cpu":
            raise Unavailable("CPU GEMM libraries are pinned for CPU runs only")
        if not cpu_gemm.AVAILABLE[library]:
            raise Unavailable(f"the {library} GEMM is not available in this build")
        run = build_cpp(model, device, dtype)

        def pinned(input_ids, attention_mask):
            with cpu_gemm.using(library):
                return run(input_ids, attention_mask)

        pinned.detail = run.detail
        return pinned

    return build


def nested_encoder(model: nn.Module) -> nn.TransformerEncoder:
    """PyTorch's ``nn.TransformerEncoder`` holding the weights of an HF BERT encoder."""
    c = model.config
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer") or hasattr(
            model.encoder, "relative_attention_bias"):
        raise Unavailable(f"nn.TransformerEncoder holds BERT-layout layers without relative position bias; "
                          f"{type(model).__name__} is not one")
    if c.hidden_act != "gelu":
        raise Unavailable(f"nn.TransformerEncoderLayer has exact GELU only; the model uses {c.hidden_act!r}")
    layer = nn.TransformerEncoderLayer(
        c.hidden_size, c.num_attention_heads, c.intermediate_size, dropout=0.0, activation="gelu",
        layer_norm_eps=c.layer_norm_eps, batch_first=True, norm_first=False,
    )
    encoder = nn.TransformerEncoder(layer, c.num_hidden_layers, enable_nested_tensor=True)
    with torch.no_grad():
        for ours, theirs in zip(encoder.layers, model.encoder.layer):
            attn = theirs.attention
            q, k, v = attn.self.query, attn.self.key, attn.self.value
            ours.self_attn.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            ours.self_attn.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            ours.self_attn.out_proj.load_state_dict(attn.output.dense.state_dict())
            ours.norm1.load_state_dict(attn.output.LayerNorm.state_dict())
            ours.linear1.load_state_dict(theirs.intermediate.dense.state_dict())
            ours.linear2.load_state_dict(theirs.output.dense.state_dict())
            ours.norm2.load_state_dict(theirs.output.LayerNorm.state_dict())
    return encoder.to(model.device, model.dtype).eval()


def _nested(model, device, dtype):
    encoder = nested_encoder(model)
    if not encoder.use_nested_tensor:
        raise RuntimeError("nn.TransformerEncoder refused the nested-tensor fast path for this config")
    embeddings = model.embeddings

    def run(input_ids, attention_mask):
        return encoder(embeddings(input_ids=input_ids), src_key_padding_mask=~attention_mask.bool())

    return run


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha1(repr(sorted(model.config.to_dict().items())).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class _LastHidden(nn.Module):
    """``model(input_ids, attention_mask).last_hidden_state`` with a positional signature, for export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_file(model: nn.Module) -> Path:
    """Export ``model`` (fp32 CPU) once and run ORT's BERT optimizer on it; cached by weights."""
    from onnxruntime.transformers import optimizer

    path = CACHE / f"bert-{_weights_digest(model)}.opt.onnx"
    if path.exists() and path.with_suffix(".json").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(path.name.replace(".opt.onnx", ".onnx"))
    exported = _LastHidden(hf_module(model, "eager"))  # a copy: export may touch the module
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        exported, (ids, torch.ones_like(ids)), str(raw), input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"], dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                                          "last_hidden_state": axes},
        opset_version=17, dynamo=False,
    )
    c = model.config
    optimized = optimizer.optimize_model(str(raw), model_type="bert", num_heads=c.num_attention_heads,
                                         hidden_size=c.hidden_size)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    path.with_suffix(".json").write_text(json.dumps(fused))
    partial = path.with_suffix(".tmp")
    optimized.save_model_to_file(str(partial))
    os.replace(partial, path)
    raw.unlink()
    return path


def _onnxruntime(model, device, dtype):
    if device.type != "cpu":
        raise Unavailable("ONNX Runtime is benchmarked on CPU only")
    if dtype != torch.float32:
        raise Unavailable("ONNX Runtime is benchmarked in fp32 only (in bfloat16, the exported BERT graph has "
                          "ops its CPU provider has no kernels for)")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Idle ORT threads would otherwise spin after each call, slowing whichever peer runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = onnx_file(model)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(input_ids, attention_mask):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(session.run(None, feeds)[0])

    fused = json.loads(path.with_suffix(".json").read_text())
    run.detail = "ORT optimizer fused: " + ", ".join(f"{op} {n}" for op, n in fused.items())
    return run


PEERS = {
    p.name: p
    for p in (
        *(Peer(f"fastbert-{b}", _fastbert(b)) for b in backends.BACKENDS),
        # optimize(..., cuda_graphs=True): one captured graph per shape bucket, replayed on CUDA;
        # the graphs keep their memory pool between calls.
        Peer("fastbert-triton-graphs", _fastbert("triton", cuda_graphs=True), memory_visible=False),
        # fastbert-cpp with its CPU GEMMs pinned to one library each, against its measured choice.
        *(Peer(f"fastbert-cpp-gemm-{lib}", _fastbert_gemm(lib)) for lib in cpu_gemm.CHOICES[1:]),
        Peer("hf-eager", _hf("eager"), graphable=True),
        Peer("hf-sdpa", _hf("sdpa"), graphable=True),
        Peer("hf-sdpa-compile", _compiled(), graphable=True),
        # Inductor's GEMM autotuning and its own CUDA graphs: the strongest stock-PyTorch peer on a
        # GPU. Not graphable again; its graph pool lives between calls.
        Peer("hf-sdpa-compile-max-autotune", _compiled("max-autotune"), memory_visible=False),
        # Inductor with freezing (weights folded into the graph, prepacked for oneDNN on CPU): the
        # strongest stock-PyTorch peer on a CPU.
        Peer("hf-sdpa-compile-freezing", _compiled_frozen),
        Peer("nested-tensor", _nested),
        Peer("onnxruntime", _onnxruntime, memory_visible=False),
    )
}
BASELINE = "hf-sdpa"
