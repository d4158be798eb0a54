"""``python -m fastbert.info``: what fastbert will do on this machine, to read or paste into a bug report.

    python -m fastbert.info                      # machine, versions, extension build, backends, cache, choices
    python -m fastbert.info --model PATH_OR_NAME # first one forward of that model, so that its choices are made
    python -m fastbert.info --check              # every op of every available backend against the reference

It prints the machine (CPU vendor, model name as lscpu gives it, ISA flags; the GPU's name and
compute capability), the torch, Triton and transformers versions, the extension build (its
ISA, CUDA or not, which ops have kernels), each backend and why any is unavailable, the cache of
measured choices and the choices made so far (:mod:`fastbert.tuning`). ``--check`` runs every op
each available backend implements on this device, in fp32 on a CPU and in fp16 and bf16 on a
GPU (the inference ops, and the training forwards
without dropout and the backwards), on small awkward shapes (sequence lengths 1, 7 and 70, head
dim 40, hidden sizes that are not powers of two), against the float64 reference: an op passes
when each output's error is at most twice that of the reference computed in the same dtype,
plus a floor. It prints pass or FAIL per op and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from typing import Callable

import torch

from fastbert import backends, declarations, machine, reference, tuning

# The ISA flags that decide which CPU kernels run (fastbert's, oneDNN's, MKL's).
ISA_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx")
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _version(package: str) -> str:
    """The module's own ``__version__`` (torch's carries the build, e.g. ``+cu130``, which its
    package metadata may not), else the package metadata's."""
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "not installed"
    except AttributeError:
        return importlib.metadata.version(package)


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def report() -> list[str]:
    import fastbert

    cpu = machine.cpu()
    isa = [f for f in cpu["flags"] or () if f.startswith(ISA_PREFIXES)]
    lines = [f"fastbert {fastbert.__version__} ({fastbert.__file__})", "machine:",
             f"  CPU: {cpu['model']} (vendor {cpu['vendor'] or 'unknown'}, cpuid family-model "
             f"{cpu['family_model'] or 'unknown'}), torch uses {torch.get_num_threads()} threads",
             f"  ISA flags: {' '.join(isa) if cpu['flags'] is not None else 'unknown'}; torch CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}"]
    if torch.cuda.is_available():
        gpu = machine.gpu(torch.device("cuda"))
        lines.append(f"  GPU: {gpu['name']} (compute capability {gpu['capability']})")
    else:
        lines.append("  GPU: none visible to torch")
    lines.append("versions: " + ", ".join(f"{p} {_version(p)}" for p in ("torch", "triton", "transformers")))
    lines += _extension()
    lines.append("backends:")
    for device in devices():
        for name in backends.BACKENDS:
            try:
                backends.load(name, device.type)
                state = "available"
            except backends.BackendUnavailable as exc:
                state = f"unavailable: {exc}"
            lines.append(f"  {device.type} {name}: {state}")
        plan = backends.plan(device)
        lines.append(f"  {device.type} default plan: " + ", ".join(f"{op}={b}" for op, b in plan.items()
                                                                     if op in declarations.STEPS))
    folder = tuning.cache_dir()
    lines.append(f"measured choices: cache {folder if folder else f'off ({tuning.ENV_VAR})'}")
    made = tuning.decisions()
    for table, entries in made.items():
        for key, entry in entries.items():
            times = entry.get("medians_s") or {}
            shown = ", ".join(f"{o} {t * 1e3:.3f} ms" for o, t in times.items())
            lines.append(f"  {table} {key}: {entry['choice']} ({entry['source']}{'; ' + shown if shown else ''})")
    if not made:
        lines.append("  none made yet in this process (--model runs a forward first)")
    return lines


def _extension() -> list[str]:
    try:
        from fastbert import extension
    except ImportError as exc:
        return [f"extension: not built ({exc})"]
    lines = [f"extension: ISA {extension.CPU_ISA}, CUDA {'yes' if extension.WITH_CUDA else 'no'}"]
    for device_type in ("cpu", "cuda") if extension.WITH_CUDA else ("cpu",):
        ops = declarations.implemented_by("cuda" if device_type == "cuda" else "cpp")
        lines.append(f"  {device_type} kernels: {', '.join(ops)}")
    return lines


