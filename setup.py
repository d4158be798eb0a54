"""Build script for fastbert; metadata lives in pyproject.toml.

Builds the compiled extension ``fastbert._C`` (csrc/) when PyTorch is importable at build time:
CPU kernels always, CUDA kernels too when PyTorch has CUDA and a CUDA toolkit is found. Without
PyTorch at build time (e.g. an isolated build) the package installs without the extension, and
fastbert falls back to its other backends with a warning. Install with the torch you run on::

    pip install --no-build-isolation -e .

The build logs (``fastbert setup: ...``; ``pip install -v`` shows them) which kernels it builds:
the CPU instruction set, the CUDA architectures and toolkit, or why the CUDA kernels are left
out.

The CUDA toolkit is, first match wins: ``CUDA_HOME`` or ``CUDA_PATH`` when set (taken as
given: if it is no toolkit, no CUDA kernels); the toolkit of the
``nvcc`` on ``PATH``, following symlinks and asking ``nvcc`` itself when it is a wrapper script;
``/usr/local/cuda``, the newest ``/usr/local/cuda-*``, ``/opt/cuda``. A candidate counts only
if it has ``bin/nvcc`` and ``include/cuda_runtime.h``. The choice is handed to PyTorch's
``cpp_extension`` as ``CUDA_HOME``; its own guess (the directory above ``nvcc``'s) is wrong
wherever ``nvcc`` on ``PATH`` is a link or wrapper, as ``/usr/local/bin/nvcc`` often is.

Environment variables:

- ``FASTBERT_SKIP_EXT=1``: do not build the extension.
- ``FASTBERT_CPU_ISA``: instruction set of the CPU kernels (at::vec width): ``avx512``,
  ``avx2`` or ``default`` (portable, narrow). Unset: the best one the build machine supports.
  On a CPU without that instruction set the ``cpp`` backend reports itself unavailable (one
  warning, fallback to ``torch``).
- ``FASTBERT_CUDA_ARCH``: CUDA compute capabilities, ``;``-separated (default ``8.0;9.0``);
  the last one also ships as PTX, so newer GPUs can JIT-compile it.
- ``FASTBERT_NO_CUDA=1``: CPU kernels only, even where CUDA is available.
- ``FASTBERT_REQUIRE_CUDA=1``: fail the build, saying why, unless the CUDA kernels are built
  (rather than building CPU kernels only when torch has no CUDA, no toolkit is found, or
  ``FASTBERT_NO_CUDA=1``). For GPU machines and CI, where a CPU-only build is a mistake.
- ``CUDA_HOME`` / ``CUDA_PATH``: the CUDA toolkit to build with (see above).
- ``MAX_JOBS``: parallel compile jobs (read by PyTorch's ninja build; default: all cores).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
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


def _cuda_archs() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("FASTBERT_CUDA_ARCH", "8.0;9.0").replace(",", ";").split(";")]
    return [a for a in archs if a]


def _gencode_flags() -> list[str]:
    archs = _cuda_archs()
    flags = [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in archs]
    if archs:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


# ---------------------------------------------------------------------------------------------
# Finding the CUDA toolkit. Standard library only, and no torch: it runs before torch's
# cpp_extension is imported, which reads CUDA_HOME once, at import time.

def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).name))


# Where a toolkit usually lives when neither CUDA_HOME nor nvcc on PATH says.
COMMON_CUDA_HOMES = (
    "/usr/local/cuda",
    *sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True),
    "/opt/cuda",
)


def is_cuda_toolkit(home) -> bool:
    """Whether ``home`` holds a CUDA toolkit fastbert can build with (nvcc and the runtime headers)."""
    home = Path(home)
    return os.access(home / "bin" / "nvcc", os.X_OK) and (home / "include" / "cuda_runtime.h").is_file()


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root ``nvcc`` reports for itself (``#$ TOP=...`` in a dry run), if any.

    Sees through wrapper scripts (``exec /usr/local/cuda-X/bin/nvcc "$@"``), which symlink
    resolution cannot.
    """
    try:
        done = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", done.stdout + done.stderr, re.MULTILINE)
    return match.group(1).strip() if match else None


def find_cuda_home(environ=None, common=None) -> tuple[str | None, str]:
    """The CUDA toolkit to build with, as ``(path or None, how it was found or why none was)``.

    First match wins: ``CUDA_HOME``, ``CUDA_PATH`` (taken as given: when it is not a toolkit
    the answer is None, never a guess elsewhere); the toolkit of ``nvcc`` on ``PATH``, its
    symlinks resolved, else as ``nvcc`` itself reports it; the ``common`` locations (default
    :data:`COMMON_CUDA_HOMES`). Only a directory passing :func:`is_cuda_toolkit` is returned;
    found ones come back with symlinks resolved (``/usr/local/cuda`` -> ``/usr/local/cuda-13.0``).
    """
    environ = os.environ if environ is None else environ
    common = COMMON_CUDA_HOMES if common is None else common
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            home = environ[var]
            if is_cuda_toolkit(home):
                return home, f"{var}={home}"
            return None, f"{var}={home} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h there)"
    tried = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc:
        home = str(Path(nvcc).resolve().parent.parent)
        if is_cuda_toolkit(home):
            return home, f"nvcc on PATH ({nvcc})"
        top = _nvcc_top(nvcc)
        if top and is_cuda_toolkit(top):
            return str(Path(top).resolve()), f"nvcc on PATH ({nvcc}, a wrapper of {Path(top).resolve()}/bin/nvcc)"
        tried.append(f"nvcc on PATH ({nvcc}) has no toolkit around it")
    else:
        tried.append("no nvcc on PATH")
    for home in common:
        if is_cuda_toolkit(home):
            return str(Path(home).resolve()), f"the usual location {home}"
    tried.append(f"none of {', '.join(common)}" if common else "no usual locations")
    return None, "no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset; " + "; ".join(tried) + "); set CUDA_HOME"


def _nvcc_release(home: str) -> str:
    try:
        done = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return "?"
    match = re.search(r"release (\d+\.\d+)", done.stdout)
    return match.group(1) if match else "?"


# ---------------------------------------------------------------------------------------------

def _require_cuda() -> bool:
    return os.environ.get("FASTBERT_REQUIRE_CUDA", "0") == "1"


def _no_cuda_kernels(why: str) -> None:
    """Log why the CUDA kernels are not built, or fail the build if FASTBERT_REQUIRE_CUDA=1."""
    if _require_cuda():
        raise SystemExit(f"fastbert setup: FASTBERT_REQUIRE_CUDA=1, but the CUDA kernels would not be built: {why}")
    _log(f"no CUDA kernels: {why}")


def _extensions() -> tuple[list, dict]:
    if os.environ.get("FASTBERT_SKIP_EXT", "0") == "1":
        _no_cuda_kernels("FASTBERT_SKIP_EXT=1")
        _log("FASTBERT_SKIP_EXT=1: not building fastbert._C")
        return [], {}

    try:
        import torch
    except ImportError:
        _no_cuda_kernels("torch is not importable at build time")
        _log("torch is not importable at build time: not building fastbert._C (install torch, then "
             "pip install --no-build-isolation .)")
        return [], {}

    cuda_home = why = None
    if os.environ.get("FASTBERT_NO_CUDA", "0") == "1":
        why = "FASTBERT_NO_CUDA=1"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} has no CUDA"
    else:
        cuda_home, found = find_cuda_home()
        if cuda_home is None:
            why = found
        else:
            # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, then.
            os.environ["CUDA_HOME"] = cuda_home
    if why is not None:
        _no_cuda_kernels(why)
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home  # in case something imported cpp_extension before us

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

    if why is None:
        cuda_dir = HERE / CSRC / "cuda"
        sources += sorted(str(p.relative_to(HERE)) for p in [*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")])
        nvcc = ["-O3", "-DFASTBERT_WITH_CUDA", *_gencode_flags()]
        ext = cpp_extension.CUDAExtension(
            "fastbert._C", sources, extra_compile_args={"cxx": [*cxx, "-DFASTBERT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
        archs = _cuda_archs()
        _log(f"building fastbert._C with CPU kernels ({isa}) and CUDA kernels for "
             f"{', '.join('sm_' + a for a in archs)}{f' (+ PTX for compute_{archs[-1]})' if archs else ''}")
        _log(f"CUDA toolkit {cuda_home} (nvcc {_nvcc_release(cuda_home)}; found via {found}); "
             f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    else:
        ext = cpp_extension.CppExtension("fastbert._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
        _log(f"building fastbert._C with CPU kernels ({isa}) only")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def main() -> None:
    ext_modules, cmdclass = _extensions()
    setup(packages=find_packages(include=["fastbert", "fastbert.*"]), ext_modules=ext_modules, cmdclass=cmdclass)


# setuptools runs this file as __main__ (``python setup.py``, pip's build backend); tests import
# it under another name to check find_cuda_home without building.
if __name__ == "__main__":
    main()
