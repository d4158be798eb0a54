"""transformers' own common model tests (``ModelTesterMixin``) on optimized models of every family.

The source distribution of the installed transformers ships its common test files
(``tests/test_modeling_common.py`` and its helpers) but not the per-model testers under
``tests/models/``. They are fetched once per version (``pip download`` of the sdist, into
``.cache/hf-tests/`` or ``$FASTBERT_HF_TESTS_DIR``); this file brings its own small tester per
family (sizes, a config, inputs). Two mixins that module imports are not in the sdist
(``ExportTesterMixin``, ``GenerationTesterMixin``): empty stand-ins take their place, so their
tests (torch.export, generation) are not run here.

Every backbone a test builds is optimized as HF finishes building it (``post_init``), so each
forward runs fastbert's fused path or its documented fallback, and loaded or re-initialized
weights reach it as they reach HF. :data:`BY_DESIGN` lists the tests that fail by design, with
the families and the reason; they must fail (an unexpected pass fails the run, so the list stays true), and
any other failure fails the suite. ``FASTBERT_HF_SUITE_BASELINE=1`` runs the same tests without
fastbert, to tell an upstream failure from ours.

Without network the sources cannot be fetched: the module skips, except under CI (``CI`` set),
where that is an error.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert import views

transformers = pytest.importorskip("transformers")
pytest.importorskip("parameterized")  # test_modeling_common imports it

pytestmark = pytest.mark.slow

PACKAGE = "hf_common_tests"  # the sdist's tests/ folder, importable under this name
STAND_INS = {  # modules test_modeling_common imports that the sdist does not ship
    "exporters/test_export.py": "class ExportTesterMixin:\n    \"\"\"Not in the sdist: no export tests.\"\"\"\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    \"\"\"Not in the sdist: no generation tests.\"\"\"\n",
}


def _fetch(version: str, into: Path) -> None:
    """The sdist's top-level test files as the package ``into / PACKAGE``, written atomically."""
    with tempfile.TemporaryDirectory(dir=into.parent) as scratch:
        scratch = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"transformers=={version}", "-d", str(scratch)], check=True, capture_output=True, text=True)
        package = scratch / PACKAGE
        package.mkdir()
        with tarfile.open(next(scratch.glob("transformers-*.tar.gz"))) as sdist:
            for member in sdist.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (package / parts[2]).write_bytes(sdist.extractfile(member).read())
        for name, text in {"__init__.py": "", **STAND_INS}.items():
            path = package / name
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        into.mkdir(parents=True, exist_ok=True)
        package.rename(into / PACKAGE)


def _common_tests():
    version = transformers.__version__
    root = Path(os.environ.get("FASTBERT_HF_TESTS_DIR") or Path(__file__).resolve().parents[1] / ".cache" / "hf-tests")
    folder = root / version
    if not (folder / PACKAGE / "test_modeling_common.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            _fetch(version, folder)
        except (subprocess.CalledProcessError, OSError, StopIteration) as error:
            detail = getattr(error, "stderr", "") or error
            if os.environ.get("CI"):
                raise RuntimeError(f"could not fetch transformers {version}'s test sources: {detail}") from error
            pytest.skip(f"transformers {version}'s test sources could not be fetched (offline?): {detail}",
                        allow_module_level=True)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


common = _common_tests()

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, type_vocab_size=2)
HEADS = ("Model", "ForMaskedLM", "ForMultipleChoice", "ForQuestionAnswering", "ForSequenceClassification",
         "ForTokenClassification")
FAMILIES = {  # name: (config keywords, head classes, whether it takes token types)
    "Bert": (SIZES, (*HEADS, "ForNextSentencePrediction", "ForPreTraining", "LMHeadModel"), True),
    "Roberta": (dict(SIZES, pad_token_id=1), (*HEADS, "ForCausalLM"), True),
    "Electra": (dict(SIZES, embedding_size=16), (*HEADS, "ForPreTraining", "ForCausalLM"), True),
    "Albert": (dict(SIZES, embedding_size=16, num_hidden_groups=1), (*HEADS, "ForPreTraining"), True),
    "DistilBert": (dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64),
                   HEADS, False),
    "MPNet": (dict(SIZES, pad_token_id=1), HEADS, False),
}

EVERY = frozenset(FAMILIES)
PAD_ROWS = ("pad positions of the fused output are zero (never computed) where the HF forward that this call falls "
            "back to computes them")
