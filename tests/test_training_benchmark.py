"""The training-step benchmark (``python -m benchmarks.training``) on a tiny BERT: both step kinds.

Each record checks fastbert's loss against HF's at the same weights before timing; through
``Trainer`` the fused path must run (no fallback warning) with ``num_items_in_batch`` passed down.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks import training

# Slow, out of the fast loop (pytest -m "not slow"): the training benchmark runner.
pytestmark = pytest.mark.slow

pytest.importorskip("transformers")
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


@pytest.mark.parametrize("through_trainer", [False, True])
def test_training_steps_are_timed_and_checked(through_trainer, tmp_path, monkeypatch):
    if through_trainer:
        pytest.importorskip("accelerate")
    monkeypatch.setitem(training.WORKLOADS, "tiny", TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = training.measure("tiny", "float32", 3, 16, "0.5", torch.device("cpu"), 0.0,
                                   str(tmp_path) if through_trainer else None)
    assert not [str(w.message) for w in caught if str(w.message).startswith("fastbert:")]
    expected = training.TRAINER_IMPLS if through_trainer else training.IMPLS
    assert [r["impl"] for r in records] == list(expected)
    assert {r["step"] for r in records} == {"trainer" if through_trainer else "loop"}
    fused = records[0]
    assert fused["loss_rel_diff"] < 1e-5 and fused["grad_norm_rel_diff"] < 1e-4
    assert all(r["median_ms"] > 0 and r["rounds"] >= 5 for r in records)
