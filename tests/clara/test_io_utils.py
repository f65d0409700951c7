"""clara.io_utils: atomic writes replace whole or not at all, with the modes a plain write gives."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from clara.io_utils import atomic_directory, atomic_path, atomic_write_text, save_tensors


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_files_and_folders_get_the_umasks_modes_not_tempfiles_private_ones(tmp_path, umask_022):
    """Results on a shared machine stay readable to the team: 0o644 / 0o755 under umask 022 (tempfile
    alone gives 0o600 / 0o700)."""
    atomic_write_text(tmp_path / "metrics.json", "{}\n")
    with atomic_directory(tmp_path / "tensorboard") as staging:
        (staging / "events").write_text("x")
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "tensorboard").stat().st_mode) == 0o755
    # safetensors makes its files private too: weights, best.safetensors and caches go through save_tensors.
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        save_tensors({"w": torch.zeros(2)}, tmp, metadata={"format": "test"})
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert load_file(tmp_path / "model.safetensors")["w"].tolist() == [0.0, 0.0]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "folder") as staging:
            (staging / "a").write_text("a")
            raise RuntimeError("stopped")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_folder_swap_that_fails_or_is_killed_midway_keeps_the_old_folder(tmp_path, monkeypatch):
    """Replacing a folder takes two renames (old -> .<name>.old, new -> name): a failure of the
    second puts the old folder back, and a kill between them is repaired by the next write."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) == 3 and (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    # As a kill between the two renames leaves it: no folder, the old one aside.
    os.replace(target, tmp_path / ".model.old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target):
            assert (target / "weights").read_text() == "old"  # put back before the new one is written
            raise RuntimeError("stopped")
    assert (target / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
