"""Shared test fixtures: fixed seeds, the optional ``../shared`` data beside a developer's checkout, and a
recorder of PyTorch's attention kernel choice."""

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


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict[str, bool]]:
    """Every later call of ``F.scaled_dot_product_attention`` appends which of PyTorch's kernels were
    enabled at that moment: {"cudnn", "flash", "efficient", "math"} -> bool."""
    calls: list[dict[str, bool]] = []
    fused = torch.nn.functional.scaled_dot_product_attention
    flags = torch.backends.cuda

    def recording(*args, **kwargs):
        calls.append({"cudnn": flags.cudnn_sdp_enabled(), "flash": flags.flash_sdp_enabled(),
                      "efficient": flags.mem_efficient_sdp_enabled(), "math": flags.math_sdp_enabled()})
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls
