"""``python -m meld.pretrain_manifest``: MELD clips + captions -> a manifest for ``python -m clara.pretrain``.

    python -m meld.prepare --data ROOT                       # first: finds the broken clips
    python -m meld.pretrain_manifest --data ROOT --out manifest.jsonl [--templates YAML] [--split train]
                                     [--max-seconds S --config YAML --set KEY=VALUE]  # as given to prepare
    python -m clara.pretrain data.train=manifest.jsonl train.out_dir=runs/clara-manifest  # adapts CLARA to MELD

One JSONL line per usable clip: ``{"audio": <absolute clip path>, "caption": ..., "language": "en",
"key": "train/dia0_utt0", "emotion": ..., "sentiment": ...}`` (clara.pretrain reads audio, caption and
language; the rest is for people). A clip that prepare's report marks missing, undecodable, silent or
empty is left out; a truncated one stays (pretraining cuts clips to ``data.max_seconds`` anyway).
Only train is exported by default: dev and test stay unseen for evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clara.config import ConfigError
from clara.io_utils import atomic_write_text
from clara.tokenizer import language_code, unknown_language
from meld.captions import caption_for, load_captions
from meld.demo import ensure_demo
from meld.errors import MeldDataError
from meld.feature_cache import TRUNCATED, AudioSettings, audio_cache_dir, default_cache_root
from meld.layout import find_layout
from meld.prepare import add_audio_arguments, audio_config
from meld.prepare_report import REPORT_NAME
from meld.records import SPLITS, load_splits


@dataclass(frozen=True)
class ManifestSummary:
    path: Path
    written: int
    skipped: dict[str, str]  # key -> why (status: reason), from prepare's report


def read_bad_clips(data_root: Path, cache_root: str | Path | None, settings: AudioSettings) -> dict[str, str]:
    """key -> "status: reason" of every row prepare could not cache (truncated clips are usable)."""
    cache_dir = audio_cache_dir(cache_root if cache_root is not None else default_cache_root(data_root), settings)
    path = cache_dir / REPORT_NAME
    cache = f" --cache {cache_root}" if cache_root is not None else ""
    if not path.is_file():
        raise MeldDataError(f"no prepare report at {path}: run `python -m meld.prepare --data {data_root}{cache}` "
                            "first, with the audio settings given here (it finds the clips that cannot be used)")
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
        return {p["key"]: f"{p['status']}: {p['reason']}" for p in problems if p["status"] != TRUNCATED}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        # A report cut short or edited by hand; prepare rewrites it (every decoded clip is reused).
        raise MeldDataError(f"{path}: not a readable prepare report ({type(err).__name__}: {err}); run "
                            f"`python -m meld.prepare --data {data_root}{cache}` again to rewrite it") from None


def export_manifest(
    data_root: str | Path,
    out: str | Path,
    *,
    templates: str | Path | None = None,
    splits: Sequence[str] = ("train",),
    cache_root: str | Path | None = None,
    settings: AudioSettings = AudioSettings(),
    language: str = "en",
) -> ManifestSummary:
    """Write the manifest of ``splits`` to ``out`` (atomically); raises MeldDataError / ConfigError.

    ``language`` is a code or a Whisper language name; rows hold its code."""
    root = Path(data_root)
    code = language_code(language)
    if code is None:  # checked before any work: clara.pretrain would refuse every row of the manifest
        raise ConfigError(f"language: {unknown_language(language)}")
    splits = list(dict.fromkeys(splits))  # a split named twice (--split train train) is still exported once
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise MeldDataError(f"split(s) {', '.join(unknown) or '(none)'}: expected some of {', '.join(SPLITS)}")
    captions = load_captions(templates)
    layout = find_layout(root, splits, need_clips=True)
    utterances = load_splits(layout)
    bad = read_bad_clips(root, cache_root, settings)
    lines, skipped = [], {}
    for split in splits:
        for utt in utterances[split]:
            if utt.key in bad:
                skipped[utt.key] = bad[utt.key]
                continue
            row = {"audio": str((layout[split].clips / utt.clip_name).resolve()), "caption": caption_for(utt, captions),
                   "language": code, "key": utt.key, "emotion": utt.emotion, "sentiment": utt.sentiment}
            lines.append(json.dumps(row, ensure_ascii=False))
    if not lines:
        raise MeldDataError(f"{root}: no usable clip in {', '.join(splits)}; nothing to export")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return ManifestSummary(Path(out), len(lines), skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.pretrain_manifest",
                                     description="Export MELD clips with captions as a clara.pretrain manifest.")
    parser.add_argument("--data", help="MELD root (default: the built-in demo)")
    parser.add_argument("--out", required=True, help="the manifest to write (.jsonl)")
    parser.add_argument("--templates", help="caption YAML (default: configs/captions/meld.yaml)")
    parser.add_argument("--split", nargs="+", default=["train"], choices=SPLITS,
                        help="splits to export (default train)")
    parser.add_argument("--cache", help="prepare's --cache, where its report is (default: as prepare's)")
    # A report lies in the cache folder of prepare's audio settings (min_seconds also decides which
    # clips are silent), so the same flags find it.
    add_audio_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if not args.out.endswith(".jsonl"):
            raise ConfigError(f"--out {args.out}: the manifest must be a .jsonl file")
        settings = audio_config(args).audio
        root = Path(args.data) if args.data is not None else ensure_demo(log=print)
        summary = export_manifest(root, args.out, templates=args.templates, splits=args.split, cache_root=args.cache,
                                  settings=settings)
    except (MeldDataError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary.written} clips with captions to {summary.path}; skipped {len(summary.skipped)} "
          f"that prepare could not use")
    for key, why in summary.skipped.items():
        print(f"  skipped {key}: {why}")
    # A folder of its own: the no-argument demo's runs/clara-pretrain-demo holds a run with other data,
    # which clara.pretrain refuses to mix into.
    print(f"next: python -m clara.pretrain data.train={summary.path} train.out_dir=runs/clara-{summary.path.stem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
