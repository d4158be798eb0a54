"""Measured choices (fastbert.tuning) with a fake clock: the fastest wins, the margin keeps the
preferred option on a near-tie, decisions persist per machine and version, a bad cache file
costs one warning, and nothing is timed while tracing.

conftest.py points FASTBERT_CACHE_DIR at a temporary folder for the whole suite; the tests here
point it at their own tmp_path.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fastbert
from fastbert import tuning


class Clock:
    """A fake timer: options "take" the seconds their cost says, by advancing it."""

    def __init__(self, costs: dict):
        self.now, self.costs, self.calls = 0.0, costs, []

    def __call__(self) -> float:
        return self.now

    def run(self, option: str) -> None:
        self.calls.append(option)
        cost = self.costs[option]
        self.now += cost(len([c for c in self.calls if c == option])) if callable(cost) else cost


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path))
    return tmp_path


def choose(costs: dict, key=("float32", 768, 768, 16), name="test", options=None, **table):
    """A new table's choice (what a new process would choose), the clock, and the table."""
    clock = Clock(costs)
    made = tuning.Table(name, timer=clock, **table)
    return made.choose(key, options or tuple(costs), clock.run), clock, made


def test_picks_the_fastest_from_interleaved_rounds(cache):
    chosen, clock, _ = choose({"a": 3.0, "b": 1.0, "c": 2.0})
    assert chosen == "b"
    # one untimed call each, then rounds of one call each, starting at a different option each round
    assert clock.calls[:3] == ["a", "b", "c"]
    rounds = [clock.calls[i:i + 3] for i in range(3, len(clock.calls), 3)]
    assert len(rounds) >= tuning.MIN_ROUNDS and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({r[0] for r in rounds}) > 1


def test_medians_ignore_one_slow_round(cache):
    # b's second timed call (its third call) is slow: a median shrugs it off, a mean would not.
    chosen, *_ = choose({"a": 2.0, "b": lambda n: 100.0 if n == 3 else 1.0})
    assert chosen == "b"


def test_margin_keeps_the_preferred_option_on_a_near_tie(cache):
    assert choose({"a": 1.04, "b": 1.0})[0] == "a"
    assert choose({"a": 1.06, "b": 1.0}, key=("other",))[0] == "b"
    assert tuning.pick({"a": 1.0, "b": 0.5, "c": 0.51}, ("a", "c", "b")) == "c"


def test_budget_caps_the_rounds(cache):
    _, clock, _ = choose({"a": tuning.BUDGET_S, "b": tuning.BUDGET_S})
    assert len(clock.calls) == 2 * (1 + tuning.MIN_ROUNDS)
    _, clock, _ = choose({"a": 0.0, "b": 0.0}, key=("free",))
    assert len(clock.calls) == 2 * (1 + tuning.ROUNDS)


def test_one_option_is_not_timed(cache):
    chosen, clock, _ = choose({"only": 1.0})
    assert chosen == "only" and clock.calls == []


def test_a_choice_never_changes_within_a_process(cache):
    clock = Clock({"a": 2.0, "b": 1.0})
    table = tuning.Table("test", timer=clock)
    assert table.choose(("k",), ("a", "b"), clock.run) == "b"
    clock.costs = {"a": 1.0, "b": 5.0}
    calls = len(clock.calls)
    assert table.choose(("k",), ("a", "b"), clock.run) == "b"
    assert len(clock.calls) == calls  # no second measurement


def test_decisions_persist_and_a_second_process_pays_nothing(cache):
    chosen, *_ = choose({"a": 2.0, "b": 1.0})
    files = list(cache.iterdir())
    assert [f.name.startswith("cpu-") and f.suffix == ".json" for f in files] == [True]  # no temporary left
    document = json.loads(files[0].read_text())
    assert document["fingerprint"] == tuning.fingerprint("cpu")
    assert document["tables"]["test"]["float32|768|768|16"]["choice"] == "b"

    # A new table of that name is what the next process has: it reads the choice, times nothing.
    again, clock, table = choose({"a": 1.0, "b": 2.0})
    assert again == chosen and clock.calls == []
    entry = tuning.decisions()["test"]["float32|768|768|16"]
    assert entry == table.entries()["float32|768|768|16"]
    assert entry["source"] == "cache" and entry["medians_s"] == {"a": 2.0, "b": 1.0}


