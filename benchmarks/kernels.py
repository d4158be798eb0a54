"""Op microbenchmarks: every fastbert op on every backend available here, against PyTorch eager.

    python -m benchmarks.kernels --device cuda --dtype float16 --out results/kernels-fp16.json

For each op the fused implementations (one per backend that runs on the device, found through
``fastbert.backends.load``) and the PyTorch eager equivalent are timed interleaved, round by
round, and each is reported by its median. Each op has a floor: the larger of its FLOPs over
the peak matmul rate and its minimal bytes over the copy bandwidth. Both ceilings are measured
in the same run (a large device-to-device copy; a large matmul in the benchmark dtype), and
every result is given as achieved TFLOP/s or GB/s and as the fraction of the floor it reaches
(1.0 = at the floor), and on CUDA with the memory one call allocates at its peak beyond its
inputs (``extra_peak_mb``). CPU runs use small sizes; ``--tiny`` the smallest, so that a dry run of
the GPU check (``benchmarks/gpu_check.sh --dry-run``) goes through every step in seconds, the
Triton kernels included under ``TRITON_INTERPRET=1``.

A case may also time variants of the fused call in the same rounds, reported as ``fastbert
BACKEND [LABEL]``: the attention case with a relative-position table times the same call
without it, so the ratio of the two medians is the table's cost.

The first call of each fused implementation makes its measured choices (fastbert.tuning): the
Triton launch configuration of each kernel on a GPU (see fastbert.kernels.launch), the CPU GEMM
library on a CPU. The record keeps them under ``choices``, with every candidate's median, so a
run on a new GPU shows which tiles win there.

A backend is timed only on the ops it implements on the device (as fastbert.declarations
declares them: the extension has no CUDA attention kernel, for one). A candidate that raises is recorded with its error and left out of
the timing; the others go on. With ``--out`` the JSON is rewritten after every case (``finished``
is null until the run ends), so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved
from fastbert import backends, declarations, tuning

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# ----------------------------------------------------------------------------- timing


def extra_peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes one call allocates above what was allocated before it, at its peak (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_interleaved(candidates: dict[str, Callable[[], object]], device: str, rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved round by round."""
    for fn in candidates.values():  # warm-up: compilation, allocator, caches
        for _ in range(3):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples = interleaved(candidates, torch.device(device), min_reps=rounds, max_reps=rounds, budget_s=0.0)
    return {name: statistics.median(ms) / 1e3 for name, ms in samples.items()}


# ----------------------------------------------------------------------------- ceilings


def measure_ceilings(device: str, dtype: torch.dtype, rounds: int, tiny: bool = False) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and matmul rate (FLOP/s) measured here, now."""
    copy_bytes = (4 << 20) if tiny else (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = time_interleaved({"copy": lambda: dst.copy_(src)}, device, rounds)["copy"]
    del src, dst
    n = 256 if tiny else 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_s = time_interleaved({"matmul": lambda: torch.mm(a, b)}, device, rounds)["matmul"]
    return {"copy_bytes_per_s": 2 * copy_bytes / copy_s, "matmul_flop_per_s": 2 * n**3 / mm_s,
            "copy_bytes": copy_bytes, "matmul_n": n}


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One op at one shape: the fused call per backend, the eager equivalent, and its cost."""

    op: str
    shape: str
    flops: float
    bytes: float
    fused: Callable[[Callable], Callable[[], object]]  # implementation -> zero-argument call
    eager: dict[str, Callable[[], object]] = field(default_factory=dict)
    # label -> implementation -> call: other calls of the same implementation, timed beside it
    variants: dict[str, Callable[[Callable], Callable[[], object]]] = field(default_factory=dict)


def _attention_case(batch, seqlen, heads, head_dim, causal, dtype, device, rel_width=None) -> Case:
    """Full rows; with ``rel_width``, a relative-position table [heads, rel_width] (MPNet's
    shape: W = 257), timed beside the same call without it."""
    T = batch * seqlen
    qkv = torch.randn(T, 3, heads, head_dim, device=device).to(dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, T + 1, seqlen, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    # The eager peer: SDPA on the padded layout (FlashAttention's kernel on a GPU when eligible).
    qp, kp, vp = (x.reshape(batch, seqlen, heads, head_dim).transpose(1, 2) for x in (q, k, v))
    pairs = batch * heads * seqlen * seqlen * (0.5 if causal else 1.0)
    shape = f"B{batch} S{seqlen} N{heads} D{head_dim}{' causal' if causal else ''}"
    plain = Case(
        op="attention",
        shape=shape,
        flops=4 * pairs * head_dim,
        bytes=4 * T * heads * head_dim * q.element_size(),
        fused=lambda impl: (lambda: impl(q, k, v, cu, seqlen, scale, causal, None)),
        eager={"torch sdpa": lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=causal, scale=scale)},
    )
    if rel_width is None:
        return plain
    table = torch.randn(heads, rel_width, device=device)
    positions = torch.arange(seqlen, dtype=torch.int32, device=device).repeat(batch)
    # Eager code (HF MPNet) builds the [N, S, S] bias from the table once and passes it as a mask.
    radius = rel_width // 2
    columns = torch.arange(seqlen, device=device)
    bias = table[:, (columns[None, :] - columns[:, None]).clamp(-radius, radius) + radius].to(dtype)
    return Case(
        op="attention",
        shape=f"{shape} rel W{rel_width}",
        flops=plain.flops,
        bytes=plain.bytes + table.numel() * 4 + T * 4,
        fused=lambda impl: (lambda: impl(q, k, v, cu, seqlen, scale, causal, None, table, positions)),
        eager={"torch sdpa + bias": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias[None],
                                                                           is_causal=causal, scale=scale)},
        variants={"without rel_bias": plain.fused},
    )


