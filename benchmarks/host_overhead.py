"""Host overhead of a forward: what fastbert costs the CPU besides its kernels.

    python -m benchmarks.host_overhead                 # CPU, 1 thread; writes benchmarks/results/cpu-<cpu>/host-overhead.json
    python -m benchmarks.host_overhead --device cuda   # the same on a GPU (host-bound: the GPU keeps up)

Two figures, each from interleaved rounds (medians) in one process:

- **tiny model**: a 12-layer BERT with hidden size 32 (its kernels take next to nothing, so a
  forward's time is its host overhead), fastbert against HF SDPA on the same weights and a
  tokenizer-style batch (0/1 int64 mask, token types): the time ratio fastbert / HF SDPA.
- **BERT-base, kernels stubbed**: fastbert's forward over BERT-base weights with every kernel
  (GEMMs included) replaced by a stub that returns a ready tensor of its output's shape: the
  host time of everything else (input checks, the readback, packing, dispatch, the Python
  around it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

import fastbert
from benchmarks import timing
from benchmarks.runner import RESULTS, device_folder, environment
from fastbert import ops


def tokenizer_batch(vocab: int, batch: int, seqlen: int, device) -> dict[str, torch.Tensor]:
    """Right-padded rows filled to about half on average, as a tokenizer returns them."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(seqlen // 4, seqlen + 1, (batch,), generator=generator)
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (batch, seqlen), generator=generator) * mask
    types = (torch.arange(seqlen)[None] >= lengths[:, None] // 2).long() * mask
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, token_type_ids=types).items()}


def _bert(device, **config) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**config), add_pooling_layer=False).eval().to(device)
    model.config._attn_implementation = "sdpa"
    return model


def _stub_kernels() -> ops.Kernels:
    """Kernels that compute nothing: each returns a tensor of its output's shape, made once.

    Allocating a fresh output would time the allocator (large CPU blocks are mmap'ed anew each
    call), which is not host overhead of fastbert's.
    """
    made: dict[tuple, torch.Tensor] = {}

    def output(like: torch.Tensor, *shape: int) -> torch.Tensor:
        key = (like.dtype, like.device, shape)
        if key not in made:
            made[key] = like.new_empty(shape)
        return made[key]

    return ops.Kernels(
        linear=lambda x, w, b=None: output(x, x.shape[0], w.shape[0]),
        attention=lambda q, k, v, *rest: output(q, *q.shape),
        linear_gelu=lambda x, w, b, approximate: output(x, x.shape[0], w.shape[0]),
        add_layernorm=lambda x, *rest: output(x, *x.shape),
        embed_layernorm=lambda ids, pos, types, words, *rest: output(words, ids.shape[0], words.shape[1]),
        unpad=lambda x, indices: output(x, indices.shape[0], *x.shape[2:]),
        pad=lambda x, indices, batch, seqlen: output(x, batch, seqlen, *x.shape[1:]),
    )


def _time(calls: dict, device: torch.device, budget_s: float) -> dict[str, float]:
    """Median µs per call of each of ``calls``, interleaved."""
    with torch.no_grad():
        for call in calls.values():  # warm-up
            for _ in range(20):
                call()
        samples = timing.interleaved(calls, device, min_reps=50, max_reps=100_000, budget_s=budget_s)
    return {name: statistics.median(ms) * 1e3 for name, ms in samples.items()}


def measure(device: torch.device, budget_s: float) -> dict:
    tiny = _bert(device, vocab_size=1000, hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                 intermediate_size=128)
    ours = fastbert.optimize(copy.deepcopy(tiny))
    batch = tokenizer_batch(1000, 4, 32, device)
    tiny_us = _time({"fastbert": lambda: ours(**batch), "hf_sdpa": lambda: tiny(**batch)}, device, budget_s)

    base = fastbert.optimize(_bert(device))
    base_batch = tokenizer_batch(30522, 8, 128, device)
    stubs = _stub_kernels()
    real = ops.kernels
    ops.kernels = lambda *args, **kwargs: stubs
    try:
        stubbed_us = _time({"fastbert": lambda: base(**base_batch)}, device, budget_s)["fastbert"]
    finally:
        ops.kernels = real
    return {
        "tiny_model": {"config": "12 layers, hidden 32, 2 heads, batch 4x32 (tokenizer-style)",
                       "fastbert_us": tiny_us["fastbert"], "hf_sdpa_us": tiny_us["hf_sdpa"],
                       "ratio": tiny_us["fastbert"] / tiny_us["hf_sdpa"]},
        "bert_base_stubbed": {"config": "BERT-base weights, batch 8x128 (tokenizer-style), every kernel stubbed",
                              "fastbert_host_us": stubbed_us},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: host overhead is serial)")
    p.add_argument("--budget", type=float, default=5.0, help="seconds of timed rounds per figure")
    p.add_argument("--out", type=Path, help="result file (default: benchmarks/results/<device folder>/host-overhead.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    result = {"date": datetime.date.today().isoformat(), **env, **measure(device, args.budget)}
    out = args.out or RESULTS / device_folder(device) / "host-overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    t, s = result["tiny_model"], result["bert_base_stubbed"]
    print(f"{env['device_name']}, {torch.get_num_threads()} thread(s)")
    print(f"tiny model: fastbert {t['fastbert_us']:.0f} us, HF SDPA {t['hf_sdpa_us']:.0f} us, ratio {t['ratio']:.2f}")
    print(f"BERT-base, kernels stubbed: {s['fastbert_host_us']:.0f} us of host time per forward")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
