"""``python -m fastbert.info``: the report, ``--model``, and ``--check`` passing and failing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbert import backends, cpu_gemm, declarations, info, machine, tuning


def test_report_names_the_machine_build_backends_and_cache(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    cpu = machine.cpu()
    assert f"CPU: {cpu['model']} (vendor {cpu['vendor'] or 'unknown'}" in out
    assert f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}" in out
    assert f"versions: torch {torch.__version__}" in out
    assert "cpu cpp: " in out and "cpu torch: available" in out and "cpu default plan: linear=" in out
    assert f"measured choices: cache {tuning.cache_dir()}" in out
    if cpu_gemm.PANELS_AVAILABLE:  # the extension is built: its ISA and kernels are listed
        assert "extension: ISA " in out and "  cpu kernels: linear, attention" in out


def test_model_forward_makes_and_shows_gemm_choices(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_gemm, "TABLE", tuning.Table("cpu_gemm"))  # an empty table, as in a new process
    config = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128)
    transformers.BertModel(config).save_pretrained(tmp_path / "model")
    assert info.main(["--model", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "cpu_gemm linear|float32|192|64|32: " in out  # the fused QKV GEMM at 2 x 16 tokens
    assert "cpu_gemm linear_gelu|float32|128|64|32: " in out
    assert f"measured choices: cache {tmp_path / 'cache'}" in out


def test_check_passes_on_every_available_backend(capsys):
    assert info.main(["--check"]) == 0
    out = capsys.readouterr().out
    for op in declarations.NAMES:
        assert f"check cpu torch {op} (float32): pass" in out


@pytest.mark.parametrize("broken", ["wrong", "crashes"])
def test_check_fails_when_an_op_is_broken(monkeypatch, capsys, broken):
    real = backends.implementation

    def implementation(op, backend, device_type, direct=False):
        function = real(op, backend, device_type, direct)
        if op != "add_layernorm_backward":
            return function
        if broken == "crashes":
            def crash(*args):
                raise RuntimeError("kernel exploded")
            return crash
        return lambda *args: tuple(t * 1.001 for t in function(*args))  # every gradient 0.1 % off

    monkeypatch.setattr(backends, "implementation", implementation)
    assert info.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "check cpu torch add_layernorm_backward (float32): FAIL" in out
    assert "check cpu torch add_layernorm (float32): pass" in out
    if broken == "crashes":
        assert "RuntimeError: kernel exploded" in out


def test_runs_as_a_module():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "fastbert.info"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("fastbert ") and "machine:" in out and "backends:" in out
