"""The standalone encoder: loading without transformers, fast path vs the padded reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastbert import Bert, BertConfig

CONFIG = BertConfig(vocab_size=70, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=100, max_position_embeddings=40, hidden_act="gelu_new", layer_norm_eps=1e-6)


def randomized(model: Bert) -> Bert:
    """Non-default LayerNorm weights and biases, so a skipped term shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("decoder", [False, True])
def test_fast_forward_matches_reference(decoder):
    import dataclasses

    model = randomized(Bert(dataclasses.replace(CONFIG, is_decoder=decoder)))
    input_ids = torch.randint(0, 70, (4, 33))
    mask = torch.arange(33)[None] < torch.tensor([[33], [1], [20], [0]])
    with torch.no_grad():
        fast, fast_pooled = model(input_ids, mask)
        ref, ref_pooled = model.reference_forward(input_ids, mask)
    assert (fast - ref)[mask].abs().max() <= 1e-5
    assert torch.all(fast[~mask] == 0)
    assert (fast_pooled[:3] - ref_pooled[:3]).abs().max() <= 1e-5  # row 3 is all padding


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_folder(tmp_path, fmt):
    import json

    model = randomized(Bert(CONFIG))
    # A BertFor* checkpoint: "bert." prefix, a head weight to be dropped.
    state = {f"bert.{k}": v for k, v in model.state_dict().items()}
    state["cls.predictions.bias"] = torch.zeros(70)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG.__dict__, "model_type": "bert"}))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = Bert.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 70, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_state_dict_that_does_not_fit_is_refused():
    state = Bert(CONFIG).state_dict()
    del state["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match="missing"):
        Bert.from_state_dict(state, CONFIG)


def test_from_hf_matches_hf():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel(transformers.BertConfig(**{k: v for k, v in CONFIG.__dict__.items()})).eval()
    model = Bert.from_hf(hf).eval()
    x = torch.randint(0, 70, (2, 11))
    mask = torch.arange(11)[None] < torch.tensor([[11], [4]])
    with torch.no_grad():
        ref = hf(x, attention_mask=mask)
        fast, pooled = model(x, mask)
    assert (fast - ref.last_hidden_state)[mask].abs().max() <= 1e-5
    assert (pooled - ref.pooler_output).abs().max() <= 1e-5


def test_import_needs_neither_transformers_nor_triton():
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['triton'] = None\n"
        "import torch, fastbert\n"
        "m = fastbert.Bert(fastbert.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, "
        "num_attention_heads=2, intermediate_size=8)).eval()\n"
        "print(m(torch.randint(0, 10, (1, 4)), backend='torch')[0].shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 8])" in result.stdout
