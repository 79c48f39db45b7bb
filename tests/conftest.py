import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (mormm/backbone/fused.py) run in Triton's interpreter, so every
# inference test here also runs them against what the unfused ops would give. It must be on
# before Triton is imported (by lightning, below the tests' imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to OpenMP spin-waiting when the
    host is busy (2 threads ran the backbone tests up to 10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_in_repo(monkeypatch):
    """Run the CLI as `mormm` from the repository root: configs resolve by their relative paths,
    and LightningCLI does not warn about pytest's own arguments in sys.argv."""
    monkeypatch.setattr(sys, "argv", ["mormm"])
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
