"""Every Triton kernel configuration we ship compiles for sm_80 and sm_90, with no GPU present.

``triton.compile`` with an explicit ``GPUTarget`` produces PTX and a cubin on any machine. A
failure here is a kernel that would not run on a real GPU. Each compiled kernel must not spill
registers (ptxas reports no spill stores or loads; with Triton 3.8 at most 64 bytes, see
``fastbert._compat.spill_allowance``), and the fp16/bf16 matrix kernels must use
the tensor cores: ``wgmma`` on sm_90 (Hopper), ``mma`` on sm_80 (Ampere). A table of
registers, shared memory, stack and spills is printed.

The compiles run in worker processes without ``TRITON_INTERPRET``: once set, Triton's language
module is built for the interpreter and cannot compile. ``python tests/test_triton_compile.py``
prints the report without running the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fastbert import _compat
from fastbert.kernels.attention import HEAD_DIMS, PREPROCESS_ROWS, block_d, preprocess_warps
from fastbert.kernels.attention import shipped_backward_configs as attention_backward_configs
from fastbert.kernels.attention import shipped_configs as attention_configs
from fastbert.kernels.attention import shipped_train_configs as attention_train_configs
from fastbert.kernels.layernorm import shipped_backward_configs as layernorm_backward_configs
from fastbert.kernels.layernorm import shipped_configs as layernorm_configs
from fastbert.kernels.linear_gelu import backward_config as gelu_backward_config
from fastbert.kernels.linear_gelu import shipped_configs as linear_gelu_configs

# Slow, out of the fast loop (pytest -m "not slow"): compiles every shipped Triton config for sm_80 and sm_90 (minutes).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _attention_cases() -> list[dict]:
    strides = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh",
               "stride_bb", "stride_bh", "stride_bm", "stride_rh"]
    cases = []
    train_configs = {(d, dt, arch, rel): cfg for d, dt, arch, rel, cfg in attention_train_configs()}
    for head_dim, dtype, arch, masked, rel, cfg in attention_configs():
        # Causal with a bias is the masked variant with the most live values, compiled for fp16 at
        # every head dim; the plain one (the hot path) at one head dim per fp16 tile shape. bf16
        # and fp32 differ from fp16 only in conversions and dot precision: one head dim per tile
        # shape, 80 standing for the padded ones. The relative-bias configurations (MPNet's packed
        # path) are compiled on top of causal with a bias, their worst case, as the masked ones.
        # Each is compiled for the architecture it is shipped for. (A compile takes seconds; the
        # suite is budgeted.)
        per_tile = {torch.float16: (32, 64, 80, 128, 256), torch.bfloat16: (32, 64, 80, 256),
                    torch.float32: (32, 64, 80, 256)}[dtype]
        if dtype != torch.float16 and head_dim not in per_tile:
            continue
        for causal, bias in ((True, True),) if masked else ((False, False),):
            if not bias and (dtype != torch.float16 or head_dim not in per_tile):
                continue
            t = TYPE[dtype]
            signature = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "out_ptr": f"*{t}",
                         "bias_ptr": f"*{t}", "rel_ptr": "*fp32", "pos_ptr": "*i32", "cu_seqlens_ptr": "*i32",
                         **{s: "i32" for s in strides}, "rel_radius": "i32", "qk_scale": "fp32",
                         "lse_ptr": "*fp32", "seed_ptr": "*i64", "n_tokens": "i32", "dropout_p": "fp32"}
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_M": cfg.block_m,
                          "BLOCK_N": cfg.block_n, "CAUSAL": causal, "HAS_BIAS": bias, "REL_BIAS": rel, "stride_bn": 1}
            aligned = [n for n in signature if n not in ("qk_scale", "rel_radius", "dropout_p")]
            if masked:
                # The training forward (its own configurations) with the lse stored and dropout on.
                train = train_configs[(head_dim, dtype, arch, rel)]
                tc = {**constexprs, "BLOCK_M": train.block_m, "BLOCK_N": train.block_n, "STORE_LSE": True,
                      "DROPOUT": True}
                cases.append({
                    "kernel": "attention_train", "module": "fastbert.kernels.attention", "fn": "_attention_fwd",
                    "label": f"{t} hd{head_dim} {'causal+bias+rel' if rel else 'causal+bias'}+dropout "
                             f"M{train.block_m} N{train.block_n} w{train.num_warps} s{train.num_stages}",
                    "signature": signature, "constexprs": tc, "aligned": aligned, "num_warps": train.num_warps,
                    "num_stages": train.num_stages, "matrix": dtype != torch.float32, "archs": (arch,),
                })
            cases.append({
                "kernel": "attention", "module": "fastbert.kernels.attention", "fn": "_attention_fwd",
                "label": f"{t} hd{head_dim} {'causal+bias+rel' if rel else 'causal+bias' if causal else 'plain'} "
                         f"M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                "signature": signature,
                "constexprs": {**constexprs, "STORE_LSE": False, "DROPOUT": False},
                "aligned": aligned,
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "matrix": dtype != torch.float32,
                "archs": (arch,),
            })
    return cases


def _attention_backward_cases() -> list[dict]:
    """The dK/dV and dQ kernels at every shipped configuration, with causal, a bias and dropout
    (the most live values without the relative bias); the relative-bias variant on top for fp16
    and fp32. bf16 at one head dim per tile shape, like the forward. The preprocess kernel once
    per tile width."""
    cases = []
    per_tile = {torch.float16: HEAD_DIMS, torch.bfloat16: (64, 80, 256), torch.float32: HEAD_DIMS}
    for head_dim, dtype, arch, cfg in attention_backward_configs():
        if head_dim not in per_tile[dtype]:
            continue
        t = TYPE[dtype]
        common = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "do_ptr": f"*{t}", "lse_ptr": "*fp32",
                  "delta_ptr": "*fp32", "bias_ptr": f"*{t}", "rel_ptr": "*fp32", "pos_ptr": "*i32",
                  "cu_seqlens_ptr": "*i32", "seed_ptr": "*i64",
                  **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                        "stride_dot", "stride_doh", "stride_gt", "stride_gh", "stride_bb", "stride_bh",
                                        "stride_bm", "stride_rh", "rel_radius", "n_tokens")},
                  "qk_scale": "fp32", "sm_scale": "fp32", "dropout_p": "fp32"}
        for fn, c, extra in (("_attention_bwd_dkdv", cfg.dkdv, {"dk_ptr": f"*{t}", "dv_ptr": f"*{t}"}),
                             ("_attention_bwd_dq", cfg.dq, {"dq_ptr": f"*{t}", "drel_ptr": "*fp32"})):
            signature = {**common, **extra}
            for rel in (False, True) if dtype != torch.bfloat16 else (False,):
                constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_M": c.block_m,
                              "BLOCK_N": c.block_n, "CAUSAL": True, "HAS_BIAS": True, "REL_BIAS": rel,
                              "DROPOUT": True, "stride_bn": 1}
                if fn == "_attention_bwd_dq":
                    constexprs["BLOCK_W"] = 512 if rel else 16  # a 257-wide table (R = 128)
                cases.append({
                    "kernel": fn.replace("_attention_bwd_", "attention_bwd_"), "module": "fastbert.kernels.attention",
                    "fn": fn, "label": f"{t} hd{head_dim} causal+bias{'+rel' if rel else ''}+dropout "
                                       f"M{c.block_m} N{c.block_n} w{c.num_warps} s{c.num_stages}",
                    "signature": signature, "constexprs": constexprs,
                    "aligned": [n for n in signature if n not in ("qk_scale", "sm_scale", "rel_radius", "dropout_p")],
                    "num_warps": c.num_warps, "num_stages": c.num_stages, "matrix": dtype != torch.float32,
                    "archs": (arch,),
                    # wgmma's smallest tile is 64 rows: narrower programs (see backward_config) run mma.
                    "wgmma": (c.block_n if fn == "_attention_bwd_dkdv" else c.block_m) >= 64,
                })
        # The inexact-lse pass runs at the dQ kernel's blocks (see attention_backward).
        signature = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "do_ptr": f"*{t}", "do2_ptr": f"*{t}", "lse_ptr": "*fp32",
                     "lse2_ptr": "*fp32", "delta_ptr": "*fp32", "bias_ptr": f"*{t}", "rel_ptr": "*fp32",
                     "pos_ptr": "*i32", "cu_seqlens_ptr": "*i32",
                     **{s: "i32" for s in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_dot",
                                           "stride_doh", "stride_bb", "stride_bh", "stride_bm", "stride_rh",
                                           "rel_radius", "n_tokens")},
                     "qk_scale": "fp32"}
        c = cfg.dq
        for rel in (False, True) if dtype != torch.bfloat16 else (False,):
            cases.append({
                "kernel": "attention_bwd_lse", "module": "fastbert.kernels.attention", "fn": "_attention_bwd_lse",
                "label": f"{t} hd{head_dim} causal+bias{'+rel' if rel else ''} M{c.block_m} N{c.block_n} "
                         f"w{c.num_warps} s{c.num_stages}",
                "signature": signature,
                "constexprs": {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_M": c.block_m,
                               "BLOCK_N": c.block_n, "CAUSAL": True, "HAS_BIAS": True, "REL_BIAS": rel,
                               "stride_bn": 1},
                "aligned": [n for n in signature if n not in ("qk_scale", "rel_radius")],
                "num_warps": c.num_warps, "num_stages": c.num_stages, "matrix": dtype != torch.float32,
                "archs": (arch,), "wgmma": c.block_m >= 64,
            })
    for width in sorted({block_d(d) for d in HEAD_DIMS}):
        signature = {"out_ptr": "*fp16", "do_ptr": "*fp16", "delta_ptr": "*fp32", "dqkv_ptr": "*fp16",
                     "cu_seqlens_ptr": "*i32", **{s: "i32" for s in ("stride_ot", "stride_oh", "stride_dot",
                     "stride_doh", "stride_gt", "stride_gw", "stride_gh", "n_tokens", "n_seqs")}}
        warps = preprocess_warps(width)
        cases.append({
            "kernel": "attention_bwd_pre", "module": "fastbert.kernels.attention", "fn": "_attention_bwd_preprocess",
            "label": f"fp16 hd{width} M{PREPROCESS_ROWS} w{warps}", "signature": signature,
            "constexprs": {"HEAD_DIM": width, "BLOCK_D": width, "BLOCK_M": PREPROCESS_ROWS},
            "aligned": [n for n in signature if n != "n_seqs"], "num_warps": warps, "num_stages": 1, "matrix": False,
        })
    return cases


def _linear_gelu_cases() -> list[dict]:
    cases = []
    for dtype, cfg in linear_gelu_configs():
        t = TYPE[dtype]
        signature = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}",
                     "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
                     "pre_ptr": f"*{t}"}
        for store_pre in (False, True):  # inference; training (also stores the pre-activation)
            cases.append({
                "kernel": "linear_gelu_train" if store_pre else "linear_gelu",
                "module": "fastbert.kernels.linear_gelu", "fn": "_linear_gelu",
                "label": f"{t} M{cfg.block_m} N{cfg.block_n} K{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
                "signature": signature,
                "constexprs": {"APPROX_TANH": False, "EVEN_K": True, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                               "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "STORE_PRE": store_pre},
                "aligned": [n for n in signature if n != "M"],
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "matrix": dtype != torch.float32,
            })
    cfg = gelu_backward_config()
    for t in ("fp16", "fp32"):
        for tanh in (False, True):
            signature = {"grad_ptr": f"*{t}", "pre_ptr": f"*{t}", "dpre_ptr": f"*{t}", "partial_ptr": "*fp32",
                         "M": "i32", "N": "i32", "stride_gm": "i32", "stride_pm": "i32"}
            cases.append({
                "kernel": "gelu_backward", "module": "fastbert.kernels.linear_gelu", "fn": "_gelu_bwd",
                "label": f"{t} {'tanh' if tanh else 'erf'} M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps}",
                "signature": signature,
                "constexprs": {"APPROX_TANH": tanh, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n},
                "aligned": [n for n in signature if n != "M"], "num_warps": cfg.num_warps, "num_stages": 1,
                "matrix": False,
            })
    return cases


def _layernorm_cases() -> list[dict]:
    cases = []
    for cfg in layernorm_configs():
        # fp32 doubles the registers a row needs: compiled where rows are wide enough to matter.
        for dtype in (torch.float16, torch.float32) if cfg.block_h >= 1024 else (torch.float16,):
            t = TYPE[dtype]
            signature = {"x_ptr": f"*{t}", "res_ptr": f"*{t}", "bias_ptr": f"*{t}", "w_ptr": f"*{t}",
                         "b_ptr": f"*{t}", "y_ptr": f"*{t}", "n_rows": "i32", "H": "i32", "stride_x": "i32",
                         "stride_res": "i32", "stride_y": "i32", "eps": "fp32", "mean_ptr": "*fp32",
                         "rstd_ptr": "*fp32", "seed_ptr": "*i64", "dropout_p": "fp32"}
            for train in (False, True):  # inference; training (statistics stored, dropout)
                cases.append({
                    "kernel": "add_layernorm_train" if train else "add_layernorm",
                    "module": "fastbert.kernels.layernorm", "fn": "_add_layernorm",
                    "label": f"{t} H{cfg.block_h} rows{cfg.rows} w{cfg.num_warps}",
                    "signature": signature,
                    "constexprs": {"HAS_BIAS": True, "BLOCK_H": cfg.block_h, "ROWS": cfg.rows, "STATS": train,
                                   "DROPOUT": train},
                    "aligned": [n for n in signature if n not in ("n_rows", "H", "eps", "dropout_p")],
                    "num_warps": cfg.num_warps, "num_stages": 1, "matrix": False,
                })
        if cfg.block_h >= 16:  # embeddings: hidden sizes of 16 and up
            signature = {"word_ids_ptr": "*i64", "pos_ids_ptr": "*i64", "type_ids_ptr": "*i64", "word_ptr": "*fp16",
                         "pos_ptr": "*fp16", "type_ptr": "*fp16", "w_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16",
                         "n_rows": "i32", "H": "i32", "stride_word": "i32", "stride_pos": "i32", "stride_type": "i32",
                         "stride_y": "i32", "eps": "fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                         "seed_ptr": "*i64", "dropout_p": "fp32"}
            for train in (False, True):
                cases.append({
                    "kernel": "embed_layernorm_train" if train else "embed_layernorm",
                    "module": "fastbert.kernels.layernorm", "fn": "_embed_layernorm",
                    "label": f"fp16 H{cfg.block_h} rows{cfg.rows} w{cfg.num_warps}",
                    "signature": signature,
                    "constexprs": {"BLOCK_H": cfg.block_h, "ROWS": cfg.rows, "STATS": train, "DROPOUT": train},
                    "aligned": [n for n in signature if n not in ("n_rows", "H", "eps", "dropout_p")],
                    "num_warps": cfg.num_warps, "num_stages": 1, "matrix": False,
                })
    for cfg in layernorm_backward_configs():
        # The backward kernels with dropout (and, add+LN, the bias): fp16 at every width, fp32
        # where rows are wide enough to matter.
        for dtype in (torch.float16, torch.float32) if cfg.block_h >= 1024 else (torch.float16,):
            t = TYPE[dtype]
            signature = {"grad_ptr": f"*{t}", "x_ptr": f"*{t}", "res_ptr": f"*{t}", "bias_ptr": f"*{t}",
                         "w_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "seed_ptr": "*i64",
                         "dx_ptr": f"*{t}", "dres_ptr": f"*{t}", "partial_ptr": "*fp32",
                         **{s: "i32" for s in ("n_rows", "H", "rows_per_program", "stride_g", "stride_x", "stride_res",
                                               "stride_dx", "stride_dres")}, "dropout_p": "fp32"}
            cases.append({
                "kernel": "add_layernorm_bwd", "module": "fastbert.kernels.layernorm", "fn": "_add_layernorm_bwd",
                "label": f"{t} H{cfg.block_h} rows{cfg.rows} w{cfg.num_warps}", "signature": signature,
                "constexprs": {"HAS_BIAS": True, "DROPOUT": True, "BLOCK_H": cfg.block_h, "ROWS": cfg.rows},
                "aligned": [n for n in signature if n not in ("n_rows", "H", "dropout_p", "rows_per_program")],
                "num_warps": cfg.num_warps, "num_stages": 1, "matrix": False,
            })
        if cfg.block_h >= 16:
            signature = {"grad_ptr": "*fp16", "word_ids_ptr": "*i64", "pos_ids_ptr": "*i64", "type_ids_ptr": "*i64",
                         "word_ptr": "*fp16", "pos_ptr": "*fp16", "type_ptr": "*fp16", "w_ptr": "*fp16",
                         "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "seed_ptr": "*i64", "dh_ptr": "*fp32",
                         "partial_ptr": "*fp32",
                         **{s: "i32" for s in ("n_rows", "H", "rows_per_program", "stride_g", "stride_word",
                                               "stride_pos", "stride_type", "stride_dh")}, "dropout_p": "fp32"}
            cases.append({
                "kernel": "embed_layernorm_bwd", "module": "fastbert.kernels.layernorm", "fn": "_embed_layernorm_bwd",
                "label": f"fp16 H{cfg.block_h} rows{cfg.rows} w{cfg.num_warps}", "signature": signature,
                "constexprs": {"DROPOUT": True, "BLOCK_H": cfg.block_h, "ROWS": cfg.rows},
                "aligned": [n for n in signature if n not in ("n_rows", "H", "dropout_p", "rows_per_program")],
                "num_warps": cfg.num_warps, "num_stages": 1, "matrix": False,
            })
    return cases


CASES = _attention_cases() + _attention_backward_cases() + _linear_gelu_cases() + _layernorm_cases()
JOBS = [(i, arch) for i, case in enumerate(CASES) for arch in case.get("archs", ARCHS)]  # (case, arch)


def compile_case(case: dict, arch: int) -> dict:
    """Compile one case for one arch; the report row (runs without TRITON_INTERPRET)."""
    import importlib

    from fastbert import _compat

    kernel = getattr(importlib.import_module(case["module"]), case["fn"])
    row = {"kernel": case["kernel"], "config": case["label"], "sm": arch}
    begin = time.perf_counter()
    try:
        compiled = _compat.compile_for(kernel, case["signature"], case["constexprs"], arch,
                                       case["num_warps"], case["num_stages"], tuple(case["aligned"]))
    except Exception as exc:  # reported, and the test fails with it
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    usage = _compat.resource_usage(compiled)
    ptx = compiled.asm["ptx"]
    tensor_op = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    return {**row, **usage, "tensor_op": tensor_op, "seconds": time.perf_counter() - begin}


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _run_workers(jobs: list[tuple[int, int]], workers: int) -> list[dict]:
    chunks = [jobs[i::workers] for i in range(workers)]

    def run(chunk):
        if not chunk:
            return []
        arg = ",".join(f"{i}:{arch}" for i, arch in chunk)
        done = subprocess.run([sys.executable, __file__, arg], env=_worker_env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compile worker failed:\n{done.stderr[-4000:]}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    with ThreadPoolExecutor(workers) as pool:
        return [row for rows in pool.map(run, chunks) for row in rows]


def format_report(rows: list[dict]) -> str:
    lines = [f"{'kernel':<16} {'config':<48} {'sm':>3} {'regs':>5} {'shared':>7} {'stack':>6} {'spill':>6} tensor-op"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["sm"])):
        if "error" in r:
            lines.append(f"{r['kernel']:<16} {r['config']:<48} {r['sm']:>3} FAILED {r['error'][:80]}")
        else:
            lines.append(f"{r['kernel']:<16} {r['config']:<48} {r['sm']:>3} {r['registers']:>5} {r['shared']:>7} "
                         f"{r['stack']:>6} {r['spilled']:>6} {r['tensor_op']}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def report() -> dict[tuple[int, int], dict]:
    rows = _run_workers(JOBS, workers=max(1, min(4, os.cpu_count() or 1)))
    return {(row["case"], row["sm"]): row for row in rows}


def test_compiled_head_dims_include_the_common_ones():
    """BERT-family models use head dims 32 to 128, 80 and 96 among them (not powers of two)."""
    assert {32, 64, 80, 96, 128} <= set(HEAD_DIMS)


def test_print_report(report, capsys):
    with capsys.disabled():
        print("\n" + format_report(list(report.values())))


@pytest.mark.parametrize("index,arch", JOBS, ids=[f"{CASES[i]['kernel']}[{CASES[i]['label']}]-sm{a}" for i, a in JOBS])
def test_compiles_without_spills(report, index, arch):
    case, row = CASES[index], report[(index, arch)]
    assert "error" not in row, row["error"]
    allowed = _compat.spill_allowance()  # 0, except with Triton 3.8 (see there)
    assert row["spilled"] <= allowed, (f"{row['spilled']} bytes of register spills with {row['registers']} "
                                       f"registers (allowed: {allowed})")
    if case["matrix"]:
        expected = "wgmma" if arch == 90 and case.get("wgmma", True) else "mma"
        assert row["tensor_op"] == expected, f"the sm_{arch} PTX uses {row['tensor_op']!r}, not {expected}"


if __name__ == "__main__":
    if len(sys.argv) > 1:  # a worker: compile the given "case:arch" pairs, one JSON row each
        for pair in sys.argv[1].split(","):
            i, arch = map(int, pair.split(":"))
            print(json.dumps({"case": i, **compile_case(CASES[i], arch)}), flush=True)
    else:
        print(format_report(_run_workers(JOBS, workers=2)))
