import sys
from pathlib import Path

import pytest
import torch


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
