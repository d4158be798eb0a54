"""The model benchmark: every implementation on every workload, shape and fill, checked and timed.

For each workload and dtype, every requested implementation is built once from the same fp32
model (see :mod:`benchmarks.peers`); one that cannot run here is recorded as ``unavailable``
with the reason, one whose build raises as ``failed``. Then for each (batch, seq_len, fill):

1. the seeded batch runs through HF's eager model in fp32 (the reference, TF32 off);
2. each implementation runs once (its first call, timed alone: compile or warm-up cost); an
   exception records it as ``failed`` with the message; its maximum absolute error against the
   reference over valid tokens is recorded, and it is flagged ``wrong`` when that error exceeds
   ``TOLERANCE_FACTOR x`` the error of HF SDPA in the same dtype plus ``FLOOR[dtype]``;
3. on CUDA, a CUDA-graph replay variant is added for each implementation that can be captured;
4. each runs once more, measuring peak memory (and warming up), then all of them (wrong ones
   included, flagged) are timed in interleaved rounds (repeated when the spread shows a burst
   of load from elsewhere, see :meth:`Runner.timed_rounds`).

After the grid come the options' extra :class:`Section` s (the default CPU grid: bf16 at
BERT-base 8x128, uniform fill, where the CPU has AVX512-BF16 or AMX; elsewhere one
``unavailable`` record says why). HF SDPA, the baseline of every speedup, always runs.
``tokens_per_s`` counts real (non-pad) tokens, the work a user asked for. ``load_avg`` (the
1-minute load average when the timing ended; this process adds about its thread count) tells a
measurement taken on a busy machine. Every record names the machine (CPU vendor, model and ISA
flags, see :func:`environment`) and the measured choices made so far in this process
(``choices``: table -> key -> option, e.g. the CPU GEMM library per shape, see
:mod:`fastbert.tuning`; the run's header has them with their sources and timings). Records go
to ``<out>/<run>.json``, by default in a folder named after the CPU or GPU
(:func:`device_folder`; for a ``--quick`` run that folder lies under ``LOCAL_RESULTS``, which
git ignores); ``python -m benchmarks.report <out>``
renders the markdown summary and the plot.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import fastbert
from fastbert import machine, tuning
from benchmarks import report, timing
from benchmarks.peers import BASELINE, PEERS, Unavailable, hf_module
from benchmarks.workloads import FILLS, WORKLOADS, make_inputs, shapes_for

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# Where --quick writes by default: a check of this machine, not a result to commit (git ignores it),
# so that running it leaves the committed results and the tests on them as they were.
LOCAL_RESULTS = RESULTS / "local"
TOLERANCE_FACTOR = 4.0
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"cpu": ("float32",), "cuda": ("float16", "bfloat16")}
DEFAULT_IMPLS = {
    "cpu": ("fastbert-cpp", "fastbert-torch", "fastbert-triton", "hf-eager", "hf-sdpa", "hf-sdpa-compile",
            "hf-sdpa-compile-freezing", "nested-tensor", "onnxruntime"),
    # On CUDA, HF SDPA (the baseline) and the other graphable peers are also timed replayed from a
    # CUDA graph ("+cudagraph"), beside fastbert with and without its own CUDA graphs.
    "cuda": ("fastbert-triton", "fastbert-triton-graphs", "fastbert-cuda", "fastbert-torch", "hf-eager", "hf-sdpa",
             "hf-sdpa-compile", "hf-sdpa-compile-max-autotune", "nested-tensor", "onnxruntime"),
}
# --quick (3 minutes at most on 2 busy cores) leaves out the peers that spend most of that
# compiling or exporting, and HF eager (HF SDPA is the baseline).
QUICK_SKIPS = ("hf-sdpa-compile", "hf-sdpa-compile-max-autotune", "hf-sdpa-compile-freezing", "onnxruntime",
               "hf-eager")
# The ISA extensions that decide which CPU kernels run (oneDNN, MKL, torch's own): recorded as
# present or absent in every record; bf16 GEMMs are fast only with AVX512-BF16 or AMX.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
PACKAGES = ("torch", "transformers", "triton", "onnxruntime", "sentence-transformers", "numpy")
# Warnings every run would repeat; what they say is in the records (unavailable backends) or
# irrelevant to timing (ONNX export tracing, nested tensors being a prototype API).
QUIET = (
    "fastbert: backend .* unavailable",
    "The PyTorch API of nested tensors is in prototype stage",
    "enable_nested_tensor is True",
    "Converting a tensor to a Python boolean might cause the trace to be incorrect",
    "Exporting aten::index operator",
)


@dataclasses.dataclass(frozen=True)
class Section:
    """A slice of the grid run in addition to it: one workload in one dtype at the given shapes and
    fills, on a CPU having any of the ``needs`` flags (else one ``unavailable`` record says why)."""
    workload: str
    dtype: torch.dtype
    shapes: tuple[tuple[int, int], ...]
    fills: tuple[str, ...]
    needs: tuple[str, ...] = ()


# bf16 on CPU: BERT-base, one query and a batch, full and about half full, where bf16 GEMMs have
# hardware support (without AVX512-BF16 or AMX, oneDNN/MKL emulate them and every peer is several
# times slower than in fp32). An explicit --dtype bfloat16 runs the whole grid in bf16 on any CPU.
CPU_BF16 = Section("bert-base", torch.bfloat16, ((1, 16), (8, 128)), ("full", "uniform"),
                   needs=("avx512_bf16", "amx_bf16"))
DEFAULT_SECTIONS = {"cpu": (CPU_BF16,), "cuda": ()}


@dataclasses.dataclass
class Options:
    device: torch.device
    quick: bool
    impls: tuple[str, ...]
    workloads: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    out: Path
    run_name: str
    shapes: tuple[tuple[int, int], ...] | None = None  # None: each workload's grid for the device
    fills: tuple[str, ...] = FILLS
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 6.0  # timed rounds per measurement: about this long, within [min_reps, max_reps]
    attempts: int = 3  # timed-round attempts at most, while the spread stays above max_spread
    max_spread: float = 1.25
    sections: tuple[Section, ...] = ()  # run after the grid (the full default grid has DEFAULT_SECTIONS)


def default_impls(device: torch.device, quick: bool) -> tuple[str, ...]:
    impls = DEFAULT_IMPLS[device.type]
    return tuple(i for i in impls if i not in QUICK_SKIPS) if quick else impls


def environment(device: torch.device) -> dict:
    """What produced the numbers: machine (the CPU too on CUDA, see :func:`cpu_info`), threads,
    package versions, commit."""
    versions = {"python": platform.python_version(), "fastbert": fastbert.__version__}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = cpu_info()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu["cpu_model"],
        **cpu,
        "num_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": _commit(),
    }


def _commit() -> str | None:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short=12", "HEAD").strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_info(cpuinfo: Path = machine.CPUINFO) -> dict:
    """The CPU: ``cpu_vendor`` (``vendor_id``: GenuineIntel, AuthenticAMD), ``cpu_model`` (model
    name) and ``cpu_family_model`` (cpuid family and model, e.g. ``6-207``) from ``cpuinfo``,
    ``cpu_flags`` (each of :data:`ISA_FLAGS`: present or not) and torch's
    ``cpu_capability`` (the kernels its CPU dispatch picked: AVX512, AVX2, ...). Without
    ``cpuinfo`` (not Linux) or where it lacks a field (ARM), the vendor and the flags are None and
    the model is what :mod:`platform` says."""
    cpu = machine.cpu(cpuinfo)
    flags = None if cpu["flags"] is None else set(cpu["flags"])
    return {
        "cpu_vendor": cpu["vendor"],
        "cpu_model": cpu["model"],
        "cpu_family_model": cpu["family_model"],
        "cpu_flags": {flag: None if flags is None else flag in flags for flag in ISA_FLAGS},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _slug(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def cpu_folder(vendor: str | None, model: str, family_model: str | None = None) -> str:
    """``cpu-<vendor>-<model>``, e.g. ``cpu-intel-xeon-platinum-8480`` or ``cpu-amd-epyc-7763-64-core-processor``:
    trademark marks dropped, and the vendor not repeated when the model name starts with it. A
    model name alone (``vendor`` None: not recorded, or not Linux) gives the same folder when it
    starts with the vendor's name, as Intel's and AMD's do. A model name without a model number
    (virtual machines often say only "Intel(R) Xeon(R) Processor") is followed by the cpuid
    ``family_model`` where known, e.g. ``cpu-intel-xeon-processor-6-207``: different CPUs behind
    one generic name must not share a folder."""
    short = VENDORS.get(vendor, "-".join(_slug(vendor))) if vendor else None
    words = _slug(model.replace("(R)", " ").replace("(r)", " ").replace("(TM)", " ").replace("(tm)", " "))
    if short and words[:1] != [short]:
        words = [short, *words]
    if family_model and not any(c.isdigit() for c in model):
        words.append(family_model)
    return "-".join(["cpu", *(words or ["unknown"])])


def device_folder(device: torch.device) -> str:
    """``cpu-<vendor>-<model>`` (:func:`cpu_folder`) or ``cuda-<gpu name>``: results of different
    CPUs or GPUs never share a folder."""
    if device.type != "cuda":
        cpu = cpu_info()
        return cpu_folder(cpu["cpu_vendor"], cpu["cpu_model"], cpu["cpu_family_model"])
    return "cuda-" + "-".join(_slug(torch.cuda.get_device_name(device)))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, options: Options):
        self.o = options
        self.env = environment(options.device)
        self.records: list[dict] = []
        self.build_s: dict[str, float] = {}  # per implementation, for the current workload and dtype
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def record(self, **fields) -> dict:
        row = {
            "run": self.o.run_name, "status": "ok", "reason": None, "batch": None, "seq_len": None, "fill": None,
            "mean_fill": None, "tokens": None, "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": None,
            "attempts": None, "load_avg": None, "build_s": None, "first_call_ms": None, "tokens_per_s": None,
            "speedup_vs_hf_sdpa": None, "max_abs_err": None, "tolerance": None, "peak_mem_mb": None,
            "cuda_graph": False, "detail": None, **fields, **self.env, "timestamp": self.started,
            "choices": {table: {key: entry["choice"] for key, entry in entries.items()}
                        for table, entries in tuning.decisions().items()},
        }
        self.records.append(row)
        return row

    # ------------------------------------------------------------------------------ the loops
    def run(self) -> list[dict]:
        _progress(f"fastbert benchmarks ({self.o.run_name}) on {self.env['device_name']}, "
                  f"{self.env['num_threads']} threads, commit {self.env['commit']}; writing {_shown(self.path)}")
        if self.o.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
        # no_grad, as users run inference (HF's docs); models are built inside it too.
        with torch.no_grad(), warnings.catch_warnings():
            for message in QUIET:
                warnings.filterwarnings("ignore", message=message)
            for name in self.o.workloads:
                self.workload(name)
            for section in self.o.sections:
                self.section(section)
        return self.records

    def section(self, section: Section) -> None:
        flags = self.env["cpu_flags"]
        if section.needs and not any(flags.get(flag) for flag in section.needs):
            have = [f for f, present in flags.items() if present]
            known = "flags unknown" if all(v is None for v in flags.values()) else f"it has {', '.join(have) or 'none'}"
            dtype = str(section.dtype).removeprefix("torch.")
            shapes = ", ".join(f"{b}x{s}" for b, s in section.shapes)
            reason = (f"{dtype} rows ({shapes} {', '.join(section.fills)}) need a CPU with "
                      f"{' or '.join(section.needs)} ({known}; torch CPU capability {self.env['cpu_capability']}); "
                      f"--dtype {dtype} runs them anyway")
            self.record(impl="(all)", workload=section.workload, dtype=dtype, status="unavailable", reason=reason)
            _progress(f"  {section.workload} {dtype}: unavailable: {reason}")
            return
        self.workload(section.workload, (section.dtype,), section.shapes, section.fills)

    def workload(self, name: str, dtypes: tuple[torch.dtype, ...] | None = None,
                 shapes: tuple[tuple[int, int], ...] | None = None, fills: tuple[str, ...] | None = None) -> None:
        """Every implementation on workload ``name``: the options' dtypes, shapes and fills, or these."""
        device = self.o.device
        workload = WORKLOADS[name]
        try:
            model = workload.build().to(device)
        except Unavailable as exc:  # the checkpoint package is not installed
            self.record(impl="(all)", workload=name, dtype=None, status="unavailable", reason=str(exc))
            _progress(f"  {name}: unavailable: {exc}")
            return
        except Exception as exc:
            self.record(impl="(all)", workload=name, dtype=None, status="failed", reason=f"loading: {_reason(exc)}")
            _progress(f"  {name}: FAILED to load: {_reason(exc)}")
            return
        reference = hf_module(model, "eager")
        shapes = shapes or self.o.shapes or shapes_for(workload, device.type, self.o.quick)
        shapes = [s for s in shapes if s[1] <= model.config.max_position_embeddings]
        for dtype in dtypes or self.o.dtypes:
            # A real copy: converting a weight-sharing one would convert the reference's weights too.
            converted = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            runs = self.build(name, converted, dtype)
            for batch, seq_len in shapes:
                for fill in fills or self.o.fills:
                    self.measure(name, reference, runs, dtype, batch, seq_len, fill, model.config.vocab_size)
            del runs, converted
            torch._dynamo.reset()  # compiled graphs (frozen ones hold weight copies) go with their models

    def build(self, workload: str, model: torch.nn.Module, dtype: torch.dtype) -> dict:
        device = self.o.device
        runs = {}
        for impl in dict.fromkeys((BASELINE, *self.o.impls)):
            common = dict(impl=impl, workload=workload, dtype=str(dtype).removeprefix("torch."))
            start = time.perf_counter()
            try:
                runs[impl] = PEERS[impl].build(model, device, dtype)
                self.build_s[impl] = time.perf_counter() - start
            except Unavailable as exc:
                self.record(**common, status="unavailable", reason=str(exc))
                _progress(f"  {workload} {common['dtype']}: {impl} unavailable: {exc}")
            except Exception as exc:  # a peer that breaks is reported, never dropped
                self.record(**common, status="failed", reason=f"build: {_reason(exc)}")
                _progress(f"  {workload} {common['dtype']}: {impl} FAILED to build: {_reason(exc)}")
        return runs

    def measure(self, workload, reference, runs, dtype, batch, seq_len, fill, vocab_size) -> None:
        device = self.o.device
        input_ids, mask = (t.to(device) for t in make_inputs(workload, vocab_size, batch, seq_len, fill))
        valid = mask.bool()
        tokens = int(valid.sum())
        common = dict(workload=workload, dtype=str(dtype).removeprefix("torch."), batch=batch, seq_len=seq_len,
                      fill=fill, mean_fill=round(tokens / (batch * seq_len), 4), tokens=tokens)
        expected = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state[valid].double()
        started = time.perf_counter()

        calls, rows = {}, {}
        for impl, run in runs.items():
            call = functools.partial(run, input_ids, mask)
            first = time.perf_counter()
            try:
                out = call()
                _sync(device)
            except Exception as exc:
                self.record(**common, impl=impl, status="failed", reason=f"run: {_reason(exc)}")
                continue
            first_ms = (time.perf_counter() - first) * 1e3
            calls[impl] = call
            rows[impl] = dict(impl=impl, build_s=self.build_s[impl], first_call_ms=first_ms,
                              max_abs_err=_error(out, valid, expected), detail=getattr(run, "detail", None))
        if device.type == "cuda":
            self.add_graphs(calls, rows, common, valid, expected)

        baseline_err = rows.get(BASELINE, {}).get("max_abs_err")
        tolerance = TOLERANCE_FACTOR * (baseline_err or 0.0) + FLOOR[dtype]
        for impl, row in rows.items():  # the peak-memory call doubles as the warm-up call
            peak = timing.peak_memory_mb(calls[impl], device)
            row["peak_mem_mb"] = peak if PEERS[impl.removesuffix("+cudagraph")].memory_visible else None
        samples, attempts = self.timed_rounds(calls)
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        base = samples.get(BASELINE)
        base_ms = timing.summary(base)["median_ms"] if base else None
        for impl, row in rows.items():
            row.update(timing.summary(samples[impl]), reps=len(samples[impl]), attempts=attempts, tolerance=tolerance,
                       load_avg=load)
            row["tokens_per_s"] = tokens / row["median_ms"] * 1e3
            row["speedup_vs_hf_sdpa"] = base_ms / row["median_ms"] if base_ms else None
            if not row["max_abs_err"] <= tolerance:  # NaN counts as wrong
                row.update(status="wrong", reason=f"max abs error {row['max_abs_err']:.2e} > tolerance {tolerance:.2e}")
            self.record(**common, **row)
        self.progress(common, time.perf_counter() - started)
        self.write(finished=False)

    def timed_rounds(self, calls: dict) -> tuple[dict[str, list[float]], int]:
        """Interleaved samples; repeated (up to ``attempts`` times) while some implementation's
        p80/p20 exceeds ``max_spread``, keeping the steadiest attempt: a burst of load from other
        processes on a shared machine spoils one attempt, rarely all of them."""
        o = self.o
        best, attempts = {}, 0
        for attempts in range(1, o.attempts + 1):
            samples = timing.interleaved(calls, o.device, o.min_reps, o.max_reps, o.budget_s)
            if not best or timing.spread(samples) < timing.spread(best):
                best = samples
            if timing.spread(best) <= o.max_spread:
                break
        return best, attempts

    def add_graphs(self, calls, rows, common, valid, expected) -> None:
        """CUDA-graph replay variants of the implementations whose forward can be captured."""
        for impl in [i for i in calls if PEERS[i].graphable]:
            name = f"{impl}+cudagraph"
            try:
                replay = timing.cuda_graphed(calls[impl])
                out = replay()
                torch.cuda.synchronize()
            except Exception as exc:
                self.record(**common, impl=name, cuda_graph=True, status="failed", reason=f"capture: {_reason(exc)}")
                continue
            calls[name] = replay
            rows[name] = dict(impl=name, cuda_graph=True, max_abs_err=_error(out, valid, expected))

    def progress(self, common: dict, seconds: float) -> None:
        mine = [r for r in self.records if all(r.get(k) == v for k, v in common.items())]
        cells = []
        for r in mine:
            if r["status"] in ("ok", "wrong"):
                speed = f" {r['speedup_vs_hf_sdpa']:.2f}x" if r["speedup_vs_hf_sdpa"] else ""
                flag = " WRONG" if r["status"] == "wrong" else ""
                cells.append(f"{r['impl']} {r['median_ms']:.1f}ms{speed}{flag}")
            else:
                cells.append(f"{r['impl']} FAILED")
        _progress(f"  {common['workload']} {common['dtype']} {common['batch']}x{common['seq_len']} {common['fill']} "
                  f"(fill {common['mean_fill']:.2f}) [{seconds:.0f}s]: " + " | ".join(cells))

    # ------------------------------------------------------------------------------ output
    @property
    def path(self) -> Path:
        return self.o.out / f"{self.o.run_name}.json"

    def write(self, finished: bool) -> Path:
        """Write the records so far; the runner calls this after every measurement, so an
        interrupted run keeps what it measured (``finished`` is then null in the file)."""
        self.o.out.mkdir(parents=True, exist_ok=True)
        path = self.path
        options = {"quick": self.o.quick, "impls": list(self.o.impls), "workloads": list(self.o.workloads),
                   "dtypes": [str(d).removeprefix("torch.") for d in self.o.dtypes], "fills": list(self.o.fills),
                   "shapes": self.o.shapes and [list(s) for s in self.o.shapes], "budget_s": self.o.budget_s,
                   "min_reps": self.o.min_reps, "max_reps": self.o.max_reps, "attempts": self.o.attempts,
                   "max_spread": self.o.max_spread,
                   "sections": [{"workload": x.workload, "dtype": str(x.dtype).removeprefix("torch."),
                                 "shapes": [list(s) for s in x.shapes], "fills": list(x.fills), "needs": list(x.needs)}
                                for x in self.o.sections]}
        done = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds") if finished else None
        document = {"run": {"name": self.o.run_name, "started": self.started, "finished": done, **self.env,
                            "options": options, "choices": tuning.decisions()},
                    "records": self.records}
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(document, indent=1) + "\n")
        partial.replace(path)
        return path


def _error(out: torch.Tensor, valid: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |out - reference| over valid tokens (NaN when the output is not finite there)."""
    got = out[valid].double()
    if got.shape != expected.shape:
        return float("nan")
    return float((got - expected).abs().max()) if got.numel() else 0.0


def _shown(path: Path) -> Path:
    """``path`` relative to the checkout when it lies inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def main(options: Options) -> list[dict]:
    runner = Runner(options)
    runner.run()
    path = runner.write(finished=True)
    print(report.run_table(runner.records))
    shown = _shown(path)
    _progress(f"wrote {shown}; render the summary and plot with: python -m benchmarks.report {shown.parent}")
    return runner.records
