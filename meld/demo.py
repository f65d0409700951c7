"""The built-in demo dataset: a small MELD.Raw tree made from a seed, to run every command without MELD.

``python -m meld.demo [--out DIR] [--size N] [--seed S] [--force]`` writes (DIR: by default the demo that
every command given no ``--data`` uses, ``default_demo_root()``)::

    DIR/MELD.Raw/train/train_sent_emo.csv   DIR/MELD.Raw/train/train_splits/dia{D}_utt{U}.mp4
    DIR/MELD.Raw/dev_sent_emo.csv           DIR/MELD.Raw/dev_splits_complete/dia{D}_utt{U}.mp4
    DIR/MELD.Raw/test_sent_emo.csv          DIR/MELD.Raw/output_repeated_splits_test/dia{D}_utt{U}.mp4
    DIR/MELD.Raw/DEMO_DEFECTS.json          the planted defects (what the prepare step should report)
    DIR/demo_manifest.json                  size, seed, version, counts; written last: marks it complete

The CSVs have MELD's columns, class skew and quirks; the clips are AAC at 48 kHz whose synthetic voices
(``meld.demo_audio``) and words (``meld.demo_text``) both carry the emotion, imperfectly. A few defects
are planted on purpose so the data checks have something to find. The same size and seed give
byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np

from clara.cli import describe
from clara.io_utils import (
    NOT_WRITABLE, atomic_directory, atomic_write_text, is_leftover, locked, remove_leftovers, user_cache_dir,
)
from clara.run_dir import OutDirError, check_folder_path
from meld.demo_audio import SAMPLE_RATE, ClipSpec, render_clip, speaking_rate, voice_for
from meld.demo_text import CAST, GUESTS, MAIN_CAST, long_phrase, phrase, syllables
from meld.labels import EMOTIONS
from meld.records import COLUMNS
from meld.spawn_guard import refuse_in_a_starting_worker

DEMO_VERSION = 1  # bump whenever the output changes, so cached demos get rebuilt
DEFAULT_SIZE = 400
MIN_SIZE = 30
ROOT_NAME = "MELD.Raw"
MANIFEST_NAME = "demo_manifest.json"
DEFECTS_NAME = "DEMO_DEFECTS.json"
LOCK_NAME = ".demo.lock"

# split -> (CSV, clip folder), relative to MELD.Raw, as in the official tarball.
LAYOUT: dict[str, tuple[str, str]] = {
    "train": ("train/train_sent_emo.csv", "train/train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
SPLIT_SHARES = {"train": 0.70, "dev": 0.125, "test": 0.175}
MIN_SPLIT = 10  # dev and test hold at least this many, so every class fits
# MELD's train class counts: the demo keeps this skew, with a floor so fear and disgust always appear.
MELD_TRAIN_COUNTS = {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683,
                     "disgust": 271, "fear": 268}
RARE_FLOOR = 0.03  # each class gets at least this share of a split (and at least one row)
SENTIMENT_OF = {"neutral": "neutral", "joy": "positive", "anger": "negative", "sadness": "negative",
                "disgust": "negative", "fear": "negative"}  # surprise: positive or negative, 50/50

MIN_CLIP_S, MAX_CLIP_S, LONG_CLIP_S = 1.0, 6.0, 12.0
SHORT_CLIP_S = 0.05
CHANNEL_CHOICES, CHANNEL_ODDS = (2, 6, 1), (0.86, 0.09, 0.05)
AAC_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}
AAC_BITRATES = {1: 48_000, 2: 64_000, 6: 128_000}
# macOS's AppleDouble header ("._" files beside every file of an archive made on a Mac).
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
# What file browsers write into a folder once it is shown (macOS Finder, Windows Explorer): opening a
# built demo's folder must not make it "someone's files" that the next build refuses.
BROWSER_FILES = frozenset({".DS_Store", "Thumbs.db"})


@dataclass(frozen=True)
class Row:
    """One CSV row; times are already formatted (``h:mm:ss,mmm`` or ``hh:mm:ss,mmm``)."""

    split: str
    sr_no: int
    text: str
    speaker: str
    emotion: str
    sentiment: str
    dialogue: int
    utterance: int
    season: int
    episode: int
    start: str
    end: str

    @property
    def clip_name(self) -> str:
        return f"dia{self.dialogue}_utt{self.utterance}.mp4"

    @property
    def key(self) -> str:
        """``train/dia3_utt1``: the same key as ``meld.records.Utterance.key``."""
        return f"{self.split}/dia{self.dialogue}_utt{self.utterance}"

    def cells(self) -> list[str | int]:
        return [self.sr_no, self.text, self.speaker, self.emotion, self.sentiment, self.dialogue,
                self.utterance, self.season, self.episode, self.start, self.end]


@dataclass(frozen=True)
class ClipJob:
    """One file in a clip folder: synthesised from ``spec``, or ``payload`` written as is."""

    path: str  # relative to MELD.Raw
    spec: ClipSpec | None
    payload: bytes = b""


@dataclass(frozen=True)
class Plan:
    rows: tuple[Row, ...]
    clips: tuple[ClipJob, ...]
    defects: tuple[dict, ...]  # what a data check should report
    quirks: tuple[dict, ...]  # what a loader should take in its stride


def default_demo_root() -> Path:
    """Where commands given no ``--data`` keep the demo: ``$MELD_CLARA_CACHE`` or ~/.cache/meld-clara, /demo."""
    return user_cache_dir() / "demo"


def _split_sizes(size: int) -> dict[str, int]:
    dev = max(MIN_SPLIT, round(size * SPLIT_SHARES["dev"]))
    test = max(MIN_SPLIT, round(size * SPLIT_SHARES["test"]))
    return {"train": size - dev - test, "dev": dev, "test": test}


def _class_counts(n: int) -> dict[str, int]:
    """MELD's skew scaled to ``n`` rows, every class at least max(1, RARE_FLOOR * n), neutral the rest."""
    floor = max(1, round(RARE_FLOOR * n))
    total = sum(MELD_TRAIN_COUNTS.values())
    counts = {e: max(floor, round(n * MELD_TRAIN_COUNTS[e] / total)) for e in EMOTIONS if e != "neutral"}
    return {"neutral": n - sum(counts.values()), **counts}


