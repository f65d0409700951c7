"""clara.io_utils: atomic writes replace whole or not at all, with the modes a plain write gives."""

from __future__ import annotations

import os
import stat

import pytest

from clara.io_utils import atomic_directory, atomic_path, atomic_write_text


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