def _linear_gelu_case(M, K, N, dtype, device) -> Case:
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    return Case(
        op="linear_gelu",
        shape=f"M{M} K{K} N{N}",
        flops=2 * M * N * K,
        bytes=(M * K + N * K + M * N) * x.element_size(),
        fused=lambda impl: (lambda: impl(x, w, b, "none")),
        # The target is the GEMM alone; GEMM + bias + GELU is what eager code runs.
        eager={"torch linear+gelu": lambda: F.gelu(F.linear(x, w, b)), "torch gemm alone": lambda: torch.mm(x, w.t())},
    )


def _add_layernorm_case(T, H, dtype, device) -> Case:
    x, residual = (torch.randn(T, H, device=device).to(dtype) for _ in range(2))
    bias, weight, ln_bias = (torch.randn(H, device=device).to(dtype) for _ in range(3))
    return Case(
        op="add_layernorm",
        shape=f"T{T} H{H}",
        flops=0.0,
        bytes=3 * T * H * x.element_size(),
        fused=lambda impl: (lambda: impl(x, residual, bias, weight, ln_bias, 1e-12)),
        eager={"torch add+layer_norm": lambda: F.layer_norm(x + bias + residual, (H,), weight, ln_bias, 1e-12)},
    )


def _embed_layernorm_case(T, H, vocab, dtype, device) -> Case:
    ids = [torch.randint(0, n, (T,), device=device) for n in (vocab, 512, 2)]
    tables = [torch.randn(n, H, device=device).to(dtype) for n in (vocab, 512, 2)]
    weight, ln_bias = (torch.randn(H, device=device).to(dtype) for _ in range(2))

    def eager():
        h = tables[0][ids[0]] + tables[2][ids[2]] + tables[1][ids[1]]
        return F.layer_norm(h, (H,), weight, ln_bias, 1e-12)

    return Case(
        op="embed_layernorm",
        shape=f"T{T} H{H} V{vocab}",
        flops=0.0,
        bytes=(4 * T * H) * tables[0].element_size() + 3 * T * ids[0].element_size(),  # 3 rows read, 1 written
        fused=lambda impl: (lambda: impl(*ids, *tables, weight, ln_bias, 1e-12)),
        eager={"torch gather+layer_norm": eager},
    )


def cases(device: str, dtype: torch.dtype, tiny: bool = False) -> list[Case]:
    if tiny:  # one of each op, as small as the kernels allow: for dry runs, not for numbers
        return [
            _attention_case(2, 16, 2, 32, False, dtype, device),
            _attention_case(2, 16, 2, 32, False, dtype, device, rel_width=9),
            _linear_gelu_case(16, 32, 64, dtype, device),
            _add_layernorm_case(16, 64, dtype, device),
            _embed_layernorm_case(16, 64, 100, dtype, device),
        ]
    if device == "cuda":
        return [
            _attention_case(32, 512, 12, 64, False, dtype, device),
            _attention_case(32, 512, 16, 64, False, dtype, device),
            _attention_case(32, 512, 12, 64, True, dtype, device),
            _attention_case(8, 512, 8, 128, False, dtype, device),
            _attention_case(32, 512, 12, 64, False, dtype, device, rel_width=257),
            _linear_gelu_case(32 * 512, 768, 3072, dtype, device),
            _linear_gelu_case(32 * 512, 1024, 4096, dtype, device),
            _add_layernorm_case(32 * 512, 768, dtype, device),
            _add_layernorm_case(32 * 512, 1024, dtype, device),
            _add_layernorm_case(32 * 512, 4096, dtype, device),
            _embed_layernorm_case(32 * 512, 1024, 30522, dtype, device),
        ]
    return [
        _attention_case(4, 128, 4, 64, False, dtype, device),
        _attention_case(8, 128, 12, 64, False, dtype, device, rel_width=257),
        _linear_gelu_case(512, 256, 1024, dtype, device),
        _add_layernorm_case(2048, 768, dtype, device),
        _embed_layernorm_case(2048, 384, 1000, dtype, device),
    ]


