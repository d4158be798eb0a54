"""Shared test setup.

Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
any ``@triton.jit`` function is created, so it is set here, before test modules import them.

Measured choices (fastbert.tuning) are cached in a temporary folder made for this run, never in
the user's cache: the suite measures each key once per run, and subprocesses it starts inherit
the folder.
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ["FASTBERT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastbert-tests-cache-")
atexit.register(shutil.rmtree, os.environ["FASTBERT_CACHE_DIR"], ignore_errors=True)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
