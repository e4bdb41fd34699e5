"""Shared fixtures: tiny random models of every family, saved once per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The model owner's records of issued bundles (offsite.exchange.issued) go to a folder of this run,
# never to the user's own state; spawned stage processes inherit it.
os.environ["OFFSITE_STATE"] = tempfile.mkdtemp(prefix="offsite-test-state-")

from tiny_models import FAMILIES, SAMPLE_TEXT, save_tiny_model  # noqa: E402

NUM_LAYERS = 8

# One thread: tiny models gain nothing from more, and under a busy machine two threads fight for cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Lazily saved tiny full models, one directory per family."""
    cache: dict[str, Path] = {}

    class Dirs(dict):
        def __missing__(self, family: str) -> Path:
            path = save_tiny_model(family, tmp_path_factory.mktemp(family), num_layers=NUM_LAYERS, seed=0)
            self[family] = path
            return path

    return Dirs(cache)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def sample_text_file(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def input_batch(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 400, (batch, length), generator=generator)