def available_backends(op: str, device: str) -> dict[str, Callable]:
    """backend name -> implementation of ``op``, for every fused backend that runs ``op`` on ``device``."""
    found = {}
    for name in backends.BACKENDS:
        if name == "torch":
            continue  # the reference; the eager peers stand for PyTorch
        try:
            module = backends.load(name, device)
        except backends.BackendUnavailable:
            continue
        if backends.implements(name, module, op, device):
            found[name] = getattr(module, op)
    return found


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _working(candidates: dict[str, Callable[[], object]], case: Case, rows: list[dict]) -> dict[str, Callable]:
    """The candidates whose first call succeeds; each failing one is recorded in ``rows``."""
    working = {}
    for name, call in candidates.items():
        try:
            call()
        except Exception as exc:  # one broken kernel must not cost the rest of the run
            rows.append({"op": case.op, "shape": case.shape, "impl": name, "error": _error(exc)})
            print(f"{case.op:<14} {case.shape:<26} {name:<44} FAILED: {_error(exc)}", flush=True)
            continue
        working[name] = call
    return working


def run(device: str, dtype: torch.dtype, rounds: int, tiny: bool = False, ops: tuple[str, ...] | None = None,
        progress: Callable[[dict], None] | None = None) -> dict:
    """Time every case (of ``ops``, if given); ``progress`` (if given) gets the partial record
    after every case. The record's ``choices`` are the decisions the fused calls measured on
    their first use (:func:`fastbert.tuning.decisions`)."""
    ceilings = measure_ceilings(device, dtype, rounds, tiny)
    rows: list[dict] = []
    record = {"ceilings": ceilings, "results": rows, "choices": {}}
    for case in cases(device, dtype, tiny):
        if ops is not None and case.op not in ops:
            continue
        floor_s = max(case.flops / ceilings["matmul_flop_per_s"], case.bytes / ceilings["copy_bytes_per_s"])
        implementations = available_backends(case.op, device)
        candidates = {f"fastbert {name}": case.fused(impl) for name, impl in implementations.items()}
        for label, variant in case.variants.items():
            candidates.update({f"fastbert {name} [{label}]": variant(impl) for name, impl in implementations.items()})
        candidates.update(case.eager)
        candidates = _working(candidates, case, rows)
        medians = time_interleaved(candidates, device, rounds) if candidates else {}
        for name, seconds in medians.items():
            row = {
                "op": case.op, "shape": case.shape, "impl": name, "median_ms": seconds * 1e3,
                "floor_ms": floor_s * 1e3, "fraction_of_floor": floor_s / seconds,
            }
            peak = extra_peak_bytes(candidates[name], device)
            if peak is not None:
                row["extra_peak_mb"] = peak / 2**20
            if case.flops:
                row["tflop_per_s"] = case.flops / seconds / 1e12
            row["gb_per_s"] = case.bytes / seconds / 1e9
            rows.append(row)
            rate = f"{row['tflop_per_s']:8.3f} TFLOP/s" if case.flops else f"{row['gb_per_s']:8.1f} GB/s   "
            print(f"{case.op:<14} {case.shape:<26} {name:<44} {row['median_ms']:9.3f} ms {rate} "
                  f"{row['fraction_of_floor']:6.1%} of floor", flush=True)
        record["choices"] = tuning.decisions()
        if progress:
            progress(record)
    return record


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()


def _write(path: str, record: dict) -> None:
    partial = f"{path}.tmp"
    with open(partial, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per candidate (default 50 cuda, 10 cpu)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--ops", default=None, help="comma-separated ops to time (default: all)")
    parser.add_argument("--tiny", action="store_true",
                        help="one tiny case per op and small ceilings: checks that everything runs, measures nothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    dtype = DTYPES[args.dtype or ("float16" if args.device == "cuda" else "float32")]
    rounds = args.rounds or (50 if args.device == "cuda" else 10)
    ops = None if args.ops is None else tuple(args.ops.split(","))
    if ops is not None and set(ops) - set(declarations.STEPS):
        parser.error(f"--ops: unknown {sorted(set(ops) - set(declarations.STEPS))}; the ops are {declarations.STEPS}")
    header = {
        "device": _device_name(args.device), "device_type": args.device, "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": _triton_version(), "rounds": rounds,
        "tiny": args.tiny, "finished": None,
    }
    print(f"# {header['device']} {header['dtype']} torch {header['torch']} triton {header['triton']}", flush=True)
    progress = (lambda partial: _write(args.out, {**header, **partial})) if args.out else None
    with torch.inference_mode():
        record = {**header, **run(args.device, dtype, rounds, args.tiny, ops, progress)}
    record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    c = record["ceilings"]
    print(f"# ceilings: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {c['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s")
    if args.out:
        _write(args.out, record)
    return record


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def exit_status(record: dict) -> int:
    """1 when some candidate raised (its row has an ``error``), else 0."""
    return 1 if any("error" in row for row in record["results"]) else 0


if __name__ == "__main__":
    sys.exit(exit_status(main()))
