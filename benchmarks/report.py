"""Render benchmark results: ``python -m benchmarks.report benchmarks/results/cpu-intel-xeon-processor``.

Reads every ``<run>.json`` the runner wrote in the folder and writes, next to them,
``summary.md`` (one section per run: time and speedup, accuracy, peak memory, and every
implementation that was not measured with its reason) and ``<run>.png`` (speedup over HF SDPA
against shape, one panel per workload/dtype and fill). The runner uses :func:`run_table` for
the table it prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

BASELINE = "hf-sdpa"
MEASURED = ("ok", "wrong")
RUN_ORDER = ("quick", "full")
SPEEDUP_TICKS = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1, 1.5, 2, 3, 4, 8, 16, 32, 64)

HOW = """\
How it was measured: `python -m benchmarks{flags}` (see benchmarks/runner.py). Each row is one
seeded batch; fill is the mean fraction of real (non-pad) tokens. Every implementation starts from
the same fp32 model; its output on valid tokens is compared with HF eager fp32 and flagged WRONG
beyond 4x HF SDPA's own error in that dtype plus a floor (fp32 1e-4, fp16 1e-2, bf16 5e-2).
Times: after a warm-up call, implementations run in rounds, in a shuffled order each round;
median of the rounds, speedup = median(HF SDPA) / median(impl) from the same rounds. Peak memory:
growth during one call (CPU: process resident-set high-water mark; CUDA: allocator peak)."""


FILLS = ("full", "uniform", "skewed")


def _key(r: dict, workloads: list[str]) -> tuple:
    """Sort order of rows: workload (as run), dtype, token count, shape, then fill level."""
    fill = FILLS.index(r["fill"]) if r["fill"] in FILLS else len(FILLS)
    return (workloads.index(r["workload"]), r["dtype"], r["batch"] * r["seq_len"], r["batch"], r["seq_len"], fill)


def _impls(records: list[dict]) -> list[str]:
    seen = dict.fromkeys(r["impl"] for r in records if r["status"] in MEASURED)
    return [BASELINE] * (BASELINE in seen) + [i for i in seen if i != BASELINE]


def _pivot(records: list[dict], cell: Callable[[dict], str], spread: bool = False) -> str:
    """A markdown table: one row per (workload, dtype, shape, fill), one column per implementation;
    ``spread`` adds the row's largest p80/p20 ratio (near 1: steady; large: the machine was busy)
    and the load average when it was timed."""
    impls = _impls(records)
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    rows: dict[tuple, dict] = {}
    for r in records:
        if r["batch"] is not None:
            rows.setdefault(_key(r, workloads), {"first": r})[r["impl"]] = r
    extra = ["worst p80/p20", "load"] if spread else []
    lines = ["| workload | dtype | batch x seq | fill | " + " | ".join(impls + extra) + " |",
             "|" + "---|" * (4 + len(impls) + len(extra))]
    for key in sorted(rows):
        by_impl, first = rows[key], rows[key]["first"]
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            cells.append("-" if r is None else cell(r) if r["status"] in MEASURED else r["status"])
        if spread:
            timed = [r for r in by_impl.values() if r["status"] in MEASURED and r["p20_ms"]]
            cells.append(f"{max(r['p80_ms'] / r['p20_ms'] for r in timed):.2f}" if timed else "-")
            load = next((r.get("load_avg") for r in timed if r.get("load_avg") is not None), None)
            cells.append("-" if load is None else f"{load:.1f}")
        lines.append(f"| {first['workload']} | {first['dtype']} | {first['batch']}x{first['seq_len']} | "
                     f"{first['fill']} {first['mean_fill']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _time_cell(r: dict) -> str:
    text = f"{_ms(r['median_ms'])} ms"
    if r["impl"] != BASELINE and r["speedup_vs_hf_sdpa"]:
        text += f" **{r['speedup_vs_hf_sdpa']:.2f}x**"
    return text + (" WRONG" if r["status"] == "wrong" else "")


def _error_cell(r: dict) -> str:
    return f"{r['max_abs_err']:.1e}" + (" WRONG" if r["status"] == "wrong" else "")


def _memory_cell(r: dict) -> str:
    return "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"


def _first_call_cell(r: dict) -> str:
    build = f", build {r['build_s']:.1f} s" if r.get("build_s") is not None else ""
    return f"{r['first_call_ms']:.0f} ms{build}" if r["first_call_ms"] is not None else "-"


def not_measured(records: list[dict]) -> list[str]:
    """One line per implementation (and place) that has no valid measurement, with the reason."""
    lines = []
    for r in records:
        if r["status"] == "ok":
            continue
        where = " ".join(x for x in (r["workload"], r["dtype"]) if x)
        if r["batch"] is not None:
            where += f" {r['batch']}x{r['seq_len']} {r['fill']}"
        lines.append(f"- {r['impl']} ({where}): {r['status']}: {r['reason']}")
    return lines


def run_table(records: list[dict]) -> str:
    """The tables the runner prints: times with speedups, errors, then what was not measured and why."""
    parts = ["Median time and speedup over HF SDPA:", _pivot(records, _time_cell, spread=True),
             "Max abs error vs HF eager fp32 on valid tokens:", _pivot(records, _error_cell)]
    missing = not_measured(records)
    if missing:
        parts.append("Not measured or wrong:\n" + "\n".join(missing))
    return "\n\n".join(parts)


def cpu_line(run: dict) -> str:
    """The CPU a run had: vendor, model, which of the recorded ISA flags it has, torch's CPU capability
    (runs recorded before these fields say so)."""
    flags = run.get("cpu_flags") or {}
    known = {k: v for k, v in flags.items() if v is not None}
    if known:
        have = [k for k, v in known.items() if v]
        isa = f"ISA {', '.join(have) or 'none of ' + ', '.join(known)}"
        if have and len(have) < len(known):
            isa += f" (no {', '.join(k for k, v in known.items() if not v)})"
    else:
        isa = "ISA flags not recorded"
    capability = run.get("cpu_capability")
    vendor = run.get("cpu_vendor") or "vendor not recorded"
    return (f"CPU: {run.get('cpu_model') or 'model not recorded'} ({vendor}); {isa}; "
            f"torch CPU capability {capability or 'not recorded'}.")


def _header(run: dict) -> str:
    v = run["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "triton", "onnxruntime") if k in v)
    finished = f"finished {run['finished']}" if run.get("finished") else "INTERRUPTED (partial results)"
    return (f"Device: {run['device_name']} ({run['device']}, {run['num_threads']} threads); started "
            f"{run['started']}, {finished}; commit {run['commit']}; {versions}.")


def summary(documents: list[dict]) -> str:
    run0 = documents[0]["run"]
    parts = [f"# fastbert benchmarks: {run0['device_name']}", cpu_line(run0)]
    for doc in documents:
        run, records = doc["run"], doc["records"]
        flags = " --quick" if run["options"]["quick"] else ""
        header = _header(run)
        if cpu_line(run) != cpu_line(run0):  # runs of another CPU copied into this folder
            header += " " + cpu_line(run)
        parts += [f"## Run `{run['name']}`", header, HOW.format(flags=flags),
                  "### Time (median) and speedup over HF SDPA", _pivot(records, _time_cell, spread=True),
                  "### Max abs error vs HF eager fp32 (valid tokens)", _pivot(records, _error_cell),
                  "### Peak memory growth during one call (MiB)", _pivot(records, _memory_cell),
                  "### First call (torch.compile compiles here) and build (ONNX export and optimisation)",
                  _pivot(records, _first_call_cell)]
        missing = not_measured(records)
        if missing:
            parts += ["### Not measured, failed or wrong", "\n".join(missing)]
        parts.append(f"![speedup]({run['name']}.png)")
    return "\n\n".join(parts) + "\n"


def plot(document: dict, path: Path) -> None:
    """Speedup over HF SDPA against shape: one panel per (workload, dtype) x fill, a line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    records = [r for r in document["records"] if r["status"] in MEASURED and r["batch"] is not None]
    groups = list(dict.fromkeys((r["workload"], r["dtype"]) for r in records))
    fills = [f for f in FILLS if any(r["fill"] == f for r in records)]
    impls = [i for i in _impls(records) if i != BASELINE]
    fig, axes = plt.subplots(len(groups), len(fills), figsize=(4.2 * len(fills), 3.2 * len(groups)),
                             squeeze=False, sharey=True)
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    for row, (workload, dtype) in enumerate(groups):
        mine = [r for r in records if (r["workload"], r["dtype"]) == (workload, dtype)]
        shapes = sorted({(r["batch"] * r["seq_len"], r["batch"], r["seq_len"]) for r in mine})
        x_of = {s[1:]: i for i, s in enumerate(shapes)}
        for col, fill in enumerate(fills):
            ax = axes[row][col]
            ax.axhline(1.0, color="black", linewidth=0.8, label=f"{BASELINE} (1.0)")
            for impl in impls:
                pts = sorted((x_of[(r["batch"], r["seq_len"])], r["speedup_vs_hf_sdpa"], r["status"])
                             for r in mine if r["impl"] == impl and r["fill"] == fill and r["speedup_vs_hf_sdpa"])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[impl], label=impl)
                    wrong = [p for p in pts if p[2] == "wrong"]
                    ax.scatter([p[0] for p in wrong], [p[1] for p in wrong], marker="x", s=80, color="red", zorder=3)
            ax.set_xticks(range(len(shapes)), [f"{b}x{s}" for _, b, s in shapes], fontsize=8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(ticker.FixedLocator(SPEEDUP_TICKS))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{workload} {dtype}, fill: {fill}", fontsize=9)
            if col == 0:
                ax.set_ylabel("speedup over HF SDPA")
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    run = document["run"]
    fig.suptitle(f"{run['device_name']}, {run['num_threads']} threads, run {run['name']} "
                 f"(red x: output flagged wrong)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _order(path: Path) -> tuple:
    return (RUN_ORDER.index(path.stem) if path.stem in RUN_ORDER else len(RUN_ORDER), path.stem)


def render(folder: Path) -> list[Path]:
    """Write ``summary.md`` and one PNG per run JSON in ``folder`` (no PNGs, with a message on
    stderr, where matplotlib is not installed); returns the written paths. JSON files that are
    not runner results (``host-overhead.json``) are left out."""
    runs = [(p, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"), key=_order)]
    runs = [(p, doc) for p, doc in runs if "run" in doc and "records" in doc]
    if not runs:
        raise FileNotFoundError(f"no benchmark results (runner JSON) in {folder}")
    paths, documents = [p for p, _ in runs], [doc for _, doc in runs]
    (folder / "summary.md").write_text(summary(documents))
    written = [folder / "summary.md"]
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: summary written without plots (pip install matplotlib)", file=sys.stderr)
        return written
    for path, document in zip(paths, documents):
        plot(document, path.with_suffix(".png"))
        written.append(path.with_suffix(".png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a results folder, e.g. benchmarks/results/cpu-intel-xeon-processor")
    args = parser.parse_args(argv)
    for path in render(args.folder):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
