"""What ``meld.prepare`` found: the ``prepare_report.json`` document and its printed summary."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from clara.config import to_dict
from clara.io_utils import atomic_write_bytes
from meld.feature_cache import OK, SILENT_OR_EMPTY, TRUNCATED, UNDECODABLE, AudioSettings, ClipRecord
from meld.records import Utterance

REPORT_NAME = "prepare_report.json"
MISSING = "missing"
# Columns of the counts, in the order printed; a row's clip is exactly one of the first five.
COUNTS = ("rows", OK, TRUNCATED, MISSING, UNDECODABLE, SILENT_OR_EMPTY, "cached", "extra_files")
_HEADINGS = {"rows": "rows", OK: "ok", TRUNCATED: "truncated", MISSING: "missing", UNDECODABLE: "undecodable",
             SILENT_OR_EMPTY: "silent/empty", "cached": "cached", "extra_files": "no CSV row"}
_SHOWN = 10  # lines printed per kind of problem; the JSON report has them all


@dataclass(frozen=True)
class Problem:
    """A CSV row whose clip is not cached as is."""

    split: str
    key: str
    file: str  # relative to the data root
    status: str  # MISSING, UNDECODABLE, SILENT_OR_EMPTY or TRUNCATED (cached, but cut)
    reason: str


@dataclass(frozen=True)
class ExtraFile:
    """A file in a clip folder that no CSV row refers to; it is ignored."""

    split: str
    file: str  # relative to the data root
    reason: str


def build_report(
    root: Path,
    cache_dir: Path,
    settings: AudioSettings,
    utterances: Mapping[str, Sequence[Utterance]],
    records: Mapping[str, ClipRecord],
    missing: Mapping[str, str],
    extras: Sequence[ExtraFile],
    run: Mapping[str, float | int],
) -> dict:
    """The report of one run. ``records``: by key, every row with a clip; ``missing``: key -> expected file."""
    problems: list[Problem] = []
    splits: dict[str, dict[str, int]] = {}
    for split, rows in utterances.items():
        counts = dict.fromkeys(COUNTS, 0)
        counts["rows"] = len(rows)
        counts["extra_files"] = sum(extra.split == split for extra in extras)
        for utt in rows:
            if utt.key in missing:
                counts[MISSING] += 1
                problems.append(Problem(split, utt.key, missing[utt.key], MISSING, "no such file in the clip folder"))
                continue
            record = records[utt.key]
            counts[record.status] += 1
            counts["cached"] += record.cached
            if record.status != OK:
                problems.append(Problem(split, utt.key, record.file, record.status, record.reason))
        splits[split] = counts
    total = {name: sum(counts[name] for counts in splits.values()) for name in COUNTS}
    return {
        "data_root": str(root.resolve()),
        "cache_dir": str(cache_dir.resolve()),
        "cache_key": settings.key(),
        "settings": to_dict(settings),
        "counts": {**splits, "total": total},
        "problems": [asdict(problem) for problem in problems],
        "extra_files": [asdict(extra) for extra in extras],
        "run": dict(run),
    }


def write_report(cache_dir: Path, report: dict) -> Path:
    path = cache_dir / REPORT_NAME
    atomic_write_bytes(path, _utf8(json.dumps(report, indent=2, ensure_ascii=False) + "\n"))
    return path


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8, a file or folder name that is not UTF-8 included: Python holds such a name's bytes
    as lone surrogates, which UTF-8 cannot encode; they are written as ``\\udcXX``, which is also JSON's escape
    for them, so the report reads back with the very names."""
    return text.encode("utf-8", "backslashreplace")


def format_summary(report: dict) -> str:
    """A counts table per split, then each problem and extra file (the first few of each kind)."""
    counts = report["counts"]
    width = max(len(heading) for heading in _HEADINGS.values())
    lines = [
        f"MELD at {report['data_root']}",
        f"features in {report['cache_dir']} (key {report['cache_key']})",
        "",
        "split  " + " ".join(f"{_HEADINGS[name]:>{width}}" for name in COUNTS),
    ]
    lines += [f"{split:<6} " + " ".join(f"{c[name]:>{width}}" for name in COUNTS) for split, c in counts.items()]
    if report["problems"]:
        lines.append("clips not cached as they are:")
    by_status: Counter[str] = Counter()
    for problem in report["problems"]:
        by_status[problem["status"]] += 1
        if by_status[problem["status"]] <= _SHOWN:
            lines.append(f"  {problem['status']:<15} {problem['file']}: {problem['reason']}")
    lines += [f"  ... and {n - _SHOWN} more {status} (see the report)" for status, n in by_status.items() if n > _SHOWN]
    extras = report["extra_files"]
    if extras:
        lines.append(f"files without a CSV row (ignored): {len(extras)}")
        lines += [f"  {extra['file']}: {extra['reason']}" for extra in extras[:_SHOWN]]
        if len(extras) > _SHOWN:
            lines.append(f"  ... and {len(extras) - _SHOWN} more (see the report)")
    run = report["run"]
    if run["decoded"]:
        rate = run["decoded"] / run["seconds"]
        lines.append(f"decoded {run['decoded']} clips in {run['seconds']:.1f} s ({rate:.1f} clips/s, "
                     f"{run['workers']} worker{'s' * (run['workers'] > 1)}); {run['reused']} were cached already")
    else:
        lines.append(f"nothing to decode: all {run['reused']} clips were cached already")
    lines.append(f"report: {Path(report['cache_dir']) / REPORT_NAME}")
    return _utf8("\n".join(lines)).decode("utf-8")  # printable: a stdout that is strict UTF-8 refuses surrogates
