"""A command's output folder, checked before anything is written into it.

A run folder may be given again to resume the run it holds; anything else in it is someone's finished
work. So a command refuses, with one message naming the folder: a path that is a file (or lies under
one), a non-empty folder that holds no run of its kind (the user's files, another command's run), and
a run made with other settings (resuming it would mix two runs' steps, or mislabel the old results).

A run folder is one command's at a time: a run holds a lock on it while it runs (``exclusive_run``),
and a second command given the folder, to resume a run it took for stopped, is refused while the
first runs; two would write one checkpoint and one log. The lock goes with the process, so a killed
run leaves nothing to clear.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clara import config as config_lib
from clara import distributed
from clara.config import ConfigError
from clara.io_utils import is_leftover, remove_leftovers

CONFIG_FILE = "config.yaml"  # a run's resolved settings, as config_lib.save_yaml writes them
T = TypeVar("T")


class OutDirError(ConfigError):
    """An output folder that cannot take this run; the message names it and says what to give instead."""


def check_folder_path(path: str | Path) -> None:
    """Raise OutDirError when ``path``, or the nearest part of it that exists, is not a folder."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.is_dir():
            return
        if part.exists() or part.is_symlink():  # a file, or a link to nothing
            raise OutDirError(f"{part}: exists and is not a folder" + ("" if part == path else f" (in {path})"))


def claim(path: str | Path, kind: str, holds_run: Callable[[Path], bool], *, shared: bool = False) -> bool:
    """Whether ``path`` holds a ``kind`` run (by ``holds_run``) to resume or redo; False for a new or empty folder.
    Atomic-write temporaries a killed run left in it are deleted first, when no command runs in it.

    Raises OutDirError for a file, for a non-empty folder that holds no ``kind`` run, and for a folder
    another command runs in, unless ``shared`` (a sweep's study folder, which several commands work in
    at once, each holding it with ``shared_run``).
    """
    path = Path(path)
    check_folder_path(path)
    # A run killed during an atomic write leaves its temporary behind; were it the folder's first
    # file, the folder would read as someone else's.  The main process clears them (under torchrun
    # the others come here too, while the main one may already be writing), unless a command runs
    # in the folder: those are its writes in progress.
    if path.is_dir() and distributed.is_main():
        fd = _lock(path)
        if fd is None and not shared:
            raise _busy(path)
        if fd is not None:
            try:
                remove_leftovers(path)
            finally:
                os.close(fd)
    # Leftovers do not count: under torchrun the other processes may look before the main one has
    # cleared them, and a folder holding only one would read as someone else's.
    if not path.is_dir() or all(is_leftover(entry) for entry in path.iterdir()):
        return False
    if holds_run(path):
        return True
    raise OutDirError(f"{path} exists and is not a {kind} run; give an empty or new folder")


def _lock(path: Path, kind: int = fcntl.LOCK_EX | fcntl.LOCK_NB) -> int | None:
    """A descriptor of folder ``path`` holding a lock of ``kind`` on it; None when another process's lock
    keeps it from being taken at once."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, kind)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _busy(path: Path) -> OutDirError:
    return OutDirError(f"{path}: another command is running in this folder; wait for it to end (the same command "
                       "then resumes or reruns its run), or give another folder")


@contextmanager
def exclusive_run(path: str | Path) -> Iterator[None]:
    """Hold run folder ``path`` (made already) for one run; OutDirError while another command holds it.

    The main process holds the lock, and every process learns whether it got it, so under torchrun all
    stop together. Call it after ``claim`` and the checks of the inputs, around everything the run writes.
    """
    path = Path(path)
    fd = _lock(path) if distributed.is_main() else None
    try:
        if not distributed.all_gather_object(fd is not None)[0]:
            raise _busy(path)
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def shared_run(path: str | Path) -> Iterator[None]:
    """Hold folder ``path`` (made already) beside other commands that share it, as a sweep's workers do:
    ``claim`` then leaves their writes in progress alone, and ``exclusive_run`` refuses it."""
    fd = _lock(Path(path), fcntl.LOCK_SH)  # waits only while a claim clears leftovers
    try:
        yield
    finally:
        os.close(fd)


def saved_config(path: str | Path, cls: type[T]) -> T | None:
    """The settings in ``path``/config.yaml read as ``cls``; None when there is no such file or it
    describes something else (another command's run, a file that is not a config)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return config_lib.from_dict(cls, yaml.safe_load(file.read_text(encoding="utf-8")))
    except (ConfigError, yaml.YAMLError, AttributeError, TypeError, UnicodeDecodeError):
        return None


def same_path(value: Any) -> Any:
    """A path setting as resume compares it: ``./data/`` and ``data`` are one folder.  Comma-separated
    sources (pretraining's ``data.train``) are compared part by part, empty parts left out as the
    loader leaves them; "" and non-strings as they are.  A part that exists is compared as the file it
    is (``os.path.samefile``): through symlinks, ``..`` and relative against absolute spellings; one
    that does not (a preset name, a folder still to make) by its spelling."""
    if not isinstance(value, str) or not value:
        return value
    return ",".join(_path_key(part.strip()) for part in value.split(",") if part.strip())


def _path_key(part: str) -> str:
    """What compares equal for two spellings of one existing file or folder (the device and inode
    samefile compares, marked with a NUL, which no path spelling holds); the normalised spelling else.
    Not the spelling of an existing path: ``link/..`` is the folder above the link's target, which
    ``os.path.normpath`` would take for the current one."""
    try:
        stat = os.stat(part)
    except (OSError, ValueError):  # ValueError: a NUL in the value
        return os.path.normpath(part)
    return f"\0{stat.st_dev}:{stat.st_ino}"


def differing_keys(saved: Any, new: Any, may_differ: Collection[str] = (),
                   compare_as: Mapping[str, Callable[[Any], Any]] | None = None) -> list[str]:
    """The dotted keys whose values differ between two configs, leaving out ``may_differ``
    (a key, or a section such as ``train``); a key in ``compare_as`` is compared through its function
    (e.g. a list of overrides without those that may change)."""
    found: list[str] = []
    compare_as = compare_as or {}

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in may_differ:
            return
        if prefix in compare_as:
            a, b = compare_as[prefix](a), compare_as[prefix](b)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            found.append(prefix)

    walk(config_lib.to_dict(saved), config_lib.to_dict(new), "")
    return found


def check_same_settings(path: str | Path, saved: Any, new: Any, may_differ: Collection[str], option: str,
                        compare_as: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
    """Refuse to resume the run in ``path`` (made with ``saved``) with other settings than ``new``."""
    keys = differing_keys(saved, new, may_differ, compare_as)
    if keys:
        raise OutDirError(f"{path} holds a run with other settings ({', '.join(keys)}); "
                          f"use a new {option}, or the same settings to resume")


def check_resumable(path: str | Path, config: Any, kind: str, may_differ: Collection[str], option: str,
                    compare_as: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
    """Refuse, before anything is written, a ``path`` that is a file, holds another command's run (a
    config.yaml that does not read as ``type(config)``), or holds a ``kind`` run with other settings
    than ``config`` (``may_differ`` aside, ``compare_as`` as in differing_keys). A new or config-less
    folder passes: ``claim`` judges those."""
    path = Path(path)
    check_folder_path(path)
    if not (path / CONFIG_FILE).exists():
        return
    saved = saved_config(path, type(config))
    if saved is None:
        raise OutDirError(f"{path} exists and is not a {kind} run ({CONFIG_FILE} holds other settings); "
                          "give an empty or new folder")
    check_same_settings(path, saved, config, may_differ, option, compare_as)