def _timestamp(ms: int, two_digit_hour: bool) -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}" if two_digit_hour else f"{h}:{m:02d}:{s:02d},{ms:03d}"


def _clip_seconds(rng: np.random.Generator, text: str, emotion: str, longest: float) -> float:
    """How long saying ``text`` takes at the emotion's pace, with lead-in, tail and a pause or two."""
    talk = syllables(text) / speaking_rate(emotion) * rng.uniform(1.0, 1.3)
    return float(np.clip(talk + rng.uniform(0.4, 0.9), MIN_CLIP_S + rng.uniform(0.0, 0.3), longest))


def _plan_split(rng: np.random.Generator, split: str, index: int, n: int, seed: int, voices: dict,
                quirks: list[dict]) -> tuple[list[Row], list[ClipSpec]]:
    """Rows and clip specs of one split: dialogues of 2-9 turns among 2-3 regulars and now and then a guest."""
    emotions = [e for e, k in _class_counts(n).items() for _ in range(k)]
    rng.shuffle(emotions)
    # A rambling turn or two in train: the long tail of clip lengths (up to LONG_CLIP_S).
    long_turns = set(rng.choice(n, size=1 + (n >= 200), replace=False).tolist()) if split == "train" else set()
    rows: list[Row] = []
    specs: list[ClipSpec] = []
    dialogue, i = 0, 0
    skipped = int(rng.integers(1, 4)) if split == "train" else -1  # MELD's train lacks a dialogue id too
    while i < n:
        if dialogue == skipped:
            quirks.append({"kind": "dialogue_id_gap", "split": split, "dialogue_id": dialogue})
            dialogue += 1
        turns = min(int(rng.integers(2, 10)), n - i)
        cast = list(rng.choice(list(MAIN_CAST), size=int(rng.integers(2, 4)), replace=False))
        if rng.random() < 0.25:
            cast.append(list(GUESTS)[rng.integers(len(GUESTS))])
        season, episode = int(rng.integers(1, 11)), int(rng.integers(1, 25))
        two_digit_hour = rng.random() < 0.75
        clock = int(rng.integers(60_000, 1_200_000))  # ms into the episode
        utterance = 0
        for turn in range(turns):
            if turn and rng.random() < 0.06:
                utterance += 1
                quirks.append({"kind": "utterance_id_gap", "split": split,  # key: the row after the gap
                               "key": f"{split}/dia{dialogue}_utt{utterance}"})
            emotion = emotions[i]
            sentiment = SENTIMENT_OF.get(emotion) or ("positive" if rng.random() < 0.5 else "negative")
            speaker = cast[rng.integers(len(cast))]
            if i in long_turns:
                text, longest = long_phrase(rng, emotion, sentiment), LONG_CLIP_S
            else:
                text, longest = phrase(rng, emotion, sentiment), MAX_CLIP_S
            seconds = _clip_seconds(rng, text, emotion, longest)
            end = clock + round(seconds * 1000)
            rows.append(Row(split, i + 1, text, speaker, emotion, sentiment, dialogue, utterance, season, episode,
                            _timestamp(clock, two_digit_hour), _timestamp(end, two_digit_hour)))
            channels = int(rng.choice(CHANNEL_CHOICES, p=CHANNEL_ODDS))
            specs.append(ClipSpec(emotion, voices[speaker], seconds, channels, (seed, index, dialogue, utterance)))
            clock = end + int(rng.integers(100, 1500))
            utterance += 1
            i += 1
        dialogue += 1
    return rows, specs


