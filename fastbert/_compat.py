"""Differences between the torch and Triton versions fastbert runs on, in one place.

Checked with Triton 3.6 (GPU machines, torch 2.11), 3.8 (CI's CUDA build, torch 2.14) and 3.9
(CPU machines, torch 2.13); 3.8 needed nothing of its own. Ahead-of-time compilation relies on
the ``ASTSource``/``GPUTarget`` API of Triton 3.2 and later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def spill_allowance() -> int:
    """Bytes of register spills the compile check tolerates per kernel for this Triton.

    The shipped configurations spill nothing with Triton 3.6 and 3.9. Triton 3.8 (torch 2.14's)
    allocates registers differently: a few training-kernel and LayerNorm configurations spill
    8-56 bytes there, and which ones varied between two runs; tolerated up to 64 bytes, and
    the compile report shows them.
    """
    import triton

    return 64 if triton.__version__.startswith("3.8") else 0


def gpu_target(arch: int):
    """Triton's compile target for CUDA compute capability ``arch`` (80, 90, ...)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def compile_for(kernel, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int, num_stages: int,
                aligned: tuple[str, ...] = ()):
    """Compile a ``@triton.jit`` kernel for ``arch`` ahead of time; no GPU needed.

    ``signature`` maps each runtime argument to a Triton type ("*fp16", "i32", "fp32", ...);
    ``constexprs`` maps each constexpr argument to its value (an integer argument equal to 1
    belongs here: a launch specialises it as a constant). ``aligned`` names the pointers and
    integers to treat as multiples of 16, as a launch does when they are; without it loads
    cannot vectorise and register use looks far worse than on a real launch. Triton 3.2+ wants
    constexprs in the signature too, marked "constexpr".

    Not possible under ``TRITON_INTERPRET=1``: Triton's language module is then built for the
    interpreter. Compile in a process without it.
    """
    import triton
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("cannot compile for a GPU under TRITON_INTERPRET=1; use a process without it")
    full = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    options = {"num_warps": num_warps, "num_stages": num_stages}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=gpu_target(arch), options=options)


def _nvidia_tool(name: str) -> str | None:
    """A CUDA binary tool (ptxas, cuobjdump) as bundled with Triton, else from PATH."""
    try:
        import triton.backends.nvidia as nvidia

        bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    return shutil.which(name)


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself uses for ``arch`` (newer Tritons use a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return _nvidia_tool("ptxas")


def _run_tool(tool: str | None, *args: str) -> str:
    if tool is None:
        raise RuntimeError(f"CUDA tool for {args[0]!r} not found (neither bundled with Triton nor on PATH)")
    done = subprocess.run([tool, *args], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def resource_usage(compiled) -> dict[str, int]:
    """Registers per thread, shared memory, stack frame and spilled bytes of a compiled kernel.

    Triton learns registers and spills only when it loads the binary onto a GPU, so they are
    read from the cubin with cuobjdump instead; shared memory is Triton's own figure. A stack
    frame is not necessarily a spill, so when there is one, ptxas is run again on the PTX to
    count the spill stores and loads exactly.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", _run_tool(_nvidia_tool("cuobjdump"), "-res-usage", cubin)))
        usage = {"registers": int(fields["REG"]), "shared": int(compiled.metadata.shared),
                 "stack": int(fields["STACK"]) + int(fields["LOCAL"]), "spilled": 0}
        if usage["stack"]:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            arch = re.search(r"^\.target\s+(sm_\w+)", compiled.asm["ptx"], re.MULTILINE).group(1)
            log = _run_tool(_ptxas(compiled.metadata.target.arch), "-v", f"--gpu-name={arch}", ptx,
                            "-o", os.path.join(tmp, "again.cubin"))
            usage["spilled"] = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return usage
