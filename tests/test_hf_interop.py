"""Model level, HF interop: what transformers itself does around a model, on an optimized one.

- ``Trainer`` fine-tunes on the fused path (its ``num_items_in_batch`` reaches the backbone)
  with HF's losses;
- no stale weights after ``nn.Module._apply`` replaces parameters without registering them
  (meta device then ``to_empty``; overwrite-on-conversion);
- the config-level output flags are read as HF reads them, set on the config or given;
- the backbone's ``forward`` keeps its signature;
- HF's gradient-checkpointing function (and so its kwargs) is the one called.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import fastbert
from fastbert import encoder, hf
from test_families import PAD, awkward_batch, hf_config, max_error, model_pair, run_fused

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
FAMILIES = ("Bert", "Roberta", "Electra", "Albert", "DistilBert", "MPNet")


def _config(family: str, **overrides):
    if family == "Bert":
        return transformers.BertConfig(vocab_size=99, hidden_size=32, num_attention_heads=2, intermediate_size=37,
                                       num_hidden_layers=2, max_position_embeddings=64, pad_token_id=PAD,
                                       num_labels=2, **overrides)
    return hf_config(family, **overrides)


def _no_dropout(family: str) -> dict:
    if family == "DistilBert":
        return dict(dropout=0.0, attention_dropout=0.0)
    return dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class _Spy:
    """Counts calls of fastbert's encoder (the fused path) while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = encoder.encode

        def encode(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(encoder, "encode", encode)


def _fastbert_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("fastbert:")]


# ----------------------------------------------------------------------------- Trainer


def _trainer_losses(model, tmp_path, data) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=transformers.DataCollatorWithPadding(_Tokenizer()))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


class _Tokenizer:
    """What DataCollatorWithPadding needs of a tokenizer: ``pad`` (right padding with PAD)."""

    padding_side = "right"

    def pad(self, features, return_tensors="pt", **_):
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), PAD)
        mask = torch.zeros(len(features), longest, dtype=torch.long)
        for row, f in enumerate(features):
            ids[row, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[row, :len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


@pytest.mark.parametrize("family", ["Bert", "MPNet"])
def test_trainer_fine_tunes_on_the_fused_path_with_hfs_losses(family, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(PAD + 1, 99, (int(n),), generator=generator).tolist(), "labels": i % 2}
            for i, n in enumerate(torch.randint(3, 17, (16,), generator=generator))]
    config = _config(family, **_no_dropout(family))
    reference = getattr(transformers, f"{family}ForSequenceClassification")(config)
    optimized = fastbert.optimize(copy.deepcopy(reference))
    expected = _trainer_losses(reference, tmp_path / "hf", data)
    spy = _Spy(monkeypatch)
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _trainer_losses(optimized, tmp_path / "fastbert", data)
    assert not _fastbert_warnings(caught)
    assert spy.calls >= 4  # every step ran fused
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("keyword", ["num_items_in_batch", "shift_labels"])
def test_loss_only_keywords_run_fused(keyword, monkeypatch):
    ref, fast = model_pair("Roberta", "Model", hf_config("Roberta"))
    ids, mask = awkward_batch()
    spy = _Spy(monkeypatch)
    out = run_fused(fast, ids, attention_mask=mask, **{keyword: torch.tensor(3)})
    assert spy.calls == 1
    with torch.no_grad():
        assert max_error(ref(ids, attention_mask=mask), out, mask.bool()) <= ATOL


# ----------------------------------------------------------------------------- parameters replaced by _apply


def _assert_matches(model, reference):
    ids, mask = awkward_batch()
    out = run_fused(model.eval(), ids, attention_mask=mask)
    with torch.no_grad():
        assert max_error(reference.eval()(ids, attention_mask=mask), out, mask.bool()) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_then_to_empty_then_load_state_dict(family):
    config = _config(family)
    reference = getattr(transformers, f"{family}Model")(config)
    with torch.device("meta"):
        model = getattr(transformers, f"{family}Model")(config)
    fastbert.optimize(model)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    _assert_matches(model, reference)


@pytest.fixture
def overwrite_on_conversion():
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    yield
    torch.__future__.set_overwrite_module_params_on_conversion(False)


@pytest.mark.parametrize("overwrite", [False, True])
def test_dtype_round_trip_then_load_state_dict(overwrite, request):
    if overwrite:
        request.getfixturevalue("overwrite_on_conversion")
    first, model = model_pair("MPNet", "Model", hf_config("MPNet"))
    # New random weights, made first: building a model registers parameters, which alone rebuilds views.
    others = [transformers.MPNetModel(hf_config("MPNet")) for _ in range(2)]
    _assert_matches(model, first)  # the view and the derived weights exist before the swaps
    for convert, other in zip((lambda m: m.double().float(), lambda m: m.to(torch.bfloat16).to(torch.float32)),
                              others):
        convert(model)
        model.load_state_dict(other.state_dict())
        _assert_matches(model, other)


# ----------------------------------------------------------------------------- output flags


def _flagged(family: str, config, flag: str, value: bool, where: str):
    """(HF model, optimized copy, the keywords to call with): ``flag`` set on both configs, or given."""
    reference, model = model_pair(family, "Model", config)
    if where == "config":
        for m in (reference, model):
            setattr(m.config, flag, value)
        return reference, model, {}
    return reference, model, {flag: value}



@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["config", "keyword"])
def test_output_attentions_falls_back_with_a_warning(family, where):
    config = _config(family)
    config._attn_implementation = "eager"  # HF returns attentions only from its eager attention
    reference, model, given = _flagged(family, config, "output_attentions", True, where)
    ids, mask = awkward_batch()
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model(ids, attention_mask=mask, **given)
        expected = reference(ids, attention_mask=mask, **given)
    assert any("output_attentions" in w for w in _fastbert_warnings(caught))
    assert out.attentions is not None and len(out.attentions) == len(expected.attentions)
    for a, b in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["config", "keyword"])
