"""Choices measured on the machine that runs them, cached on disk per machine and version.

Which GEMM library or kernel tile is fastest depends on the CPU or GPU, so fastbert measures
instead of assuming. A :class:`Table` holds one kind of decision (the CPU GEMM library, a
kernel's tile config): a key (dtype, shape bucket, flags) -> the chosen option.
``table.choose(key, options, run)`` returns this process's choice for ``key``; on the first use
of a key it is, in order:

1. the one option, when only one applies (nothing to measure);
2. the decision cached on disk for this machine (a second process pays nothing and makes the
   same choice, so its outputs are bitwise the same);
3. the first option (the stable default) where measuring is impossible or meaningless: inside
   a ``torch.compile`` trace, a CUDA-graph capture, or the Triton interpreter for Triton tables;
   that choice is kept for this process but not written to disk, so a later process measures;
4. otherwise measured: every option runs once untimed (packing weights, compiling), then up
   to :data:`ROUNDS` timed rounds with the options interleaved (each round starts at the next
   option, so none always runs after the same neighbour), at least :data:`MIN_ROUNDS` and
   stopping once the key has spent :data:`BUDGET_S`; the median of each option's rounds
   counts. The choice is the first option, in the caller's order of preference, whose median
   is within :data:`MARGIN` of the fastest: a near-tie keeps the preferred option, rather
   than flipping with noise between machines or runs.

A key's choice never changes within a process once made.

The cache: one JSON file per machine fingerprint (:func:`fingerprint`: CPU vendor, model and
flags, thread count, torch and fastbert versions; for GPU tables also the GPU's name and
compute capability and Triton's version), named ``<device type>-<hash>.json``, in
:func:`cache_dir`: ``$FASTBERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastbert``, else
``~/.cache/fastbert``; ``FASTBERT_CACHE_DIR=off`` (or empty) keeps decisions in memory only.
Any change of the fingerprint (a new torch, another thread count) selects another file, so
decisions are measured again. Files are replaced atomically (a temporary file renamed over
it), so no process ever reads half of one; two processes deciding at once may each miss the
other's new keys, which are then measured again later. A file that cannot be read or written
(corrupt, read-only) gives one warning; that process then decides in memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastbert import _compat, machine

ENV_VAR = "FASTBERT_CACHE_DIR"
OFF = ("", "off", "none", "0")  # values of ENV_VAR that disable the disk cache
MARGIN = 0.05  # a faster option must beat the preferred one by more than this fraction
ROUNDS = 5
MIN_ROUNDS = 3
BUDGET_S = 0.08  # timed rounds per key stop after this long (once MIN_ROUNDS ran)

# name -> table, for decisions(); tables made by tests go away with them.
_TABLES: weakref.WeakValueDictionary[str, Table] = weakref.WeakValueDictionary()
_warned: set[Path] = set()


def cache_dir() -> Path | None:
    """Where decisions are cached (module docstring), or None when ``FASTBERT_CACHE_DIR`` turns it off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fastbert"


def fingerprint(device_type: str = "cpu") -> dict:
    """What a decision depends on besides its key: the machine, the thread count and the
    versions (for ``cuda``, also the current GPU and Triton)."""
    import fastbert

    cpu = machine.cpu()
    found = {"cpu_vendor": cpu["vendor"], "cpu_model": cpu["model"], "cpu_family_model": cpu["family_model"],
             "cpu_flags": cpu["flags"], "threads": torch.get_num_threads(), "torch": torch.__version__,
             "fastbert": fastbert.__version__}
    if device_type == "cuda":
        import triton

        found.update(gpu=machine.gpu(torch.device("cuda", torch.cuda.current_device())), triton=triton.__version__)
    return found


def measuring_allowed(device_type: str, triton: bool) -> bool:
    """False inside a ``torch.compile`` trace or a CUDA-graph capture (timing would be
    meaningless or break the capture), and for Triton kernels under ``TRITON_INTERPRET=1``."""
    if torch.compiler.is_compiling():
        return False
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return not (triton and _compat.interpreting())


