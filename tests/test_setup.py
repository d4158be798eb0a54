"""setup.py's build decisions, without building: which CUDA toolkit it finds, and that
FASTBERT_REQUIRE_CUDA=1 fails a build that would have no CUDA kernels.

The toolkit search runs on fake toolkits in a temporary directory (an ``nvcc`` that is a shell
script), plus once on this machine's real one where it has ``/usr/local/bin/nvcc``.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Slow, out of the fast loop (pytest -m "not slow"): runs setup.py.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastbert_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


setup_py = _load_setup()


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _toolkit(root: Path) -> Path:
    """A fake toolkit: include/cuda_runtime.h and a bin/nvcc that answers --dryrun as nvcc does."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    _executable(root / "bin" / "nvcc", f'#!/bin/sh\necho "#$ TOP={root}/bin/.." >&2\n')
    return root


def test_a_symlinked_nvcc_resolves_to_its_toolkit(tmp_path):
    home = _toolkit(tmp_path / "cuda-12.8")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    found, how = setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}, common=())
    assert found == str(home.resolve()), how
    assert "nvcc on PATH" in how


def test_a_wrapper_script_nvcc_is_asked_for_its_toolkit(tmp_path):
    home = _toolkit(tmp_path / "cuda-13.0")
    _executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    found, how = setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}, common=())
    assert found == str(home.resolve()), how
    assert "wrapper" in how


def test_an_nvcc_without_toolkit_headers_is_not_taken(tmp_path):
    _executable(tmp_path / "bin" / "nvcc", "#!/bin/sh\n")  # says nothing about where it lives
    found, how = setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}, common=())
    assert found is None
    assert "no CUDA toolkit found" in how and "CUDA_HOME" in how


def test_usual_locations_come_after_nvcc_on_path(tmp_path):
    usual = _toolkit(tmp_path / "usr-local-cuda")
    assert setup_py.find_cuda_home({"PATH": ""}, common=[str(usual)])[0] == str(usual.resolve())
    other = _toolkit(tmp_path / "cuda-on-path")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(other / "bin" / "nvcc")
    assert setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}, common=[str(usual)])[0] == str(other.resolve())


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_cuda_home_is_honoured_over_nvcc_on_path(var, tmp_path):
    chosen = _toolkit(tmp_path / "chosen")
    on_path = _toolkit(tmp_path / "on-path")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(on_path / "bin" / "nvcc")
    found, how = setup_py.find_cuda_home({var: str(chosen), "PATH": str(tmp_path / "bin")}, common=())
    assert (found, how) == (str(chosen), f"{var}={chosen}")


def test_a_cuda_home_that_is_no_toolkit_is_not_second_guessed(tmp_path):
    on_path = _toolkit(tmp_path / "on-path")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(on_path / "bin" / "nvcc")
    found, how = setup_py.find_cuda_home({"CUDA_HOME": str(tmp_path / "empty"), "PATH": str(tmp_path / "bin")},
                                         common=[str(on_path)])
    assert found is None
    assert "is not a CUDA toolkit" in how


@pytest.mark.skipif(not (Path("/usr/local/bin/nvcc").exists() and Path("/usr/local/cuda-13.0/bin/nvcc").exists()),
                    reason="this machine has no /usr/local/bin/nvcc with a /usr/local/cuda-13.0 toolkit")
def test_this_machines_nvcc():
    # /usr/local/bin/nvcc is a symlink or a wrapper: torch's own guess, the directory above
    # it (/usr/local), has no cuda_runtime.h.
    found, how = setup_py.find_cuda_home({"PATH": "/usr/local/bin"}, common=())
    assert found == str(Path("/usr/local/cuda-13.0").resolve()), how


def _run_setup(**env) -> subprocess.CompletedProcess:
    """``python setup.py --version`` under ``env``: decides what to build, then builds nothing."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FASTBERT_")}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env={**environ, **env},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a torch without CUDA")
def test_require_cuda_fails_with_a_cpu_torch():
    done = _run_setup(FASTBERT_REQUIRE_CUDA="1")
    assert done.returncode != 0
    assert "FASTBERT_REQUIRE_CUDA=1, but the CUDA kernels would not be built" in done.stderr
    assert f"torch {torch.__version__} has no CUDA" in done.stderr


def test_require_cuda_fails_with_no_cuda():
    done = _run_setup(FASTBERT_REQUIRE_CUDA="1", FASTBERT_NO_CUDA="1")
    assert done.returncode != 0
    assert "FASTBERT_REQUIRE_CUDA=1, but the CUDA kernels would not be built: FASTBERT_NO_CUDA=1" in done.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a torch with CUDA")
def test_require_cuda_fails_without_a_toolkit(tmp_path):
    done = _run_setup(FASTBERT_REQUIRE_CUDA="1", CUDA_HOME=str(tmp_path))
    assert done.returncode != 0
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in done.stderr


def test_without_require_cuda_the_build_goes_on_and_says_what_it_builds():
    done = _run_setup(FASTBERT_NO_CUDA="1")
    assert done.returncode == 0, done.stderr
    assert "fastbert setup: no CUDA kernels: FASTBERT_NO_CUDA=1" in done.stderr
    assert "building fastbert._C with CPU kernels" in done.stderr

