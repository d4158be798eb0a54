"""Backend choice: argument, context manager, environment variable, device default, fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastbert import backends, declarations


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_plan_cache", {})
    monkeypatch.setattr(backends, "_warned", set())


CPU = torch.device("cpu")


def test_every_op_gets_a_backend():
    plan = backends.plan(CPU, "torch")
    assert set(plan) == set(declarations.NAMES) and set(plan.values()) == {"torch"}


def test_precedence_argument_context_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    assert backends.requested_backend() == "cpp"
    with backends.use_backend("torch"):
        assert backends.requested_backend() == "torch"
        assert backends.requested_backend("triton") == "triton"
    assert backends.requested_backend() == "cpp"


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastbert backend"):
        backends.plan(CPU, "cudnn")
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="unknown fastbert backend 'gpu'"):
        backends.requested_backend()


def test_unavailable_backend_falls_back_with_one_warning():
    with pytest.warns(UserWarning, match="backend 'cuda' unavailable.*needs CUDA tensors"):
        plan = backends.plan(CPU, "cuda")
    assert "cuda" not in plan.values()
    backends._plan_cache.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.plan(CPU, "cuda")  # the same reason is not warned twice


@pytest.mark.parametrize("backend,device_type,reason", [
    ("cpp", "cuda", "needs CPU tensors"),
    ("cuda", "cpu", "needs CUDA tensors"),
    ("cpp", "meta", "needs CPU tensors"),
])
def test_load_says_why(backend, device_type, reason):
    with pytest.raises(backends.BackendUnavailable, match=reason):
        backends.load(backend, device_type)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.load("triton", "cpu")
