"""The op table of fastbert.declarations against what it declares: the references' signatures,
the backends' functions, the fakes' shapes, and the training pairings."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastbert import backends, declarations, info, ops, reference


@pytest.mark.parametrize("op", declarations.OPS, ids=lambda op: op.name)
def test_schema_names_the_references_arguments(op):
    parameters = inspect.signature(getattr(reference, op.name)).parameters
    assert [a.name for a in ops._arguments(op)] == list(parameters)
    defaults = {a.name: a.default_value for a in ops._arguments(op) if a.has_default_value()}
    assert defaults == {n: p.default for n, p in parameters.items() if p.default is not p.empty}


def _module_ops(backend: str) -> set[str]:
    module = backends.load(backend, "cpu")
    return {name for name in declarations.NAMES if hasattr(module, name)}


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_each_backend_has_exactly_the_ops_declared_for_it(backend):
    try:
        found = _module_ops(backend)
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    # The extension's module serves both cpp and cuda (whose ops are a subset of cpp's).
    assert set(declarations.implemented_by("cuda")) <= set(declarations.implemented_by("cpp"))
    assert found == set(declarations.implemented_by(backend))


def test_fakes_give_the_references_shapes_and_dtypes():
    cases = info.cases(torch.device("cpu"), torch.float32)
    assert set(cases) == set(declarations.NAMES)
    for name, arg_sets in cases.items():
        for args in arg_sets:
            want = getattr(reference, name)(*args)
            got = declarations.BY_NAME[name].fake(*args)
            want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
            assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want], name


def test_training_pairings_read_what_the_forward_has():
    for step in declarations.STEPS:
        op = declarations.BY_NAME[step]
        if op.train is None:
            continue
        train = declarations.BY_NAME[op.train]
        backward = declarations.BY_NAME[train.backward]
        forward_names = {a.name for a in ops._arguments(train)}
        results = [r.name for r in torch._C.parse_schema(f"x::{train.name}{train.schema}").returns]
        assert {a.name for a in ops._arguments(backward)} - forward_names - set(results) == {"grad"}
        # The step's arguments lead the training forward's, which adds only what turns training off.
        step_names = [a.name for a in ops._arguments(op)]
        assert [a.name for a in ops._arguments(train)][:len(step_names)] == step_names
        assert forward_names - set(step_names) <= set(declarations.TRAINING_DEFAULTS)
        targets = {n for entry in train.gradients for n in (entry if isinstance(entry, tuple) else (entry,))}
        assert targets <= forward_names
    assert set(declarations.TRAINING_OPS) == {n for op in declarations.OPS if op.backward for n in (op.name, op.backward)}


def test_custom_op_adds_the_backend_after_the_declared_arguments():
    schema = torch.ops.fastbert.attention.default._schema
    assert [a.name for a in schema.arguments][-3:] == ["rel_bias", "positions", "backend"]
    assert schema.arguments[-1].kwarg_only  # after arguments with defaults
    train = torch.ops.fastbert.add_layernorm_train.default._schema
    assert [(a.name, a.kwarg_only) for a in train.arguments][-2:] == [("backend", False), ("backward", False)]
