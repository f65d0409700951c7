"""Where each split's CSV and clip folder sit under a MELD root, whichever re-upload the user has.

The official tarball puts train's files in ``MELD.Raw/train/`` and dev's and test's at the top of
``MELD.Raw/``; other copies flatten everything or nest it deeper (Kaggle: ``MELD-RAW/MELD.Raw/train/``).
Rather than list layouts, each name is searched for up to ``MAX_DEPTH`` levels below the root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meld.errors import MeldDataError
from meld.records import SPLITS

CLIP_DIRS: dict[str, str] = {
    "train": "train_splits",
    "dev": "dev_splits_complete",
    "test": "output_repeated_splits_test",
}
# Deep enough for the Kaggle copy seen from its dataset folder (MELD-RAW/MELD.Raw/train/train_splits),
# shallow enough that pointing at a home directory fails quickly instead of walking it all.
MAX_DEPTH = 4
# macOS archives add "__MACOSX/" trees that mirror the real folders with "._" stubs.
_SKIPPED_DIRS = {"__MACOSX"}


@dataclass(frozen=True)
class SplitLocation:
    split: str
    csv: Path
    clips: Path | None


def csv_name(split: str) -> str:
    return f"{split}_sent_emo.csv"


def _is_ignored(name: str) -> bool:
    # Hidden entries, including the "._name" resource forks macOS leaves beside every file.
    return name.startswith(".") or name in _SKIPPED_DIRS


def _search(root: Path, name: str, *, want_dir: bool) -> list[Path]:
    """Matches for ``name`` at the smallest depth (1..MAX_DEPTH) where any exists, breadth first."""
    level = [root]
    for _ in range(MAX_DEPTH):
        found: list[Path] = []
        below: list[Path] = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if _is_ignored(entry.name):
                    continue
                is_dir = entry.is_dir()
                if entry.name == name and is_dir == want_dir:
                    found.append(Path(entry.path))
                elif is_dir and entry.name not in CLIP_DIRS.values():
                    below.append(Path(entry.path))
        if found:
            return sorted(found)
        level = below
    return []


def _find_one(root: Path, name: str, *, want_dir: bool) -> Path | None:
    matches = _search(root, name, want_dir=want_dir)
    if len(matches) > 1:
        listed = ", ".join(str(match) for match in matches)
        raise MeldDataError(f"{name} is ambiguous under {root}: found at the same depth in {listed}")
    return matches[0] if matches else None


def find_split(root: str | Path, split: str, *, need_clips: bool) -> SplitLocation:
    """Locate ``{split}_sent_emo.csv`` and, if present (or required), the split's clip folder."""
    root = Path(root)
    if split not in SPLITS:
        raise MeldDataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise MeldDataError(f"MELD root {root} is not a folder")
    csv_path = _find_one(root, csv_name(split), want_dir=False)
    clips = _find_one(root, CLIP_DIRS[split], want_dir=True)
    if csv_path is None or (clips is None and need_clips):
        wanted = [f"file {csv_name(split)}"] if csv_path is None else []
        if clips is None and need_clips:
            wanted.append(f"folder {CLIP_DIRS[split]}/")
        raise MeldDataError(
            f"MELD {split} split not found: looked for {' and '.join(wanted)} under {root}, up to "
            f"{MAX_DEPTH} levels deep (hidden folders and __MACOSX skipped)"
        )
    return SplitLocation(split=split, csv=csv_path, clips=clips)


def find_layout(
    root: str | Path, splits: Sequence[str] = SPLITS, *, need_clips: bool = True
) -> dict[str, SplitLocation]:
    """``find_split`` for each split, keyed by split name."""
    return {split: find_split(root, split, need_clips=need_clips) for split in splits}