def _old_encoding(text: str) -> str:
    """The text as the CSVs inside the original tarball hold it: cp1252 punctuation as C1 controls."""
    return text.encode("cp1252").decode("latin-1")


def _garbage_mp4(rng: np.random.Generator) -> bytes:
    """An mp4 that cannot be decoded: a valid ``ftyp`` box, then noise and no ``moov`` box."""
    return b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + rng.bytes(int(rng.integers(3000, 9000)))


def _check(size: int, seed: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"demo size must be at least {MIN_SIZE} utterances, got {size}")
    if seed < 0:
        raise ValueError(f"demo seed must be 0 or more, got {seed}")


def plan_demo(size: int = DEFAULT_SIZE, seed: int = 0) -> Plan:
    """Every row, clip, defect and quirk of the demo, without synthesising anything (fast, pure)."""
    _check(size, seed)
    rng = np.random.default_rng(seed)
    voices = {name: voice_for(rng, female) for name, female in CAST.items()}
    quirks: list[dict] = []
    rows: dict[str, list[Row]] = {}
    specs: dict[str, list[ClipSpec]] = {}
    for index, (split, n) in enumerate(_split_sizes(size).items()):
        rows[split], specs[split] = _plan_split(rng, split, index, n, seed, voices, quirks)

    # Train's "Sr No." restarts once, as in MELD (it is not a key).
    train = rows["train"]
    restart = int(rng.integers(len(train) // 2, len(train)))
    train[restart:] = [replace(r, sr_no=r.sr_no - min(5, restart)) for r in train[restart:]]
    quirks.append({"kind": "duplicate_sr_no", "split": "train", "key": train[restart].key})

    jobs, defects = _plant_defects(rng, rows, specs, seed)
    return Plan(tuple(r for split in LAYOUT for r in rows[split]), tuple(jobs), tuple(defects), tuple(quirks))


def _plant_defects(rng: np.random.Generator, rows: dict[str, list[Row]], specs: dict[str, list[ClipSpec]],
                   seed: int) -> tuple[list[ClipJob], list[dict]]:
    """Clip jobs for every row, with MELD's kinds of damage planted (``rows`` is edited in place).

    Damaged rows are neutral ones, so the class counts of usable rows keep their floor.
    """
    defects: list[dict] = []

    def defect(kind: str, split: str, file: str, row: Row, detail: str, **extra: str) -> None:
        defects.append({"kind": kind, "split": split, "key": row.key, "file": file, "detail": detail,
                        **extra})

    def neutral_row(split: str, *taken: int) -> int:
        choices = [j for j, r in enumerate(rows[split]) if r.emotion == "neutral" and j not in taken and j > 0]
        return int(choices[rng.integers(len(choices))])

    def clip_path(split: str, name: str) -> str:
        return f"{LAYOUT[split][1]}/{name}"

    train, test = rows["train"], rows["test"]
    corrupt = neutral_row("train")
    silent = neutral_row("train", corrupt)
    missing = neutral_row("dev")
    short = neutral_row("test")
    test[short] = replace(test[short], end=test[short].start)
    twin = int(rng.choice([j for j in range(len(test)) if j != short]))

    jobs: list[ClipJob] = []
    for split in LAYOUT:
        for j, (row, spec) in enumerate(zip(rows[split], specs[split])):
            path = clip_path(split, row.clip_name)
            if (split, j) == ("train", corrupt):
                jobs.append(ClipJob(path, None, _garbage_mp4(rng)))
                defect("corrupt_clip", split, path, row, "not a decodable mp4 (no moov box)")
            elif (split, j) == ("train", silent):
                jobs.append(ClipJob(path, replace(spec, silent=True)))
                defect("silent_clip", split, path, row, "digital silence for the whole clip")
            elif (split, j) == ("dev", missing):
                defect("missing_clip", split, path, row, "the CSV row has no clip")
            elif (split, j) == ("test", short):
                jobs.append(ClipJob(path, replace(spec, duration=SHORT_CLIP_S)))
                defect("short_clip", split, path, row, f"{SHORT_CLIP_S * 1000:.0f} ms long, StartTime = EndTime")
            else:
                jobs.append(ClipJob(path, spec))

    # One row in the old encoding; a line with typographic punctuation shows it (short splits may lack one).
    candidates = [j for j in range(1, len(train)) if j not in (corrupt, silent)]
    with_punctuation = [j for j in candidates if train[j].text != _old_encoding(train[j].text)] or candidates
    old = int(with_punctuation[rng.integers(len(with_punctuation))])
    clean = train[old].text if train[old].text != _old_encoding(train[old].text) else "I don’t know… maybe."
    train[old] = replace(train[old], text=_old_encoding(clean))
    defect("old_encoding", "train", LAYOUT["train"][0], train[old], "C1 control characters for cp1252 punctuation",
           text=train[old].text, clean=clean)

    last = rows["dev"][-1]
    extra = replace(last, utterance=last.utterance + 1)
    jobs.append(ClipJob(clip_path("dev", extra.clip_name),
                        replace(specs["dev"][-1], seed=(seed, 1, extra.dialogue, extra.utterance))))
    defect("extra_clip", "dev", clip_path("dev", extra.clip_name), extra, "a clip with no CSV row")

    fork = clip_path("train", "._" + train[0].clip_name)
    jobs.append(ClipJob(fork, None, APPLE_DOUBLE.ljust(4096, b"\x00")))
    defect("resource_fork", "train", fork, train[0], "macOS AppleDouble file beside the real clip")

    copy = clip_path("test", "final_videos_test" + test[twin].clip_name)
    jobs.append(ClipJob(copy, specs["test"][twin]))
    defect("final_videos_copy", "test", copy, test[twin], "a second copy of a clip, named as in MELD's test folder")
    return jobs, defects


def encode_mp4(path: Path, audio: np.ndarray) -> None:
    """Write (channels, n) float32 samples at SAMPLE_RATE as an audio-only mp4 with one AAC stream.

    The "fast" AAC coder is ~3x quicker than the default here and no worse for this material; the
    muxer writes no dates or random ids, so the same samples give the same bytes.
    """
    layout = AAC_LAYOUTS[audio.shape[0]]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE, layout=layout, options={"aac_coder": "fast"})
        stream.bit_rate = AAC_BITRATES[audio.shape[0]]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=layout)
        frame.sample_rate = SAMPLE_RATE
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _write_clip(task: tuple[Path, ClipJob]) -> None:
    root, job = task
    path = root / job.path
    if job.spec is None:
        path.write_bytes(job.payload)
    else:
        encode_mp4(path, render_clip(job.spec))