# ------------------------------------------------------------------------------ --check
def cases(device: torch.device, dtype: torch.dtype) -> dict[str, list[tuple]]:
    """Arguments (float64, as the reference takes them) of each op on small awkward shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    lengths = [1, 7, 70]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    tokens, heads, head_dim, hidden = int(cu[-1]), 2, 40, 80
    q, k, v = (rand(tokens, heads, head_dim) for _ in range(3))
    mask = torch.arange(70, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    indices = mask.flatten().nonzero().flatten()
    ids = torch.randint(0, 30, (tokens,), generator=g).to(device)
    inference = {
        "linear": [(rand(7, hidden), rand(96, hidden) / 9, rand(96)), (rand(tokens, 256), rand(64, 256) / 16, None)],
        "attention": [(q, k, v, cu, 70, head_dim**-0.5, causal, None) for causal in (False, True)],
        "linear_gelu": [(rand(tokens, hidden), rand(144, hidden) / 9, rand(144), approximate)
                        for approximate in ("none", "tanh")],
        "add_layernorm": [(rand(tokens, hidden), rand(tokens, hidden), rand(hidden), rand(hidden), rand(hidden), 1e-12)],
        "embed_layernorm": [(ids, ids % 70, ids % 2, rand(30, hidden), rand(70, hidden), rand(2, hidden),
                             rand(hidden), rand(hidden), 1e-12)],
        "unpad": [(rand(3, 70, hidden), indices)],
        "pad": [(rand(tokens, hidden), indices, 3, 70)],
    }
    # Training: the forwards without dropout, the backwards from the reference's saved tensors
    # (statistics in fp32, as kernels save them for every dtype).
    attention = (q, k, v, cu, 70, head_dim**-0.5, False, None, None, None, 0.0, None)
    x, w, b = inference["linear_gelu"][0][:3]
    add_ln = inference["add_layernorm"][0] + (0.0, None)
    embed = inference["embed_layernorm"][0] + (0.0, None, 0, -1)
    out, lse = reference.attention_train(*attention)
    pre = reference.linear_gelu_train(x, w, b, "tanh")[1]
    mean, rstd = (t.float() for t in reference.add_layernorm_train(*add_ln)[1:])
    embed_mean, embed_rstd = (t.float() for t in reference.embed_layernorm_train(*embed)[1:])
    lse = lse.float()
    grad = rand(tokens, hidden)
    training = {
        "attention_train": [attention],
        "attention_backward": [(rand(tokens, heads, head_dim), q, k, v, out, lse, *attention[3:])],
        "linear_gelu_train": [(x, w, b, "tanh")],
        "linear_gelu_backward": [(rand(tokens, 144), x, w, pre, "tanh")],
        "add_layernorm_train": [add_ln],
        "add_layernorm_backward": [(grad, *add_ln[:5], mean, rstd, *add_ln[5:])],
        "embed_layernorm_train": [embed],
        "embed_layernorm_backward": [(grad, *embed[:8], embed_mean, embed_rstd, *embed[8:])],
    }
    return {**inference, **training}


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    """The float64 tensors of ``args`` in ``dtype`` (fp32 statistics stay fp32)."""
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a for a in args)


def check_op(function: Callable, reference: Callable, args64: tuple, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``function`` on ``args64`` cast to ``dtype`` is within the rule (module docstring),
    for each of its outputs."""
    def outputs(result):
        return result if isinstance(result, tuple) else (result,)

    with torch.no_grad():
        wants = outputs(reference(*args64))
        peers = outputs(reference(*_cast(args64, dtype)))
        gots = outputs(function(*_cast(args64, dtype)))
    if len(gots) != len(wants):
        return False, f"{len(gots)} outputs, the reference has {len(wants)}"
    details, passed = [], True
    for got, want, peer in zip(gots, wants, peers):
        if got.shape != want.shape:
            return False, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
        err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        bound = 2 * ((peer.double() - want.double()).abs().max().item() if peer.numel() else 0.0) + FLOOR[dtype]
        passed &= err <= bound  # NaN fails
        details.append(f"max error {err:.2e}, allowed {bound:.2e}")
    return passed, "; ".join(details)


# The dtypes --check runs each op in: fp32 on a CPU, the two half-precision types on a GPU.
CHECKED_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float16, torch.bfloat16)}


def check() -> bool:
    """Every op of every available backend on every device here; prints one line per op."""
    ok = True
    for device in devices():
        for name in backends.BACKENDS:
            try:
                module = backends.load(name, device.type)
            except backends.BackendUnavailable as exc:
                print(f"check {device.type} {name}: skipped ({exc})")
                continue
            for dtype, op, arg_sets in ((dtype, op, arg_sets) for dtype in CHECKED_DTYPES[device.type]
                                        for op, arg_sets in cases(device, dtype).items()):
                if not backends.implements(name, module, op, device.type, dtype):
                    continue
                function = backends.implementation(op, name, device.type)
                try:
                    results = [check_op(function, getattr(reference, op), args, dtype) for args in arg_sets]
                    passed, detail = all(r[0] for r in results), "; ".join(r[1] for r in results)
                except Exception as exc:  # a crash is a failure to report, not to hide
                    passed, detail = False, f"{type(exc).__name__}: {exc}"
                ok &= passed
                shown = str(dtype).removeprefix("torch.")
                print(f"check {device.type} {name} {op} ({shown}): {'pass' if passed else 'FAIL'} ({detail})")
    return ok


def run_model(name: str) -> None:
    """One forward of ``name`` (a folder or a hub name), optimized, so that its choices are made."""
    import transformers

    import fastbert

    device = devices()[-1]
    model = fastbert.optimize(transformers.AutoModel.from_pretrained(name).eval().to(device))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbert.info", description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="PATH_OR_NAME", help="run one forward of this model first")
    parser.add_argument("--check", action="store_true", help="check every op of every available backend")
    options = parser.parse_args(argv)
    if options.model:
        run_model(options.model)
    passed = check() if options.check else True
    print("\n".join(report()))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
