"""Shared test fixtures: fixed seeds, and the optional ``../shared`` data beside a developer's checkout."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_meld_dir() -> Path:
    """``../shared/data/meld`` (the real MELD CSVs); the test is skipped where it is absent."""
    path = SHARED_DIR / "data" / "meld"
    if not (path / "train_sent_emo.csv").is_file():
        pytest.skip("../shared/data/meld is not present (only developer checkouts have it)")
    return path
