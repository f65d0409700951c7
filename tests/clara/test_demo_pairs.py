"""The pretraining demo's build: two builds at once take turns, and a finished build in a folder the user
may only read is used as it is."""

from __future__ import annotations

import errno
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from clara import demo_pairs
from clara.config import ConfigError
from clara.demo_pairs import build_demo

SMALL = dict(train_per_kind=1, eval_per_kind=1, env_per_kind=1, seconds=0.25)


def test_two_builds_at_once_take_turns_and_the_second_finds_the_first_ones_build(tmp_path, monkeypatch):
    """`python -m clara.pretrain` in two terminals (or every process of a torchrun) with no data: both find
    no demo, and the second must wait for the first's build and use it, not build it a second time."""
    root = tmp_path / "pairs"
    builds, building, second_done = [], threading.Event(), threading.Event()
    real_atomic_directory = demo_pairs.atomic_directory

    @contextmanager
    def slow_atomic_directory(path):
        builds.append(path)
        with real_atomic_directory(path) as staging:
            building.set()
            second_done.wait(timeout=1.0)  # long enough for an unserialised second call to start building too
            yield staging

    monkeypatch.setattr(demo_pairs, "atomic_directory", slow_atomic_directory)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(build_demo, root, **SMALL)
        assert building.wait(timeout=60)
        second = build_demo(root, **SMALL)
        second_done.set()
        assert first.result() == second
    assert builds == [root]
    assert len(second.train.read_text().splitlines()) == 48
    assert json.loads((root / "demo.json").read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pairs.lock", "pairs"]  # the lock beside, not in, the build


@pytest.fixture
def read_only(monkeypatch):
    """Makes a folder one the user may only read, as a team's shared cache can be: chmod, and, where chmod
    binds nothing (as root), opening the lock file there fails as the OS fails it."""
    folders: list[Path] = []
    real_locked = demo_pairs.locked

    def refusing(path, *args, **kwargs):
        if Path(path).parent in folders:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_locked(path, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(demo_pairs, "locked", refusing)

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        folders.append(folder)

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_a_finished_build_the_user_may_only_read_is_used_and_another_is_one_clear_error(tmp_path, read_only):
    shared = tmp_path / "shared"
    paths = build_demo(shared / "pairs", **SMALL)
    read_only(shared)
    before = {p: p.stat().st_mtime_ns for p in shared.rglob("*")}
    assert build_demo(shared / "pairs", **SMALL) == paths
    with pytest.raises(ConfigError) as refused:
        build_demo(shared / "pairs", **SMALL, seed=1)
    assert str(refused.value) == (f"{shared}: cannot be written to build the pretraining demo pairs there, and "
                                  "no finished build of these settings is there; give data.demo_dir a folder you "
                                  "can write")
    assert {p: p.stat().st_mtime_ns for p in shared.rglob("*")} == before
