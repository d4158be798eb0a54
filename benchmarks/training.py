"""Training-step benchmark: forward + backward + AdamW step, fastbert against Hugging Face.

    python -m benchmarks.training                     # CPU: MiniLM shape, fp32 (and bf16 where the CPU has it)
    python -m benchmarks.training --device cuda       # GPU: BERT-base, fp16 and bf16

A step is ``zero_grad``, the loss of a sequence-classification head on one batch, ``backward``
and ``AdamW.step``, in training mode with the models' own dropout (0.1). Every implementation
starts from the same seeded weights in the same process; their steps are timed in interleaved
rounds (medians, see :mod:`benchmarks.timing`):

- ``fastbert``: ``fastbert.optimize(model)``, padding-free fused training ops;
- ``hf-sdpa``: the untouched model with SDPA attention, the baseline of every speedup;
- ``hf-sdpa-checkpointing``: the same with ``gradient_checkpointing_enable()`` (less memory, more time).

``--trainer`` times the step as HF's ``Trainer`` takes it instead (``training_step``, which passes
``num_items_in_batch`` down to the model and runs the backward through accelerate, then the
optimizer and scheduler step), for ``fastbert`` and ``hf-sdpa``; records say ``"step": "trainer"``.

Batches are right-padded: ``full`` rows, or a fill fraction (e.g. ``0.45``: seeded lengths whose
real tokens are that share of the batch). Before timing, each record checks the step: the loss
and the gradient norm of fastbert against HF SDPA at the same weights with dropout off
(``loss_rel_diff``, ``grad_norm_rel_diff``). Records name the machine and go to
``<out>`` (default ``benchmarks/results/<device folder>/training-<dtype>.json``); a Markdown
table is printed. Low precision trains the model in that dtype (``model.to(dtype)``), as
fastbert computes in the weights' dtype.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import fastbert
from benchmarks import timing
from benchmarks.runner import RESULTS, device_folder, environment
from benchmarks.workloads import BERT_BASE

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
WORKLOADS = {"minilm": MINILM, "bert-base": BERT_BASE}
IMPLS = ("fastbert", "hf-sdpa", "hf-sdpa-checkpointing")
TRAINER_IMPLS = ("fastbert", "hf-sdpa")
BASELINE = "hf-sdpa"
DEFAULTS = {
    "cpu": dict(workloads=("minilm",), dtypes=("float32", "bfloat16"), shapes=((8, 128),), fills=("0.45", "full")),
    "cuda": dict(workloads=("bert-base",), dtypes=("float16", "bfloat16"), shapes=((32, 128),),
                 fills=("0.5", "full")),
}


def batch_lengths(batch: int, seq_len: int, fill: str, seed: int = 0) -> torch.Tensor:
    """Row lengths: all ``seq_len`` for ``full``; else seeded lengths summing to ``fill`` of the batch."""
    if fill == "full":
        return torch.full((batch,), seq_len)
    share = float(fill)
    weights = np.random.default_rng(seed).uniform(0.2, 1.8, size=batch)
    lengths = np.clip(np.rint(weights / weights.mean() * share * seq_len), 1, seq_len)
    return torch.from_numpy(lengths.astype(np.int64))


def make_batch(vocab: int, batch: int, seq_len: int, fill: str, device) -> dict[str, torch.Tensor]:
    lengths = batch_lengths(batch, seq_len, fill)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, seq_len), generator=generator) * mask
    labels = torch.randint(0, 2, (batch,), generator=generator)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def build(workload: str, dtype: torch.dtype, device) -> dict[str, torch.nn.Module]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(**WORKLOADS[workload], num_labels=2, attn_implementation="sdpa")
    base = BertForSequenceClassification(config).to(device=device, dtype=dtype).train()
    models = {"hf-sdpa": base, "fastbert": fastbert.optimize(copy.deepcopy(base)),
              "hf-sdpa-checkpointing": copy.deepcopy(base)}
    models["hf-sdpa-checkpointing"].gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    return models


def _loss_and_grad_norm(model, batch) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return loss.item(), norm.item()


def check(models, batch) -> dict[str, float]:
    """fastbert's loss and gradient norm against HF SDPA's at the same weights, dropout off."""
    for m in models.values():
        m.eval()
    (ours, our_norm), (theirs, their_norm) = (_loss_and_grad_norm(models[n], batch) for n in ("fastbert", BASELINE))
    for m in models.values():
        m.train()
    return {"loss_rel_diff": abs(ours - theirs) / abs(theirs), "grad_norm_rel_diff": abs(our_norm - their_norm) / their_norm}


def step_call(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return step


def trainer_step_call(model, batch, folder: str):
    """One step as ``Trainer``'s loop takes it: ``training_step``, then optimizer and scheduler."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=folder, learning_rate=1e-5, report_to=[], save_strategy="no",
                             use_cpu=next(model.parameters()).device.type == "cpu")
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1 << 30)
    items = batch["labels"].numel()

    def step():
        trainer.training_step(model, batch, torch.tensor(items))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
    return step


