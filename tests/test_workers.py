"""The test workers' harness (tests/workers.py): a failing worker is reported with its exit code
and traceback, and a worker left waiting for it is stopped instead of waited for."""

from __future__ import annotations

import time

import pytest

import workers


def _wait(rank: int, world: int, out_dir: str) -> None:
    time.sleep(600)  # as a peer waiting in the rendezvous for one that never comes


def _fail_or_wait(rank: int, world: int, out_dir: str) -> None:
    if rank == 0:
        raise RuntimeError(f"rank {rank} of {world} fails")
    _wait(rank, world, out_dir)


def test_a_failing_worker_is_reported_and_its_waiting_peer_stopped(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        workers.run(f"{__name__}:_fail_or_wait", 2, tmp_path, deadline_s=120, grace_s=1)
    assert time.monotonic() - start < 60  # not the deadline: one second after rank 0 failed
    report = str(failure.value)
    assert "rank 0: exit code 1\nTraceback" in report and "RuntimeError: rank 0 of 2 fails" in report
    assert "rank 1: still running, stopped\nits stacks when stopped:" in report and "in _wait" in report


def test_a_worker_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(AssertionError, match="rank 1: exit code 1\nTraceback(.|\n)*No module named 'no_such_module'"):
        workers.run("no_such_module:main", 2, tmp_path, deadline_s=60)


def test_workers_that_outlive_the_deadline_are_stopped(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 0: still running, stopped"):
        workers.run(f"{__name__}:_wait", 1, tmp_path, deadline_s=1)
    assert time.monotonic() - start < 30
