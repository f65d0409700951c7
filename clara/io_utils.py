"""Atomic file writes: a crash or Ctrl-C never leaves a half-written result behind; and the lock
file under which two processes building the same thing take turns."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


CACHE_ENV = "MELD_CLARA_CACHE"
# What making a file or folder raises where the user may not write: no permission, a read-only disk.
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@contextmanager
def locked(path: str | Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on file ``path`` (made if missing): a second process waits until the
    first leaves the block, printing ``waiting`` to stderr first when given. The lock goes with the
    process, so a killed one leaves nothing to clear."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _default_mode(full: int) -> int:
    """``full`` (0o666 for files, 0o777 for folders) less the process's umask: the mode a plain open or
    mkdir gives.  tempfile makes its files and folders private (0o600, 0o700), which would leave
    results unreadable to the rest of a team on a shared machine."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def user_cache_dir() -> Path:
    """The kit's cache for demos, features and embeddings: ``$MELD_CLARA_CACHE`` or ~/.cache/meld-clara."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "meld-clara").expanduser()


# The temporaries of atomic_path and atomic_directory: ".<target>.<tempfile's 8 characters>.tmp".
# Only a killed process leaves one behind (every other exit removes it).
STAGING_SUFFIX = ".tmp"
_LEFTOVER = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(STAGING_SUFFIX))


def is_leftover(path: str | Path) -> bool:
    """Whether ``path`` is named as an atomic write's temporary file or staging folder."""
    return bool(_LEFTOVER.fullmatch(Path(path).name))


def remove_leftovers(folder: str | Path) -> None:
    """Delete the atomic-write temporaries directly in ``folder`` (a killed run's: a half-written
    checkpoint can be as large as a checkpoint).  Only for a folder no other process is writing
    into at the time."""
    for entry in Path(folder).iterdir():
        if is_leftover(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    if path.is_dir():
        # Checked first: the rename would fail after the work, with an error naming the temporary file.
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=STAGING_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # After the writer, whatever it did: tempfile makes the file private, and so do writers that
        # replace it with their own (safetensors).
        tmp_path.chmod(_default_mode(0o666))
        _sync(tmp_path)
        os.replace(tmp_path, path)
        _sync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _sync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk.  Before the rename: after a power
    cut the new name must not point at data still in the page cache, an empty file in place of the
    checkpoint it replaced.  After it, for the folder: so the rename itself survives."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading (some platforms): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem without fsync for folders
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success it replaces ``path`` as a whole.

    Readers see the old folder or the new one, never a mix (between the two renames of a
    replacement, for an instant, neither); on an error the old one stays.  The old folder waits as
    ``.<name>.old`` during the swap: a process killed in that instant leaves it there, and the next
    call puts it back before anything else.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = path.with_name(f".{path.name}.old")
    if backup.exists() and not path.exists():
        os.replace(backup, path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=STAGING_SUFFIX, dir=path.parent))
    staging.chmod(_default_mode(0o777))
    try:
        yield staging
        for entry in (*staging.rglob("*"), staging):
            if entry.is_file():  # as a plain write leaves it: safetensors writes its files private
                entry.chmod(_default_mode(0o666))
            _sync(entry)  # on the disk before the swap (see _sync)
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(backup, path)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, path)
        _sync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
