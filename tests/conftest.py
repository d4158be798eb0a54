"""Shared test setup.

Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
any ``@triton.jit`` function is created, so it is set here, before test modules import them.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