def test_output_hidden_states_runs_fused(family, where, monkeypatch):
    reference, model, given = _flagged(family, _config(family), "output_hidden_states", True, where)
    ids, mask = awkward_batch()
    spy = _Spy(monkeypatch)
    out = run_fused(model, ids, attention_mask=mask, **given)
    assert spy.calls == 1
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, **given)
    assert out.hidden_states is not None and len(out.hidden_states) == len(expected.hidden_states)
    assert max_error(expected, out, mask.bool()) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["config", "keyword"])
def test_return_dict_false_returns_a_tuple(family, where):
    reference, model, given = _flagged(family, _config(family), "return_dict", False, where)
    ids, mask = awkward_batch()
    out = run_fused(model, ids, attention_mask=mask, **given)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, **given)
    assert isinstance(out, tuple) and isinstance(expected, tuple)
    assert len(out) == len([e for e in expected if e is not None])
    valid = mask.bool()
    torch.testing.assert_close(out[0][valid], expected[0][valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("where", ["config", "keyword"])
def test_use_cache_on_a_decoder_runs_fused_with_one_warning(where, monkeypatch):
    config = _config("Bert", is_decoder=True)
    config.use_cache = where == "config"
    _, model = model_pair("Bert", "LMHeadModel", config)
    ids, mask = awkward_batch()
    given = {} if where == "config" else dict(use_cache=True)
    spy = _Spy(monkeypatch)
    hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(ids, attention_mask=mask, **given)
        model(ids, attention_mask=mask, **given)
        model(ids, attention_mask=mask, use_cache=False)
    assert spy.calls == 3
    messages = _fastbert_warnings(caught)
    assert len(messages) == 1 and "use_cache" in messages[0], messages


# ----------------------------------------------------------------------------- signature, checkpointing


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_keeps_its_signature(family):
    model = getattr(transformers, f"{family}Model")(_config(family))
    before = inspect.signature(model.forward)
    fastbert.optimize(model)
    assert inspect.signature(model.forward) == before
    assert "input_ids" in before.parameters and "attention_mask" in before.parameters
    fastbert.unoptimize(model)
    assert inspect.signature(model.forward) == before


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hfs_checkpoint_function_and_its_kwargs_are_used(use_reentrant, monkeypatch):
    reference, model = model_pair("Bert", "ForSequenceClassification", _config("Bert", **_no_dropout("Bert")))
    seen = []
    modeling_utils = transformers.modeling_utils
    original = modeling_utils.checkpoint

    def checkpoint(function, *args, **kwargs):
        seen.append(kwargs.get("use_reentrant"))
        return original(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", checkpoint)
    for m in (reference, model):  # HF binds its checkpoint function to each layer here
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids, mask = awkward_batch()
    mask[1] = 1  # the pooler reads the first token: a real one in every row (pad rows are zero by design)
    labels = torch.tensor([0, 1, 1, 0])
    losses = []
    for m in (reference, model):
        seen.clear()
        loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        assert seen == [use_reentrant] * 2  # one call per layer, with HF's kwargs
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    grads = [dict((n, p.grad) for n, p in m.named_parameters() if p.grad is not None) for m in (reference, model)]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3)
