"""clara.io_utils: atomic writes replace whole or not at all, with the modes a plain write gives."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from clara.io_utils import atomic_directory, atomic_path, atomic_write_text, locked


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
    # safetensors makes its files private too: weights, best.safetensors and caches, in a file or a folder.
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp), metadata={"format": "test"})
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert load_file(tmp_path / "model.safetensors")["w"].tolist() == [0.0, 0.0]
    with atomic_directory(tmp_path / "model") as staging:
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o644


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


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the synced files from /proc")
def test_writes_reach_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    # A power cut must find the old result or the new one whole: the data is flushed before the new
    # name points at it, and the folder's entry after the rename.
    from clara import io_utils

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io_utils.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                           real_fsync(fd)))
    monkeypatch.setattr(io_utils.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)
    events.clear()
    with atomic_directory(tmp_path / "board") as staging:
        (staging / "events").write_text("x")
    synced = [target for kind, target in events if kind == "fsync"]
    assert synced[:2] == [str(staging / "events"), str(staging)] and synced[-1] == str(tmp_path)
    assert ("replace", str(tmp_path / "board")) in events and (tmp_path / "board" / "events").read_text() == "x"


def test_a_second_holder_of_the_lock_says_it_waits_and_enters_once_the_first_leaves(tmp_path, capsys):
    import threading

    order = []
    with locked(tmp_path / ".lock"):
        second = threading.Thread(target=lambda: _enter(tmp_path / ".lock", order))
        second.start()
        second.join(timeout=0.5)
        assert second.is_alive() and order == []  # it waits while the first holds the lock
        order.append("first leaves")
    second.join(timeout=10)
    assert order == ["first leaves", "second in"]
    assert capsys.readouterr().err == "waiting for the first\n"


def _enter(path, order: list[str]) -> None:
    with locked(path, "waiting for the first"):
        order.append("second in")


def test_writing_over_a_folder_names_the_folder_before_any_work(tmp_path):
    # The rename failed after the writer had run, naming the hidden temporary file instead.
    (tmp_path / "out.jsonl").mkdir()
    ran = []
    with pytest.raises(IsADirectoryError) as caught:
        with atomic_path(tmp_path / "out.jsonl") as tmp:
            ran.append(tmp)
    assert caught.value.filename == str(tmp_path / "out.jsonl") and "is a folder" in str(caught.value)
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