def measure(workload: str, dtype_name: str, batch: int, seq_len: int, fill: str, device, budget: float,
            trainer_folder: str | None = None) -> list[dict]:
    """Records per implementation; ``trainer_folder``: steps through HF's ``Trainer`` (its output folder)."""
    dtype = getattr(torch, dtype_name)
    models = build(workload, dtype, device)
    inputs = make_batch(models[BASELINE].config.vocab_size, batch, seq_len, fill, device)
    checked = check(models, inputs)
    impls = TRAINER_IMPLS if trainer_folder else IMPLS
    calls = {name: trainer_step_call(models[name], inputs, trainer_folder) if trainer_folder else
             step_call(models[name], inputs) for name in impls}
    peaks = {name: timing.peak_memory_mb(call, device) for name, call in calls.items()}  # also warms up
    for call in calls.values():
        call()
    samples = timing.interleaved(calls, device, min_reps=5, max_reps=200, budget_s=budget)
    medians = {name: timing.summary(s)["median_ms"] for name, s in samples.items()}
    real = int(inputs["attention_mask"].sum())
    common = dict(step="trainer" if trainer_folder else "loop", workload=workload, dtype=dtype_name, batch=batch,
                  seq_len=seq_len, fill=fill,
                  real_fill=real / (batch * seq_len), rounds=len(samples[BASELINE]), spread=timing.spread(samples),
                  load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return [dict(common, impl=name, **timing.summary(samples[name]), peak_mb=peaks[name],
                 speedup=medians[BASELINE] / medians[name], **(checked if name == "fastbert" else {}))
            for name in impls]


def table(records: list[dict]) -> str:
    lines = ["| workload | dtype | shape | fill | impl | step ms (median) | p20-p80 | speedup vs HF SDPA | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['batch']}x{r['seq_len']} | {r['real_fill']:.2f} | "
                     f"{r['impl']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {peak} |")
    return "\n".join(lines)


def _bf16_fast_here() -> bool:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workload", help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument("--dtype", help="comma-separated: float32, float16, bfloat16")
    p.add_argument("--shapes", help="BATCHxSEQ list, e.g. 8x128")
    p.add_argument("--fills", help="comma-separated: full or a fraction of real tokens, e.g. 0.45,full")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per case (default 10)")
    p.add_argument("--trainer", action="store_true", help="time steps through HF's Trainer (needs accelerate)")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/<device>/training-<dtypes>.json, "
                   "training-trainer-<dtypes>.json with --trainer)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    defaults = DEFAULTS[device.type]
    workloads = args.workload.split(",") if args.workload else defaults["workloads"]
    for name in workloads:
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    dtypes = args.dtype.split(",") if args.dtype else [
        d for d in defaults["dtypes"] if device.type == "cuda" or d != "bfloat16" or _bf16_fast_here()]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else defaults["shapes"]
    fills = args.fills.split(",") if args.fills else defaults["fills"]
    kind = "training-trainer" if args.trainer else "training"
    out = args.out or RESULTS / device_folder(device) / f"{kind}-{'-'.join(dtypes)}.json"
    records = []
    for workload in workloads:
        for dtype in dtypes:
            for batch, seq_len in shapes:
                for fill in fills:
                    print(f"[training] {workload} {dtype} {batch}x{seq_len} fill {fill}", file=sys.stderr, flush=True)
                    with tempfile.TemporaryDirectory() as folder:
                        records += measure(workload, dtype, batch, seq_len, fill, device, args.budget,
                                           folder if args.trainer else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "training-step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), **environment(device), "records": records}
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(table(records))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
