"""``python -m benchmarks``: fastbert against its peers on BERT workloads (``--kernels``: op microbenchmarks).

    python -m benchmarks --quick                  # MiniLM + a small BERT-base shape: 20 s on 2 idle cores, < 3 min busy
                                                  # (written under benchmarks/results/local/, not committed)
    python -m benchmarks                          # the full grid for the device (CPU: + bf16 BERT-base 1x16 and 8x128, full and uniform)
    python -m benchmarks --impl fastbert-torch,hf-eager --workload minilm --shapes 8x128 --fills skewed
    python -m benchmarks --kernels --device cuda  # each op against its PyTorch equivalent
    python -m benchmarks --dtype bfloat16 --workload bert-base --shapes 8x128 --fills uniform  # bf16, any CPU
    python -m benchmarks.report benchmarks/results/cpu-intel-xeon-processor   # summary.md and plots from the JSON

The exit status is 1 when some implementation's output was flagged wrong.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return names

    return parse


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(b), int(s)) for b, s in (part.lower().split("x") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are BATCHxSEQ separated by commas (e.g. 8x128,1x16), got {text!r}")


def parser() -> argparse.ArgumentParser:
    from benchmarks.peers import PEERS
    from benchmarks.workloads import FILLS, WORKLOADS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="MiniLM and one small BERT-base shape; fastbert, HF SDPA and nested tensors only "
                   "(<= 3 minutes on 2 CPU cores)")
    p.add_argument("--impl", type=_names(tuple(PEERS)), help=f"comma-separated, from: {', '.join(PEERS)} "
                   "(HF SDPA, the baseline, always runs)")
    p.add_argument("--workload", type=_names(tuple(WORKLOADS)), help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument("--dtype", type=_names(("float32", "float16", "bfloat16")),
                   help="comma-separated (default: float32 on CPU, plus bfloat16 at BERT-base 1x16 and 8x128, full "
                   "and uniform, where the CPU has AVX512-BF16 or AMX; float16,bfloat16 on CUDA)")
    p.add_argument("--shapes", type=_shapes, help="BATCHxSEQ list replacing the grid, e.g. 8x128,1x16")
    p.add_argument("--fills", type=_names(FILLS), help=f"comma-separated, from: {', '.join(FILLS)}")
    p.add_argument("--budget", type=float,
                   help="seconds of timed rounds per measurement (default: CPU 4, --quick 1.5; CUDA 1, --quick 0.5)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/cpu-<vendor>-<model> or "
                   "cuda-<gpu>, named after this machine's CPU or GPU; --quick: the same folder under "
                   "benchmarks/results/local/, which git ignores)")
    p.add_argument("--name", help="run name, the JSON's file name in --out (default: full, quick, or partial when "
                   "--impl/--workload/--dtype/--shapes/--fills narrow the run)")
    p.add_argument("--kernels", action="store_true", help="run the op microbenchmarks instead (benchmarks.kernels)")
    return p


# Timed rounds per measurement: seconds of budget, at least / at most this many rounds, attempts
# while the spread is large (see runner.Options). CPU runs are noisy (shared cores) and need long
# budgets; GPU runs are steady and their time is scarce.
TIMING = {
    ("cpu", False): dict(budget_s=4.0, min_reps=5, max_reps=50, attempts=2),
    ("cpu", True): dict(budget_s=1.5, min_reps=3, max_reps=30, attempts=1),
    ("cuda", False): dict(budget_s=1.0, min_reps=10, max_reps=200, attempts=2),
    ("cuda", True): dict(budget_s=0.5, min_reps=10, max_reps=100, attempts=1),
}


def _kernels(args) -> int:
    if importlib.util.find_spec("benchmarks.kernels") is None:
        print("kernel microbenchmarks not available: benchmarks/kernels.py is missing", file=sys.stderr)
        return 2
    argv = ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", ",".join(args.dtype)]
    if args.out:
        argv += ["--out", str(args.out)]
    kernels = importlib.import_module("benchmarks.kernels")
    return kernels.exit_status(kernels.main(argv))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.kernels:
        return _kernels(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2

    from benchmarks import runner
    from benchmarks.workloads import DEFAULT_WORKLOADS, FILLS, QUICK_FILLS, WORKLOADS

    device = torch.device(args.device)
    quick = args.quick
    default_workloads = [w for w in DEFAULT_WORKLOADS if WORKLOADS[w].quick_shapes] if quick else DEFAULT_WORKLOADS
    restricted = any(x is not None for x in (args.impl, args.workload, args.dtype, args.shapes, args.fills))
    options = runner.Options(
        device=device,
        quick=quick,
        impls=args.impl or runner.default_impls(device, quick),
        workloads=args.workload or tuple(default_workloads),
        dtypes=tuple(getattr(torch, d) for d in (args.dtype or runner.DTYPES[device.type])),
        out=args.out or (runner.LOCAL_RESULTS if quick else runner.RESULTS) / runner.device_folder(device),
        run_name=args.name or ("partial" if restricted else "quick" if quick else "full"),
        shapes=args.shapes,
        fills=args.fills or (QUICK_FILLS if quick else FILLS),
        # The default grid's extra slices (bf16 on CPU); --impl alone keeps them, any other narrowing drops them.
        sections=() if quick or any(x is not None for x in (args.workload, args.dtype, args.shapes, args.fills))
        else runner.DEFAULT_SECTIONS[device.type],
        **TIMING[device.type, quick],
    )
    if args.budget is not None:
        options.budget_s = args.budget
    records = runner.main(options)
    return 1 if any(r["status"] == "wrong" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
