"""benchmarks/gpu_check.sh: each of its four GPU calls, dry-run on the CPU, and what it relies on.

The dry run goes through every step of a call (argument parsing, step time limits, the result
files, the 8-file limit, the summary) with tiny sizes, so that the script's own bugs show up
without a GPU. The four calls run side by side (about 40 s in all on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from benchmarks import gpu_check

# Slow, out of the fast loop (pytest -m "not slow"): dry runs of the GPU script.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = {
    "essentials": ["info", "ninja", "install", "check", "tests", "kernels", "models"],
    "tests": ["info", "ninja", "install", "tests"],
    "kernels": ["info", "ninja", "install", "kernels-float16", "kernels-bfloat16", "training"],
    "models": ["info", "ninja", "install", "host-overhead", "models-grid", "models-bf16", "models-report"],
}
needs_shell = pytest.mark.skipif(
    os.environ.get("FASTBERT_GPU_CHECK") == "1" or not all(shutil.which(t) for t in ("bash", "timeout", "tar")),
    reason="inside gpu_check.sh itself (no nested runs), or bash, timeout or tar missing",
)


def _start(call: str, out: Path, **env) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DRY_RUN")}
    environment.update(PYTHON=sys.executable, **env)
    return subprocess.Popen(["bash", str(SCRIPT), "--dry-run", call, str(out)], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    started = {}
    for call in STEPS:
        out = tmp_path_factory.mktemp(f"gpu-check-{call}")
        started[call] = (out, _start(call, out))
    # The time guard: every step capped at 1 s, so each is stopped at its limit.
    out = tmp_path_factory.mktemp("gpu-check-guard")
    started["guard"] = (out, _start("kernels", out, GPU_CHECK_STEP_LIMIT_S="1"))
    finished = {}
    for call, (out, process) in started.items():
        stdout, _ = process.communicate(timeout=600)
        finished[call] = (process.returncode, stdout, out)
    return finished


def _top(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@needs_shell
@pytest.mark.parametrize("call", list(STEPS))
def test_dry_run(dry_runs, call):
    status, stdout, out = dry_runs[call]
    assert status == 0, stdout[-4000:]
    assert f"=== summary: gpu_check.sh {call} (DRY RUN on CPU)" in stdout and stdout.rstrip().endswith("OK")
    assert _top(out) == sorted(gpu_check.files_of(call)) and len(_top(out)) <= gpu_check.MAX_FILES
    assert all((out / name).is_file() for name in _top(out))
    summary = json.loads((out / f"summary-{call}.json").read_text())
    assert (summary["call"], summary["dry_run"], summary["ok"]) == (call, True, True)
    assert [s["name"] for s in summary["steps"]] == STEPS[call]
    assert all(s["status"] == "ok" and s["seconds"] is not None for s in summary["steps"])
    assert (out / f"summary-{call}.txt").read_text() in stdout
    with tarfile.open(out / f"logs-{call}.tar.gz") as logs:
        names = logs.getnames()
    assert {f"logs-{call}/{step}.log" for step in STEPS[call]} <= set(names)

    if call in ("tests", "essentials"):
        root = ElementTree.parse(out / "tests-junit.xml").getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert (int(suite.get("tests")), int(suite.get("failures")), int(suite.get("errors"))) == (2, 0, 0)
        assert summary["headline"]["passed"] == 2
    if call == "tests":
        assert "2 passed" in (out / "tests.log").read_text()
    elif call == "essentials":
        with tarfile.open(out / f"logs-{call}.tar.gz") as logs:
            check = logs.extractfile(f"logs-{call}/check.log").read().decode()
        assert "check cpu cpp attention (float32): pass" in check and "FAIL" not in check
        kernels = json.loads((out / "kernels.json").read_text())
        assert kernels["finished"] and {r["op"] for r in kernels["results"]} == {"attention", "linear_gelu"}
        assert any(r["impl"] == "fastbert triton" for r in kernels["results"])  # in the interpreter
        # The recording of measured choices: the CPU GEMM library of the cpp backend's linear_gelu here
        # (a GPU run records each Triton kernel's tile the same way), with every candidate's time.
        gemm = kernels["choices"]["cpu_gemm"]
        assert gemm and all(set(entry["medians_s"] or {}) >= {entry["choice"]} for entry in gemm.values())
        assert "choice cpu_gemm [" in stdout
        models = json.loads((out / "models.json").read_text())
        assert models["run"]["finished"] and {r["impl"]: r["status"] for r in models["records"]} == {
            "hf-sdpa": "ok", "fastbert-cpp": "ok"}
        assert summary["headline"]["models.json"]["measured"]
    elif call == "kernels":
        for dtype in ("float16", "bfloat16"):
            record = json.loads((out / f"kernels-{dtype}.json").read_text())
            assert record["finished"] and record["tiny"] and record["dtype"] == dtype
            rows = record["results"]
            assert not [r for r in rows if "error" in r]
            assert {r["op"] for r in rows} == {"attention", "linear_gelu", "add_layernorm", "embed_layernorm"}
            assert any(r["impl"] == "fastbert triton" for r in rows)  # in the interpreter
        training = json.loads((out / "training.json").read_text())
        assert {r["impl"] for r in training["records"]} == {"fastbert", "hf-sdpa", "hf-sdpa-checkpointing"}
        fused = next(r for r in training["records"] if r["impl"] == "fastbert")
        assert fused["loss_rel_diff"] < 1e-4 and fused["median_ms"] > 0
    else:
        for name, dtype in (("models-grid.json", "float32"), ("models-bf16.json", "bfloat16")):
            document = json.loads((out / name).read_text())
            assert document["run"]["finished"]
            status = {r["impl"]: r["status"] for r in document["records"]}
            assert status["hf-sdpa"] == status["hf-sdpa-compile-max-autotune"] == status["nested-tensor"] == "ok"
            assert status["fastbert-triton-graphs"] == status["fastbert-triton"] == "unavailable"
            assert {r["dtype"] for r in document["records"]} == {dtype}
        assert "fastbert benchmarks" in (out / "models-report.md").read_text()
        assert summary["headline"]["models-grid.json"]["measured"]
        host = json.loads((out / "host-overhead.json").read_text())
        assert host["tiny_model"]["ratio"] > 0 and host["bert_base_stubbed"]["fastbert_host_us"] > 0


@needs_shell
def test_step_stopped_at_its_time_limit_is_reported(dry_runs):
    status, stdout, out = dry_runs["guard"]
    assert status == 1, stdout[-4000:]
    summary = json.loads((out / "summary-kernels.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS["kernels"] and all(s["limit_s"] == 1 for s in steps.values())
    assert steps["kernels-float16"]["status"] == steps["kernels-bfloat16"]["status"] == "TIMEOUT"
    assert {s["status"] for s in steps.values()} <= {"ok", "TIMEOUT"}  # info may beat 1 s on a fast machine
    assert "NOT OK" in stdout and "kernels-float16.json: missing or not JSON" in stdout
    assert len(_top(out)) <= gpu_check.MAX_FILES


@needs_shell
def test_no_time_left_skips_steps_but_still_summarises(tmp_path):
    process = _start("tests", tmp_path, GPU_CHECK_BUDGET_S="20")
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 1, stdout
    summary = json.loads((tmp_path / "summary-tests.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("info", "skipped"), ("ninja", "skipped"), ("install", "skipped"), ("tests", "skipped")]
    assert "not readable" in stdout  # no junit file: said so, not a crash


def test_bad_arguments_are_refused():
    for argv in ([], ["gpu", "out"], ["tests"], ["--dry-run", "models"]):
        done = subprocess.run(["bash", str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "usage:" in done.stderr


def test_summary_fails_a_call_that_writes_more_than_eight_files(tmp_path, capsys):
    results, state = tmp_path / "out", tmp_path / "state"
    results.mkdir()
    state.mkdir()
    (results / "from-before.txt").write_text("")
    (state / "before.txt").write_text("from-before.txt\n")
    (state / "steps.tsv").write_text("info\tok\t0\t1\t60\t\n")
    for i in range(6):  # with the two summary files: 8, the most a call may bring back
        (results / f"result-{i}.json").write_text("{}")
    assert gpu_check.summary("kernels", results, state, dry_run=True) == 0
    (results / "one-too-many.json").write_text("{}")
    assert gpu_check.summary("kernels", results, state, dry_run=True) == 1
    out = capsys.readouterr().out
    assert "files at the top of out/: 9 (at most 8)" in out and "FAILED: more than 8 files" in out
    assert not json.loads((results / "summary-kernels.json").read_text())["ok"]

