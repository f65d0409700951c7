"""``python -m meld.prepare``: a MELD download (or the demo) -> cached log-mel features and a report.

    python -m meld.prepare [--data ROOT] [--cache DIR] [--workers N] [--max-seconds S] [--config YAML]

Finds each split's CSV and clip folder under ROOT (the built-in demo without ``--data``), decodes the
clip of every CSV row (PyAV, mono, 48 kHz, capped at ``max_seconds``), computes CLARA's log-mel and
stores it in the feature cache (``meld.feature_cache``) under DIR/audio-<key>/. Decoding runs in worker
processes, as it is the slow part. Each finished clip is appended to a journal at once, so Ctrl-C or
kill -9 loses none, and a rerun decodes only clips that are not cached yet or whose file changed.

The report, DIR/audio-<key>/prepare_report.json and a summary on stdout, lists every clip that is
missing, undecodable, silent or empty, or truncated, and every file in a clip folder that has no CSV
row (``._`` forks, ``final_videos_test`` copies, stray clips), each with its file and reason.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clara.config import ConfigError, load
from clara.io_utils import locked, remove_leftovers
from clara.run_dir import check_folder_path
from meld.clip_features import ClipTask, run_clips
from meld.dataset import DataConfig
from meld.demo import ensure_demo
from meld.errors import MeldDataError
from meld.feature_cache import (
    AudioSettings, CachedClip, ClipRecord, Journal, SplitStore, audio_cache_dir, default_cache_root, journal_files,
    open_stores, read_journal, store_path, write_settings, write_store,
)
from meld.layout import find_layout
from meld.prepare_report import ExtraFile, build_report, format_summary, write_report
from meld.records import SPLITS, Utterance, load_splits
from meld.spawn_guard import refuse_in_a_starting_worker

_CLIP_NAME = re.compile(r"dia[0-9]+_utt[0-9]+\.mp4")
_FINAL_VIDEOS = "final_videos_test"


def scan_clips(root: Path, split: str, folder: Path, row_names: set[str]) -> tuple[dict[str, Path], list[ExtraFile]]:
    """The files in ``folder`` that are clips of CSV rows (name -> path), and every other file with why."""
    clips: dict[str, Path] = {}
    extras: list[ExtraFile] = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        # Files only: folders are skipped, and so is a link to a clip that is not there (linked from a disk
        # not mounted), whose row then counts as missing instead of its stat() stopping the whole run.
        if not entry.is_file():
            continue
        name = entry.name
        if name.startswith("._"):
            reason = "macOS resource fork (AppleDouble), not audio"
        elif name.startswith("."):
            reason = "hidden file"
        elif name.startswith(_FINAL_VIDEOS):
            reason = f"MELD's second copy of {name.removeprefix(_FINAL_VIDEOS)}; only plain names are used"
        elif not _CLIP_NAME.fullmatch(name):
            reason = "not named like a MELD clip (dia{D}_utt{U}.mp4)"
        elif name not in row_names:
            reason = f"no row with this Dialogue_ID and Utterance_ID in {split}_sent_emo.csv"
        else:
            clips[name] = Path(entry.path)
            continue
        extras.append(ExtraFile(split, os.path.relpath(entry.path, root), reason))
    return clips, extras


def _has_csvs(root: Path) -> bool:
    try:
        find_layout(root, SPLITS, need_clips=False)
    except MeldDataError:
        return False
    return True


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Plan:
    """What one run has to do: the clips to decode, and what the scan found."""

    tasks: list[ClipTask] = field(default_factory=list)
    present: dict[str, list[Utterance]] = field(default_factory=dict)  # split -> rows whose clip exists
    missing: dict[str, str] = field(default_factory=dict)  # key -> the clip file expected
    extras: list[ExtraFile] = field(default_factory=list)


def _load_known(
    cache_dir: Path, settings: AudioSettings
) -> tuple[dict[str, SplitStore], dict[str, CachedClip], list[Path]]:
    """The split stores, every clip they or the journals hold (journals, being newer, win), the journals."""
    stores = open_stores(cache_dir, SPLITS)  # a damaged store is left out, so its split is decoded again
    known = {record.key: CachedClip(record, store=store) for store in stores.values() for record in store.records}
    journals = journal_files(cache_dir / "journal")
    for path in journals:
        known.update((clip.record.key, clip) for clip in read_journal(path, settings.n_mels))
    return stores, known, journals


def _plan(root: Path, layout: dict, utterances: dict[str, list[Utterance]], known: dict[str, CachedClip],
          settings: AudioSettings) -> _Plan:
    """Scan the clip folders; a clip is decoded unless a record of the same file (path, size, mtime) exists."""
    plan = _Plan()
    for split in SPLITS:
        rows = utterances[split]
        clips, extras = scan_clips(root, split, layout[split].clips, {u.clip_name for u in rows})
        plan.extras += extras
        plan.present[split] = [u for u in rows if u.clip_name in clips]
        for utt in rows:
            path = clips.get(utt.clip_name)
            if path is None:
                plan.missing[utt.key] = os.path.relpath(layout[split].clips / utt.clip_name, root)
                continue
            stat = path.stat()
            task = ClipTask(utt.key, str(path), os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns,
                            utt.end_s - utt.start_s, settings)
            if utt.key not in known or known[utt.key].record.source != task.source:
                plan.tasks.append(task)
    return plan


def prepare(
    data_root: str | Path,
    cache_root: str | Path | None = None,
    settings: AudioSettings = AudioSettings(),
    *,
    workers: int | None = None,
    progress: bool = False,
) -> dict:
    """Bring the feature cache of ``data_root`` up to date; return the report (also written as JSON).

    Raises MeldDataError for a missing root, CSV or clip folder, or a malformed CSV. KeyboardInterrupt
    passes through, with every clip finished so far in the journal. Call it under ``if __name__ ==
    "__main__":`` in a script: worker processes run the main module's top level (meld.spawn_guard).
    """
    refuse_in_a_starting_worker("meld.prepare.prepare")
    root = Path(data_root)
    try:
        layout = find_layout(root, SPLITS, need_clips=True)
    except MeldDataError as err:
        if _has_csvs(root):
            raise MeldDataError(f"{err}; the CSVs alone are there, which is enough for text-only use "
                                "(modality text) without prepare") from None
        raise
    utterances = load_splits(layout)
    cache_dir = audio_cache_dir(cache_root if cache_root is not None else default_cache_root(root), settings)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(cache_dir / ".lock", f"waiting for another prepare run on {cache_dir}"):
        started = time.perf_counter()
        # A run killed while writing a split store leaves its temporary behind, as large as the store; only
        # prepare writes here, and this run holds the lock.
        remove_leftovers(cache_dir)
        write_settings(cache_dir, settings)
        stores, known, earlier_journals = _load_known(cache_dir, settings)
        plan = _plan(root, layout, utterances, known, settings)

        journal = Journal(cache_dir / "journal")
        bar = tqdm(total=len(plan.tasks), unit="clip", desc="decoding", disable=not progress or not plan.tasks)

        def done(record: ClipRecord, mel: np.ndarray | None) -> None:
            known[record.key] = journal.append(record, mel)
            bar.update()

        workers = min(default_workers() if workers is None else workers, max(1, len(plan.tasks)))
        try:
            run_clips(plan.tasks, workers, done)
        finally:
            journal.close()
            bar.close()

        # Consolidate: each split's clips in CSV order, whatever order the runs finished them in, so an
        # interrupted and resumed run writes the same bytes as an uninterrupted one. A store written before
        # stores had a CRC32 is written again with one, from its own frames.
        for split in SPLITS:
            clips = [known[utt.key] for utt in plan.present[split]]
            store = stores.get(split)
            if store is None or not store.checked or store.records != [clip.record for clip in clips]:
                write_store(store_path(cache_dir, split), settings, clips)
        run = {"decoded": len(plan.tasks), "reused": sum(map(len, plan.present.values())) - len(plan.tasks),
               "workers": workers, "seconds": round(time.perf_counter() - started, 3)}
        records = {key: clip.record for key, clip in known.items()}
        report = build_report(root, cache_dir, settings, utterances, records, plan.missing, plan.extras, run)
        write_report(cache_dir, report)
        # Only now are the journals' clips safe in the stores.
        for path in [*earlier_journals, *([journal.path] if journal.path else [])]:
            path.unlink(missing_ok=True)
    return report


def add_audio_arguments(parser: argparse.ArgumentParser) -> None:
    """The audio-setting flags of ``prepare`` and of the commands that read what it prepared: a cache
    is found by its settings, so they take the same ones (read back by ``audio_config``)."""
    parser.add_argument("--max-seconds", type=float, help="cap on clip length (default 30; 0: no cap)")
    parser.add_argument("--config", help="data config YAML whose audio: section applies (configs/data/default.yaml)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="audio.* overrides, e.g. audio.min_seconds=0.2")


def audio_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of ``add_audio_arguments``' flags (a ConfigError for a bad one)."""
    overrides = list(args.set)
    for override in overrides:
        key = override.partition("=")[0].strip()
        if not key.startswith("audio."):
            # The rest of the data config (modality, context_turns, ...) is the fine-tune's: accepted here,
            # it would be read and then ignored.
            raise ConfigError(f"--set {override}: only audio.* settings apply here (they name the feature cache), "
                              "e.g. audio.min_seconds=0.2")
    if args.max_seconds is not None:
        # argparse takes "nan", "inf" and negatives as floats; only 0 means no cap.
        if not (math.isfinite(args.max_seconds) and args.max_seconds >= 0):
            raise ConfigError(f"--max-seconds must be a number of seconds >= 0 (0: no cap), got {args.max_seconds}")
        overrides.append(f"audio.max_seconds={args.max_seconds if args.max_seconds > 0 else 'null'}")
    return load(DataConfig, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meld.prepare",
        description="Decode MELD's clips into a cache of log-mel features, and report every clip that is "
        "missing, undecodable, silent, truncated or without a CSV row.",
    )
    parser.add_argument("--data", help="MELD root (MELD.Raw or a folder above it); default: the built-in demo")
    parser.add_argument("--cache", help="cache root; features go to CACHE/audio-<key>/ "
                        "(default: $MELD_CLARA_CACHE or ~/.cache/meld-clara, then features/<dataset>)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core)")
    add_audio_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = audio_config(args)
        if args.cache:
            check_folder_path(args.cache)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        root = Path(args.data) if args.data is not None else ensure_demo(log=print)
        report = prepare(root, args.cache, config.audio, workers=args.workers, progress=not args.no_progress)
    except (MeldDataError, ConfigError, OSError) as err:  # OSError: e.g. a cache folder that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every clip finished so far is kept; run the same command again to go on", file=sys.stderr)
        return 130
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