def test_other_tables_and_keys_are_kept_when_saving(cache):
    choose({"a": 2.0, "b": 1.0}, name="first")
    choose({"a": 1.0, "b": 2.0}, name="second")
    choose({"a": 1.0, "b": 2.0}, name="first", key=("another",))
    (only,) = cache.iterdir()
    tables = json.loads(only.read_text())["tables"]
    assert set(tables) == {"first", "second"} and len(tables["first"]) == 2


@pytest.mark.parametrize("change", ["fastbert", "torch", "threads"])
def test_a_version_or_thread_change_measures_again(cache, monkeypatch, change):
    choose({"a": 2.0, "b": 1.0})
    if change == "fastbert":
        monkeypatch.setattr(fastbert, "__version__", fastbert.__version__ + ".post1")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    else:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1000)
    again, clock, _ = choose({"a": 1.0, "b": 2.0})
    assert again == "a" and clock.calls  # measured again, into a file of its own
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("bad", ["not json", '{"fingerprint": 1}', "[1, 2]"])
def test_a_corrupt_cache_file_warns_once_then_tunes_in_memory(cache, bad):
    choose({"a": 2.0, "b": 1.0})
    (path,) = cache.iterdir()
    path.write_text(bad)
    tuning._warned.clear()
    with pytest.warns(UserWarning, match="cannot read") as caught:
        assert choose({"a": 1.0, "b": 2.0})[0] == "a"  # measured, the file ignored
        table = tuning.Table("other", timer=Clock({}))
        for key in range(3):
            clock = Clock({"a": 2.0, "b": 1.0})
            table.timer = clock
            assert table.choose((key,), ("a", "b"), clock.run) == "b"
    assert len([w for w in caught if "fastbert" in str(w.message)]) == 1
    assert path.read_text() == bad  # left as it was


def test_an_unwritable_cache_folder_warns_once(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "file" / "cache"))  # a folder inside a file
    tuning._warned.clear()
    with pytest.warns(UserWarning, match="cannot write") as caught:
        assert choose({"a": 2.0, "b": 1.0})[0] == "b"
        assert choose({"a": 1.0, "b": 2.0}, key=("another",))[0] == "a"
    assert len(caught) == 1


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_dir() == tmp_path / "fastbert"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "fastbert"
    for off in ("off", "", "OFF"):
        monkeypatch.setenv(tuning.ENV_VAR, off)
        assert tuning.cache_dir() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert choose({"a": 2.0, "b": 1.0}, key=(off,))[0] == "b"  # in memory, silently
    assert not (tmp_path / "home").exists()