def _write_tree(root: Path, plan: Plan, workers: int, log: Callable[[str], None]) -> None:
    """Write CSVs, clips and DEMO_DEFECTS.json of ``plan`` under ``root`` (an empty folder)."""
    for split, (csv_path, clip_dir) in LAYOUT.items():
        (root / clip_dir).mkdir(parents=True, exist_ok=True)
        # MELD's CSVs are UTF-8 with CRLF line ends, fields quoted only where needed (the times).
        with open(root / csv_path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(r.cells() for r in plan.rows if r.split == split)
    tasks = [(root, job) for job in plan.clips]
    log(f"synthesising and encoding {len(tasks)} clips with {workers} worker{'s' * (workers > 1)}")
    step = max(1, len(tasks) // 5)
    # "spawn": the caller may hold CUDA or OpenMP threads that a forked child must not inherit.
    with (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1
          else nullcontext()) as pool:
        written = pool.map(_write_clip, tasks, chunksize=4) if pool else map(_write_clip, tasks)
        for done, _ in enumerate(written, 1):
            if done % step == 0:
                log(f"  {done}/{len(tasks)} clips")
    atomic_write_text(root / DEFECTS_NAME, json.dumps(
        {"version": DEMO_VERSION, "defects": list(plan.defects), "quirks": list(plan.quirks)},
        indent=2, ensure_ascii=True) + "\n")


def _summary_counts(plan: Plan) -> dict[str, dict]:
    counts = {}
    for split in LAYOUT:
        rows = [r for r in plan.rows if r.split == split]
        emotions = Counter(r.emotion for r in rows)
        counts[split] = {"utterances": len(rows), "dialogues": len({r.dialogue for r in rows}),
                         "emotions": {e: emotions[e] for e in EMOTIONS}}
    return counts


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a complete demo in ``out``, or None if there is none (or it is unreadable)."""
    try:
        manifest = json.loads((Path(out) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(out: Path, size: int, seed: int) -> bool:
    manifest = read_manifest(out)
    return (manifest is not None and (out / ROOT_NAME / DEFECTS_NAME).is_file()
            and [manifest.get(k) for k in ("version", "size", "seed")] == [DEMO_VERSION, size, seed])


def _check_is_a_demo_folder(out: Path) -> None:
    """Refuse a folder holding anything but a demo build (its tree, manifest, lock, a file browser's
    BROWSER_FILES, and a running or killed build's staging folder, set-aside old tree or half-written
    manifest): the demo would be written in among someone's files."""
    ours = {ROOT_NAME, MANIFEST_NAME, LOCK_NAME, *BROWSER_FILES}
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in ours and not p.name.startswith(f".{ROOT_NAME}.") and not is_leftover(p))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(f"{out} holds other files ({shown}), not a demo build; give a new or empty folder")


def _already_built(out: Path, size: int, seed: int, force: bool, log: Callable[[str], None]) -> bool:
    if force or not _is_complete(out, size, seed):
        return False
    log(f"{out / ROOT_NAME} already holds the demo of size {size}, seed {seed}: nothing rewritten")
    return True


@contextmanager
def _build_lock(out: Path, size: int, seed: int) -> Iterator[None]:
    """Hold the lock under which builds of ``out`` take turns, making ``out`` first if missing.

    A folder that is not a demo's is refused before the lock file is made in it, so it is left untouched;
    one the user may not write (a team's shared, pre-built demo) is one error naming it.
    """
    with ExitStack() as lock:
        try:
            out.mkdir(parents=True, exist_ok=True)
            _check_is_a_demo_folder(out)
            lock.enter_context(locked(out / LOCK_NAME))
        except OSError as error:
            if error.errno not in NOT_WRITABLE:
                raise
            raise PermissionError(f"{out}: no complete demo of size {size}, seed {seed} is there, and this folder "
                                  "cannot be written to build it; give a folder you can write (--out, or "
                                  "MELD_CLARA_CACHE for the default demo)") from None
        yield


def make_demo(out: str | Path, *, size: int = DEFAULT_SIZE, seed: int = 0, force: bool = False,
              workers: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Build the demo under ``out`` and return its MELD root, ``out/MELD.Raw``.

    Returns at once when ``out`` already holds a complete demo of this size, seed and version (unless
    ``force``). The tree is built in a hidden folder beside it and moved into place, and the manifest is
    written last, so an interrupted build is never taken for a complete one. ``workers`` defaults to
    up to 4 processes for big builds and 1 for small ones, where starting processes costs more. A complete
    demo is used without writing anything, so a folder the user may only read serves as well.
    """
    out = Path(out)
    root = out / ROOT_NAME
    log = log or (lambda message: None)
    _check(size, seed)
    refuse_in_a_starting_worker("meld.demo.make_demo (or ensure_demo)")
    # Checked before the lock, whose file could not be opened in a folder the user may only read; the
    # manifest is written last, so a build under way in another process is not taken for complete.
    if _already_built(out, size, seed, force, log):
        return root
    with _build_lock(out, size, seed):  # two commands building the same demo take turns
        if _already_built(out, size, seed, force, log):  # the build this one waited for made it
            return root
        if root.exists() and not (root / DEFECTS_NAME).is_file():
            raise FileExistsError(f"{root} exists and is not a demo (it has no {DEFECTS_NAME}); not overwriting it")
        remove_leftovers(out)  # a killed build's; under the lock no other build is writing here
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        started = time.perf_counter()
        log(f"building the demo (size {size}, seed {seed}) in {root}")
        plan = plan_demo(size, seed)
        if workers is None:
            workers = min(os.cpu_count() or 1, 4) if len(plan.clips) >= 100 else 1
        # The old tree is set aside whole before it is deleted: deleted in place, an interruption could
        # leave it without DEFECTS_NAME, a tree the next build would refuse to replace.
        with atomic_directory(root) as building:
            _write_tree(building, plan, workers, log)
        # No build time in it: the manifest is as byte-identical across builds as the tree it describes.
        manifest = {"version": DEMO_VERSION, "size": size, "seed": seed, "counts": _summary_counts(plan),
                    "defects": [f"{d['kind']} ({d['key']})" for d in plan.defects]}
        atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        log(f"built in {time.perf_counter() - started:.1f} s")
    return root


def ensure_demo(log: Callable[[str], None] | None = None) -> Path:
    """The MELD root of the default demo (``default_demo_root()``), built there first if needed."""
    return make_demo(default_demo_root(), log=log)


def summary(root: Path, manifest: dict) -> str:
    """One paragraph: where the demo is, counts per split and class, defects."""
    counts = manifest["counts"]
    splits = ", ".join(f"{s} {c['utterances']} utterances in {c['dialogues']} dialogues" for s, c in counts.items())
    classes = ", ".join(f"{e} " + "/".join(str(counts[s]["emotions"][e]) for s in counts) for e in EMOTIONS)
    return (f"Demo MELD at {root} (size {manifest['size']}, seed {manifest['seed']}): {splits}. "
            f"Emotions ({'/'.join(counts)}): {classes}. "
            f"{len(manifest['defects'])} planted defects for the data checks to find: "
            f"{'; '.join(manifest['defects'])} (details in {root / DEFECTS_NAME}).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.demo", description=describe(__doc__))
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to build the demo in (MELD root: OUT/MELD.Raw); default: the demo the "
                             f"other commands use without --data, {default_demo_root()}")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"utterances over all splits (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="the seed the whole tree follows (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds this demo already")
    args = parser.parse_args(argv)
    out = args.out or default_demo_root()
    try:
        check_folder_path(out)
        root = make_demo(out, size=args.size, seed=args.seed, force=args.force, log=print)
    except (ValueError, OSError, OutDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(root, read_manifest(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