def pick(medians: dict[str, float], options: Sequence[str], margin: float = MARGIN) -> str:
    """The first of ``options`` (order of preference) whose median is within ``margin`` of the fastest."""
    fastest = min(medians.values())
    return next(o for o in options if medians[o] <= fastest * (1 + margin))


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (1 for 0): sizes in one bucket share a decision."""
    return 1 << max(n - 1, 0).bit_length()


def _text(key: tuple) -> str:
    return "|".join(str(part).removeprefix("torch.") for part in key)


class Table:
    """One kind of measured decision (module docstring). ``device_type`` selects the
    fingerprint (``cuda`` adds the GPU) and, with ``sync``, waits for the device around each
    timed call; ``triton`` tables are not timed under the Triton interpreter. ``timer`` (seconds)
    is injectable for tests."""

    def __init__(self, name: str, device_type: str = "cpu", triton: bool = False,
                 timer: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None):
        self.name, self.device_type, self.triton = name, device_type, triton
        self.timer, self.sync = timer, sync
        self._choices: dict[tuple, str] = {}  # the fast path: key -> option
        self._entries: dict[str, dict] = {}  # key text -> {"choice", "source", "medians_s"}
        self._file: Path | None = None  # None: memory only
        self._fingerprint: dict | None = None
        self._stored: dict[str, dict] | None = None  # this table's decisions on disk, once read
        _TABLES[name] = self

    def choose(self, key: tuple, options: Sequence[str], run: Callable[[str], object],
               measured: Callable[[str], None] | None = None) -> str:
        """This process's option for ``key`` among ``options`` (in order of preference);
        ``run(option)`` runs ``option`` once on the key's shape, for timing; after a
        measurement, ``measured(choice)`` can release what the other options built."""
        choice = self._choices.get(key)
        return choice if choice is not None else self._decide(key, tuple(options), run, measured)

    def entries(self) -> dict[str, dict]:
        """This process's decisions: key text -> choice, where it came from (``only``,
        ``cache``, ``default``, ``measured``) and the options' medians in seconds, where known."""
        return dict(self._entries)

    def _decide(self, key: tuple, options: tuple[str, ...], run: Callable[[str], object],
                measured: Callable[[str], None] | None) -> str:
        text = _text(key)
        if len(options) == 1:
            entry = {"choice": options[0], "source": "only", "medians_s": None}
        else:
            stored = self._load().get(text)
            if stored is not None and stored.get("choice") in options:
                entry = {**stored, "source": "cache"}
            elif not measuring_allowed(self.device_type, self.triton):
                entry = {"choice": options[0], "source": "default", "medians_s": None}
            else:
                medians = self._measure(options, run)
                entry = {"choice": pick(medians, options), "source": "measured", "medians_s": medians}
                self._save(text, {"choice": entry["choice"], "medians_s": medians})
                if measured is not None:
                    measured(entry["choice"])
        self._entries[text] = entry
        self._choices[key] = entry["choice"]
        return entry["choice"]

    def _measure(self, options: tuple[str, ...], run: Callable[[str], object]) -> dict[str, float]:
        sync = self.sync or (lambda: None)
        for option in options:  # untimed: packed weights, compilation, first-touch costs
            run(option)
        sync()
        times: dict[str, list[float]] = {o: [] for o in options}
        started = self.timer()
        for rnd in range(ROUNDS):
            for option in options[rnd % len(options):] + options[:rnd % len(options)]:
                start = self.timer()
                run(option)
                sync()
                times[option].append(self.timer() - start)
            if rnd + 1 >= MIN_ROUNDS and self.timer() - started > BUDGET_S:
                break
        return {o: statistics.median(t) for o, t in times.items()}

    # ------------------------------------------------------------------ disk
    def _load(self) -> dict[str, dict]:
        if self._stored is None:
            self._stored = {}
            folder = cache_dir()
            if folder is not None:
                found = fingerprint(self.device_type)
                digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]
                self._file, self._fingerprint = folder / f"{self.device_type}-{digest}.json", found
                self._stored = self._read().get(self.name, {})
        return self._stored

    def _read(self) -> dict[str, dict]:
        """Every table's decisions in this table's file ({} when there is none yet)."""
        try:
            document = json.loads(self._file.read_text())
            if not (isinstance(document, dict) and isinstance(document.get("tables"), dict)
                    and all(isinstance(table, dict) for table in document["tables"].values())):
                raise ValueError("not a fastbert cache file")
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as exc:
            self._give_up(f"cannot read {self._file} ({type(exc).__name__}: {exc})")
            return {}
        return document["tables"] if document.get("fingerprint") == self._fingerprint else {}

    def _save(self, text: str, entry: dict) -> None:
        if self._file is None:
            return
        tables = self._read()  # what other processes and tables stored meanwhile
        if self._file is None:  # it became unreadable
            return
        tables.setdefault(self.name, {})[text] = entry
        document = {"fingerprint": self._fingerprint, "tables": tables}
        partial = None
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self._file.parent, prefix=f".{self._file.name}.",
                                             suffix=".tmp", delete=False) as out:
                partial = Path(out.name)
                out.write(json.dumps(document, indent=1, sort_keys=True) + "\n")
            os.replace(partial, self._file)
        except OSError as exc:
            if partial is not None:
                partial.unlink(missing_ok=True)
            self._give_up(f"cannot write {self._file} ({type(exc).__name__}: {exc})")

    def _give_up(self, why: str) -> None:
        """One warning per file; this table then decides in memory only."""
        if self._file not in _warned:
            _warned.add(self._file)
            warnings.warn(f"fastbert: {why}; measured choices are kept in memory only in this process "
                          f"(delete the file, or set {ENV_VAR} to another folder or to 'off')", stacklevel=4)
        self._file = None


def decisions() -> dict[str, dict[str, dict]]:
    """Every table's decisions in this process (:meth:`Table.entries`), by table name."""
    return {name: table.entries() for name, table in sorted(_TABLES.items()) if table.entries()}
