"""Build script for fastbert; metadata lives in pyproject.toml.

Builds the compiled extension ``fastbert._C`` (csrc/) when PyTorch is importable at build time:
CPU kernels always, CUDA kernels too when PyTorch has CUDA and nvcc is found. Without PyTorch
at build time (e.g. an isolated build) the package installs without the extension, and fastbert
falls back to its other backends with a warning. Install with the torch you run on::

    pip install --no-build-isolation -e .

Environment variables:

- ``FASTBERT_SKIP_EXT=1``: do not build the extension.
- ``FASTBERT_CPU_ISA``: instruction set of the CPU kernels (at::vec width): ``avx512``,
  ``avx2`` or ``default`` (portable, narrow). Unset: the best one the build machine supports.
  On a CPU without that instruction set the ``cpp`` backend reports itself unavailable (one
  warning, fallback to ``torch``).
- ``FASTBERT_CUDA_ARCH``: CUDA compute capabilities, ``;``-separated (default ``8.0;9.0``);
  the last one also ships as PTX, so newer GPUs can JIT-compile it.
- ``FASTBERT_NO_CUDA=1``: CPU kernels only, even where CUDA is available.
- ``MAX_JOBS``: parallel compile jobs (read by PyTorch's ninja build; default: all cores).
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
CSRC = "csrc"

# -m flags and at::vec capability macro for each CPU instruction set.
CPU_ISAS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def _log(message: str) -> None:
    print(f"fastbert setup: {message}", file=sys.stderr)


def _host_isa() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "avx2"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"


def _cpu_isa() -> str:
    isa = os.environ.get("FASTBERT_CPU_ISA") or _host_isa()
    if isa not in CPU_ISAS:
        raise SystemExit(f"FASTBERT_CPU_ISA must be one of {sorted(CPU_ISAS)}, got {isa!r}")
    return isa


def _gencode_flags() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("FASTBERT_CUDA_ARCH", "8.0;9.0").replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    flags = [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in archs]
    if archs:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def _extensions() -> tuple[list, dict]:
    if os.environ.get("FASTBERT_SKIP_EXT", "0") == "1":
        _log("FASTBERT_SKIP_EXT=1: not building fastbert._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time: not building fastbert._C (install torch, then "
             "pip install --no-build-isolation .)")
        return [], {}

    isa = _cpu_isa()
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / CSRC / "cpu").glob("*.cpp"))
    sources.append(f"{CSRC}/registration.cpp")
    cxx = ["-O3", *CPU_ISAS[isa], f'-DFASTBERT_CPU_ISA="{isa}"']
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is inline: without OpenMP here it runs serially. The library this
        # links (libgomp.so.1) resolves to the one torch has already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FASTBERT_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        cuda_dir = HERE / CSRC / "cuda"
        sources += sorted(str(p.relative_to(HERE)) for p in [*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")])
        nvcc = ["-O3", "-DFASTBERT_WITH_CUDA", *_gencode_flags()]
        ext = cpp_extension.CUDAExtension(
            "fastbert._C", sources, extra_compile_args={"cxx": [*cxx, "-DFASTBERT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
        _log(f"building fastbert._C with CPU ({isa}) and CUDA kernels ({' '.join(_gencode_flags())})")
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found or FASTBERT_NO_CUDA=1"
        ext = cpp_extension.CppExtension("fastbert._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
        _log(f"building fastbert._C with CPU kernels ({isa}) only: {why}")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(packages=find_packages(include=["fastbert", "fastbert.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