def test_nothing_is_timed_while_compiling(cache, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    chosen, clock, table = choose({"a": 2.0, "b": 1.0})
    assert chosen == "a" and clock.calls == []  # the preferred option, kept in memory only
    assert table.entries()["float32|768|768|16"]["source"] == "default"
    assert list(cache.iterdir()) == []


def test_measuring_is_off_inside_a_real_trace():
    compiled = torch.compile(lambda x: x + 1 if tuning.measuring_allowed("cpu", False) else x - 1, backend="eager")
    assert tuning.measuring_allowed("cpu", False)
    assert compiled(torch.zeros(2)).tolist() == [-1.0, -1.0]


def test_triton_tables_run_one_config_in_the_interpreter(cache, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chosen, clock, _ = choose({"a": 2.0, "b": 1.0}, triton=True)
    assert chosen == "a" and clock.calls == []
    assert choose({"a": 2.0, "b": 1.0}, key=("cpu table",))[0] == "b"  # CPU tables still measure


# ----------------------------------------------------------------------------- Triton tiles
#
# The launchers measure among their candidate configurations on a GPU. Here the kernels run in
# the interpreter with the GPU seams patched (the architecture, the interpreter check that
# would skip measuring), a fake clock advanced by each candidate's run, and two candidates
# whose second is the faster: the launch must measure both, keep the second, give the
# reference's result, and the next launch of the key must neither ask for candidates nor time.

import importlib  # noqa: E402

from fastbert import _compat, reference  # noqa: E402
from fastbert.kernels import launch as triton_launch  # noqa: E402

# The modules, not the op functions that fastbert.kernels exports under the same names.
triton_attention = importlib.import_module("fastbert.kernels.attention")
triton_linear_gelu = importlib.import_module("fastbert.kernels.linear_gelu")


def _attention_args(causal=True):
    lengths = [5, 17]
    q, k, v = (torch.randn(sum(lengths), 2, 32) for _ in range(3))
    cu = torch.tensor([0, 5, 22], dtype=torch.int32)
    return q, k, v, cu, max(lengths), 32**-0.5, causal, None


def _forward_case():
    args = _attention_args()
    return (triton_attention, "attention", lambda: triton_attention.attention(*args),
            lambda: reference.attention(*args),
            (80, 32, torch.float32, True, False, False, False, 32),
            [triton_attention.Config(16, 16, 1, 1), triton_attention.Config(32, 16, 1, 1)], "config_candidates")


def _backward_case():
    args = _attention_args()
    q, k, v, cu, S, scale, causal, bias = args
    out, lse = reference.attention_train(q, k, v, cu, S, scale, causal, bias, None, None, 0.0, None)
    grad = torch.randn_like(out)
    call = (grad, q, k, v, out, lse, cu, S, scale, causal, bias, None, None, 0.0, None)
    small = triton_attention.Config(16, 16, 1, 1)
    return (triton_attention, "attention_backward", lambda: triton_attention.attention_backward(*call)[0],
            lambda: reference.attention_backward(*call)[0],
            (80, 32, torch.float32, True, False, False, False, 32),
            [triton_attention.BackwardConfig(small, small),
             triton_attention.BackwardConfig(triton_attention.Config(16, 32, 1, 1), small)],
            "backward_config_candidates")


def _linear_gelu_case():
    x, w, b = torch.randn(20, 48), torch.randn(40, 48), torch.randn(40)
    return (triton_linear_gelu, "linear_gelu", lambda: triton_linear_gelu.linear_gelu(x, w, b, "none"),
            lambda: reference.linear_gelu(x, w, b, "none"),
            (80, torch.float32, 40, 48, 32, "none", False),
            [triton_linear_gelu.Config(16, 32, 16, 2, 1, 1), triton_linear_gelu.Config(32, 32, 16, 2, 1, 1)],
            "config_candidates")


@pytest.mark.parametrize("case", [_forward_case, _backward_case, _linear_gelu_case],
                         ids=["attention", "attention_backward", "linear_gelu"])
def test_triton_launches_measure_their_candidates_and_keep_the_fastest(cache, monkeypatch, case):
    module, kernel, call, expected, key, candidates, candidates_name = case()
    clock = Clock({triton_launch.label(c): cost for c, cost in zip(candidates, (2.0, 1.0))}
                  | {triton_linear_gelu.CUBLAS: 3.0})
    asked = []
    monkeypatch.setattr(module, candidates_name, lambda *a: asked.append(a) or tuple(candidates))
    monkeypatch.setattr(module, "gpu_arch", lambda device: 80)
    monkeypatch.setattr(_compat, "interpreting", lambda: False)  # Triton itself still interprets
    monkeypatch.setattr(triton_launch, "_CHOSEN", {})
    monkeypatch.setitem(triton_launch._TABLES, kernel,
                        tuning.Table(f"triton_{kernel}", triton=True, timer=clock))  # (no GPU to fingerprint)
    real_tile, chosen = module.tile, []

    def timed_tile(kernel_, key_, tensor, candidates_, run):
        assert (kernel_, key_) == (kernel, key)
        chosen.append(real_tile(kernel_, key_, tensor, candidates_,
                                lambda option: (clock.run(triton_launch.label(option)), run(option))))
        return chosen[-1]

    monkeypatch.setattr(module, "tile", timed_tile)
    got = call()
    entry = tuning.decisions()[f"triton_{kernel}"]
    (text, decided), = entry.items()
    assert decided["source"] == "measured" and decided["choice"] == triton_launch.label(candidates[1])
    assert set(decided["medians_s"]) == set(clock.costs) if kernel == "linear_gelu" else set(decided["medians_s"]) \
        == {triton_launch.label(c) for c in candidates}
    want = expected()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    calls, asked_before = len(clock.calls), len(asked)
    assert torch.allclose(call(), want, atol=1e-5, rtol=1e-5)
    assert (len(clock.calls), len(asked)) == (calls, asked_before)  # the second launch only looks it up
    assert chosen == [candidates[1]] * 2


def test_under_the_interpreter_a_launch_runs_its_interpreter_config_untimed(cache, monkeypatch):
    monkeypatch.setattr(triton_launch, "_CHOSEN", {})
    monkeypatch.setattr(triton_launch, "tile", lambda *a: pytest.fail("no measured choice under the interpreter"))
    monkeypatch.setattr(triton_attention, "tile", triton_launch.tile)
    args = _attention_args()
    assert torch.allclose(triton_attention.attention(*args), reference.attention(*args), atol=1e-5, rtol=1e-5)
    assert "triton_attention" not in tuning.decisions()
