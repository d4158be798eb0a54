"""CPU checks of the extension's performance targets (fp32, BERT-base shapes).

    python -m benchmarks.cpu_targets [--ops] [--model] [--repeats N]

Prints the median time of each contender, measured interleaved in one process, and the ratio
of medians. The baselines: torch eager for the op kernels, Hugging Face BertModel with SDPA
attention for the model. A shared or busy machine makes single numbers noisy; the ratios of
interleaved medians are the figures to quote. The first line names the CPU; a run's output is
kept as ``targets.txt`` in that CPU's results folder (``benchmarks/results/cpu-<vendor>-<model>/``).
Run it as a module, as above: run as a file, it puts benchmarks/ first on sys.path, where
kernels.py shadows the `kernels` package that transformers probes for, and importing BertModel
fails.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F


def _interleaved(contenders: dict, repeats: int, setup=None) -> dict[str, float]:
    """Median seconds per call of each contender, the contenders taking turns.

    ``setup`` (untimed) runs before every call: in-place kernels get fresh inputs each time.
    """
    times = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _report(title: str, medians: dict[str, float], baseline: str) -> None:
    parts = [f"{name} {1e3 * t:.3f} ms" for name, t in medians.items()]
    ratios = [f"{baseline}/{name} = {medians[baseline] / t:.2f}x" for name, t in medians.items() if name != baseline]
    print(f"{title}: {', '.join(parts)}; {', '.join(ratios)}", flush=True)


def ops(repeats: int) -> None:
    from fastbert import extension

    for tokens in (300, 2000):
        H = 768
        x, r = torch.randn(tokens, H), torch.randn(tokens, H)
        w, b = torch.randn(H), torch.randn(H)
        medians = _interleaved({
            "eager": lambda: F.layer_norm(x + r, (H,), w, b, 1e-12),
            "ext": lambda: extension.add_layernorm(x, r, None, w, b, 1e-12),
        }, repeats)
        _report(f"add+LayerNorm T={tokens} H={H}", medians, "eager")

        Fdim = 3072
        fresh, bias = torch.randn(tokens, Fdim), torch.randn(Fdim)
        y = fresh.clone()
        for approximate in ("none", "tanh"):
            # ext works in place on the GEMM output (as linear_gelu uses it): y is restored
            # before each call, or repeated GELUs would drive it into slow denormals.
            medians = _interleaved({
                "eager": lambda: F.gelu(y + bias, approximate=approximate),
                "ext": lambda: torch.ops.fastbert.ext_bias_gelu_(y, bias, approximate),
            }, repeats, setup=lambda: y.copy_(fresh))
            _report(f"bias+GELU({approximate}) T={tokens} F={Fdim}", medians, "eager")


def model(repeats: int, batch: int = 4) -> None:
    import transformers

    import fastbert

    config = transformers.BertConfig(attn_implementation="sdpa")
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    ours = fastbert.optimize(copy.deepcopy(hf), backend="cpp")
    generator = torch.Generator().manual_seed(0)

    def batch_of(lengths: list[int], seqlen: int | None = None) -> dict[str, torch.Tensor]:
        seqlen = seqlen or max(lengths)
        ids = torch.randint(1000, config.vocab_size, (batch, seqlen), generator=generator)
        mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}

    lengths = [torch.randint(16, 129, (batch,), generator=generator).tolist() for _ in range(repeats)]
    workloads = {
        # padding=True: each batch padded to its longest sequence
        "varlen [16,128] padded to longest": [batch_of(n) for n in lengths],
        # padding="max_length": every batch padded to 128
        "varlen [16,128] padded to 128": [batch_of(n, 128) for n in lengths],
        "full 128": [batch_of([128] * batch)] * repeats,
    }
    models = {"hf_sdpa": hf, "fastbert_cpp": ours}
    with torch.inference_mode():
        for title, inputs in workloads.items():
            times = {name: [] for name in models}
            for m in models.values():
                m(**inputs[0])  # warm-up
            for item in inputs:
                for name, m in models.items():
                    start = time.perf_counter()
                    m(**item)
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(t) for name, t in times.items()}
            _report(f"BERT-base batch {batch} {title}", medians, "hf_sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", action="store_true")
    parser.add_argument("--model", action="store_true")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from benchmarks.runner import cpu_info

    cpu = cpu_info()
    isa = ", ".join(flag for flag, present in cpu["cpu_flags"].items() if present) or "ISA flags unknown"
    print(f"{cpu['cpu_model']} ({cpu['cpu_vendor'] or 'vendor unknown'}; {isa}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.ops or not args.model:
        ops(args.repeats)
    if args.model or not args.ops:
        model(args.repeats)


if __name__ == "__main__":
    main()
