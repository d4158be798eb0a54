"""Worker processes for the tests (the DDP test's ranks), started so that their failures are reported.

This module imports only the standard library: a spawned worker imports it first, then imports
the test's own module inside :func:`_record`, so that a failure anywhere in a worker, importing
torch or the test module included, is written down as a traceback. The parent waits for all of
them up to one deadline, stops the rest as soon as one fails (its peers would otherwise wait for
it in a collective or in the rendezvous), and fails with every worker's exit code and traceback.
"""

from __future__ import annotations

import faulthandler
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from pathlib import Path


def _record(target: str, error_file: str, args: tuple) -> None:
    """Call ``target`` ("module:function") with ``args``; on any exception write its traceback to
    ``error_file``; on SIGUSR1 (the parent, before stopping a worker) every thread's stack."""
    stacks = open(f"{error_file}.stacks", "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(*args)
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        raise


def _state(process: multiprocessing.Process, stopped: bool) -> str:
    if stopped:
        return "still running, stopped"
    code = process.exitcode
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def run(target: str, world: int, out_dir: Path, deadline_s: float, grace_s: float = 10.0) -> None:
    """Run ``target(rank, world, out_dir)`` ("module:function") in ``world`` spawned processes.

    Returns when all exited 0. Otherwise, at ``deadline_s`` after the start or ``grace_s`` after the
    first worker failed, whichever comes first, stops the workers still running and raises an
    AssertionError naming each worker's state and traceback.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this one's torch
    errors = [out_dir / f"rank{rank}.error" for rank in range(world)]
    workers = [context.Process(target=_record, args=(target, str(errors[rank]), (rank, world, str(out_dir))))
               for rank in range(world)]
    start = time.monotonic()
    for w in workers:
        w.start()
    deadline = start + deadline_s
    running = list(workers)
    while running and (left := deadline - time.monotonic()) > 0:
        multiprocessing.connection.wait([w.sentinel for w in running], timeout=left)
        running = [w for w in running if w.exitcode is None]
        if any(w.exitcode for w in workers):  # one failed: its peers get grace_s to fail by themselves
            deadline = min(deadline, time.monotonic() + grace_s)
    waited = time.monotonic() - start
    for w in running:
        os.kill(w.pid, signal.SIGUSR1)  # where it is stuck, into its .stacks file
    time.sleep(1 if running else 0)
    for w in running:
        w.terminate()
        w.join(5)
        if w.exitcode is None:
            w.kill()
        w.join()
    if all(w.exitcode == 0 for w in workers):
        return
    lines = [f"{world} workers of {target}, after {waited:.0f} s (the deadline: {deadline_s:.0f} s, or "
             f"{grace_s:.0f} s after a first failure):"]
    for rank, w in enumerate(workers):
        lines.append(f"rank {rank}: {_state(w, w in running)}")
        if errors[rank].exists():
            lines.append(errors[rank].read_text().rstrip())
        if w in running:
            lines.append(f"its stacks when stopped:\n{Path(f'{errors[rank]}.stacks').read_text().rstrip()}")
    raise AssertionError("\n".join(lines))