HOOKED_LAYERS = ("counts the forward pre-hook calls of an HF layer module against the calls of its checkpoint function; "
                 "the fused path runs its own layer through that function and never calls the HF layer module, so "
                 "hooks on layers do not fire")
# test name (as in ModelTesterMixin) -> (the families where it fails by design, why).
BY_DESIGN = {
    # MPNet's HF forward has no per-layer hidden-state selection: the test passes there.
    "test_can_capture_specific_layers_hidden_states": (EVERY - {"MPNet"}, f"compares hidden states by layer "
                                                       f"index with output_hidden_states=True: {PAD_ROWS}"),
    "test_inputs_embeds_matches_input_ids": (EVERY, f"compares the inputs_embeds call with the input_ids one: "
                                             f"{PAD_ROWS}"),
    # ALBERT's and MPNet's layers are not GradientCheckpointingLayer: the test checks no hook there.
    **{f"test_training_gradient_checkpointing{variant}": (EVERY - {"Albert", "MPNet"}, HOOKED_LAYERS)
       for variant in ("", "_use_reentrant_false", "_use_reentrant_true")},
}

# test name -> why it does not apply here (skipped).
NOT_APPLICABLE = {
    "test_generation_tester_mixin_inheritance": (
        "checks that a generative model's test class also runs the generation tests, which the sdist does not ship"),
}


class _Tester:
    """What ModelTesterMixin reads of a model tester: sizes, a config, inputs with padding."""

    batch_size, seq_length, num_choices, is_training = 3, 7, 4, True

    def __init__(self, family: str):
        self.config_keywords, _, self.token_types = FAMILIES[family]
        self.config_class = getattr(transformers, f"{family}Config")
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads

    def get_config(self):
        return self.config_class(**self.config_keywords)

    def prepare_config_and_inputs_for_common(self):
        shape = [self.batch_size, self.seq_length]
        ids = common.ids_tensor(shape, self.vocab_size)
        pad = getattr(self.get_config(), "pad_token_id", None)
        if pad is not None:  # a pad id in the text moves RoBERTa's and MPNet's positions; inputs_embeds would not
            ids[ids == pad] = pad + 1
        inputs = {"input_ids": ids, "attention_mask": common.random_attention_mask(shape)}
        if self.token_types:
            inputs["token_type_ids"] = common.ids_tensor(shape, 2)
        return self.get_config(), inputs


@pytest.fixture(autouse=True)
def _optimize_every_backbone(monkeypatch):
    if os.environ.get("FASTBERT_HF_SUITE_BASELINE"):
        return
    post_init = transformers.PreTrainedModel.post_init

    def post_init_then_optimize(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if views.family_of(self) is not None:
            fastbert.optimize(self)

    monkeypatch.setattr(transformers.PreTrainedModel, "post_init", post_init_then_optimize)


def _suite(family: str) -> type:
    _, heads, _ = FAMILIES[family]

    class Suite(common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = tuple(getattr(transformers, f"{family}{head}") for head in heads)

        def setUp(self):
            self.model_tester = _Tester(family)

        def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
            """The mixin's inputs, plus the pre-training heads' labels (which it leaves to per-model testers)."""
            inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
            if return_labels and model_class.__name__.endswith("ForPreTraining"):
                tester = self.model_tester
                inputs["labels"] = torch.zeros(tester.batch_size, tester.seq_length, dtype=torch.long)
                sentence_label = {"Bert": "next_sentence_label", "Albert": "sentence_order_label"}.get(family)
                if sentence_label is not None:
                    inputs[sentence_label] = torch.zeros(tester.batch_size, dtype=torch.long)
            return inputs

    for name, reason in NOT_APPLICABLE.items():
        setattr(Suite, name, unittest.skip(reason)(getattr(Suite, name)))
    if not os.environ.get("FASTBERT_HF_SUITE_BASELINE"):
        for name, (families, _) in BY_DESIGN.items():
            if family in families:
                setattr(Suite, name, unittest.expectedFailure(getattr(Suite, name)))
    Suite.__name__ = Suite.__qualname__ = f"Test{family}"
    return Suite


TestBert, TestRoberta, TestElectra, TestAlbert, TestDistilBert, TestMPNet = map(_suite, FAMILIES)
