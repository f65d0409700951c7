"""The audio feature cache: log-mel spectrograms of MELD clips, keyed by the settings that made them.

Layout under a cache root (``--cache DIR``)::

    DIR/audio-<key>/settings.json           the AudioSettings and format version that <key> hashes
    DIR/audio-<key>/{train,dev,test}.safetensors   one consolidated store per split (below)
    DIR/audio-<key>/journal/run-0001.log    clips finished by runs not yet consolidated (below)
    DIR/audio-<key>/prepare_report.json     what the last prepare run found

A split store is one safetensors file, written atomically, memory-mapped when read:

- tensor ``mel``: float16 [sum of T, n_mels], every cached clip's frames time-major, one clip after the
  other in CSV order; a clip is rows ``offset : offset + frames`` (its [n_mels, T] log-mel, transposed),
  its offset being the sum of the frames of the cached clips before it;
- metadata ``meld_clara``: JSON ``{"format", "settings", "records": [...], "mel_crc32"}`` with one record
  per clip that was decoded (cached or not; see ``ClipRecord``), in CSV order, and the CRC32 of ``mel``'s
  bytes. A single metadata key, because safetensors writes several in hash order, and the same inputs
  must give the same bytes.

The journal makes a run resumable without losing finished clips: the preparing process appends one
record per clip (header with CRC32, JSON ``ClipRecord``, float16 [T, n_mels] bytes) and flushes it. A run
killed mid-append leaves a torn last record, which fails its length or CRC check and is dropped.

A store damaged on disk (truncated, overwritten, a byte of its mel changed) is rebuilt by the next prepare
run: ``open_stores`` leaves it out, so its clips are decoded again and the store written anew; readers get an
error saying so. A store written before ``mel_crc32`` existed is read unchecked, and prepare rewrites it
with one (from its own frames: nothing is decoded again).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from clara.audio_frontend import SAMPLE_RATE, LogMel, empty_mel_bands
from clara.config import ConfigError, to_dict
from clara.io_utils import atomic_path, atomic_write_text, user_cache_dir
from meld.errors import MeldDataError

CACHE_FORMAT = 1

# Clip outcomes. The first two are stored with their mel; the rest only as a record with the reason.
OK = "ok"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
SILENT_OR_EMPTY = "silent_or_empty"
CACHED = (OK, TRUNCATED)

_META_KEY = "meld_clara"
_JOURNAL_MAGIC = b"MCJ1"
_JOURNAL_HEADER = struct.Struct("<4sIIQ")  # magic, crc32(meta + data), len(meta), len(data)
_JOURNAL_NAME = re.compile(r"run-([0-9]+)\.log")
_CRC_ROWS = 65536  # mel rows per read when checking a store's CRC: ~10 MB at 80 mels, whatever the store's size

# Where the AudioSettings being built sit in the user's config, so their errors name the key the user
# types: "audio" in a DataConfig (meld.prepare's --config/--set, meld.zeroshot), "data.audio" in
# meld.finetune's config. A context variable, as the settings are built deep inside clara.config.load.
_AUDIO_KEY: ContextVar[str] = ContextVar("audio_key", default="audio")


@contextmanager
def audio_key(path: str) -> Iterator[None]:
    """AudioSettings built inside this block name their fields ``<path>.<field>`` in their errors."""
    token = _AUDIO_KEY.set(path)
    try:
        yield
    finally:
        _AUDIO_KEY.reset(token)


@dataclass(frozen=True)
class AudioSettings:
    """Everything that decides the cached features; any change gives a different cache key.

    The mel fields are ``clara.audio_frontend.LogMel``'s (CLARA's front-end by default). ``max_seconds``
    caps long clips (MELD has wrongly cut ones of 305 s; None: no cap); clips shorter than
    ``min_seconds`` or with a peak below ``silence_dbfs`` are reported as silent or empty, not cached.
    """

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    top_db: float = 80.0
    max_seconds: float | None = 30.0
    min_seconds: float = 0.15
    silence_dbfs: float = -80.0

    def __post_init__(self) -> None:
        # max_seconds=30 is the setting 30.0 (the two compare equal), but key() hashes their JSON, "30" vs
        # "30.0": a second cache, and build_datasets would not find the features prepare wrote.
        for name in ("f_min", "f_max", "top_db", "max_seconds", "min_seconds", "silence_dbfs"):
            if type(getattr(self, name)) is int:
                object.__setattr__(self, name, float(getattr(self, name)))
        key = _AUDIO_KEY.get()
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_seconds is not None and not 0 < self.max_seconds < math.inf:  # nan fails too
            raise ConfigError(f"{key}.max_seconds must be positive (or null for no cap), got {self.max_seconds}")
        if not 0 <= self.min_seconds < math.inf:
            raise ConfigError(f"{key}.min_seconds must be >= 0, got {self.min_seconds}")
        # Outside these bounds the mel filterbank has empty bands, or the dB floor is at or above the
        # peak: every clip would be cached as a constant spectrogram, with no error anywhere.
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ConfigError(f"{key}.f_min and {key}.f_max must satisfy 0 <= f_min < f_max <= sample_rate / 2 "
                              f"({self.sample_rate / 2:g} Hz), got f_min {self.f_min}, f_max {self.f_max}")
        empty = empty_mel_bands(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max)
        if empty:
            raise ConfigError(
                f"{key}.n_mels {self.n_mels} is too many for {self.f_min:g}-{self.f_max:g} Hz at {key}.n_fft {self.n_fft}: "
                f"{len(empty)} mel band(s) reach no FFT bin (first: band {empty[0]}), so they would hold no signal; "
                "use fewer mels, a wider band or a larger n_fft")
        if not self.top_db > 0:
            raise ConfigError(f"{key}.top_db must be positive, got {self.top_db}")

    @property
    def max_samples(self) -> int | None:
        return None if self.max_seconds is None else int(round(self.max_seconds * self.sample_rate))

    def key(self) -> str:
        """12 hex digits of SHA-256 over the settings and the cache format version."""
        blob = json.dumps({"format": CACHE_FORMAT, **to_dict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def log_mel(self) -> LogMel:
        return LogMel(self.sample_rate, self.n_fft, self.hop_length, self.n_mels, self.f_min, self.f_max, self.top_db)


@dataclass(frozen=True)
class ClipRecord:
    """The outcome for one clip, and the source file it came from (a changed file is prepared again)."""

    key: str  # "train/dia0_utt0", as Utterance.key
    file: str  # the clip, relative to the data root
    size: int  # bytes and mtime of the clip when it was decoded
    mtime_ns: int
    status: str  # OK, TRUNCATED, UNDECODABLE or SILENT_OR_EMPTY
    reason: str = ""  # why, for anything but OK
    samples: int = 0  # decoded samples kept (after the cap)
    frames: int = 0  # mel frames stored; 0 unless cached

    @property
    def cached(self) -> bool:
        return self.status in CACHED

    @property
    def source(self) -> tuple[str, int, int]:
        """What identifies the file decoded: a clip whose source changed is decoded again."""
        return self.file, self.size, self.mtime_ns


@dataclass
class CachedClip:
    """A record and where its mel lies: in a split store or a journal file (read on demand)."""

    record: ClipRecord
    store: SplitStore | None = None
    journal: Path | None = None
    journal_offset: int = 0
    n_mels: int = field(default=0, repr=False)

    def mel(self) -> np.ndarray:
        """float16 [T, n_mels]"""
        if self.store is not None:
            return self.store.frames(self.record.key)
        count = self.record.frames * self.n_mels
        data = np.fromfile(self.journal, dtype=np.float16, count=count, offset=self.journal_offset)
        return data.reshape(self.record.frames, self.n_mels)


def default_cache_root(data_root: str | Path) -> Path:
    """``$MELD_CLARA_CACHE`` (or ~/.cache/meld-clara) /features/<folder name>-<hash of its full path>.

    One folder per dataset, so the demo and a real MELD copy never share (and overwrite) a cache.
    """
    base = user_cache_dir()
    resolved = Path(data_root).resolve()
    # The path's own bytes: str.encode() fails on a folder name that is not UTF-8 (Python holds its bytes as
    # surrogates), and os.fsencode gives the same bytes for any other name, so existing caches keep their folder.
    return base / "features" / f"{resolved.name}-{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:8]}"


def audio_cache_dir(cache_root: str | Path, settings: AudioSettings) -> Path:
    return Path(cache_root) / f"audio-{settings.key()}"


def store_path(cache_dir: Path, split: str) -> Path:
    return cache_dir / f"{split}.safetensors"


def write_settings(cache_dir: Path, settings: AudioSettings) -> None:
    text = json.dumps({"format": CACHE_FORMAT, "key": settings.key(), "settings": to_dict(settings)}, indent=2)
    atomic_write_text(cache_dir / "settings.json", text + "\n")


def changed_clips(store: SplitStore, data_root: str | Path) -> list[ClipRecord]:
    """The records of ``store`` whose clip under ``data_root`` is not the file its features were decoded
    from (another size or modification time): a clip replaced since prepare ran, or another MELD copy's
    features in a shared ``--cache`` (clips are keyed by split and utterance, the same in every copy).
    A clip that is not there is not checked: features may be read without the clips."""
    root = Path(data_root)
    changed = []
    for record in store.records:
        try:
            stat = (root / record.file).stat()
        except OSError:
            continue
        if (stat.st_size, stat.st_mtime_ns) != (record.size, record.mtime_ns):
            changed.append(record)
    return changed


def check_model_mels(settings: AudioSettings, model_mels: int, key: str = "audio") -> None:
    """Refuse features a CLARA model cannot read before any is encoded: its audio tower's first
    convolution takes ``model_mels`` bins, and another count fails inside the model with a traceback.
    ``key``: where ``settings`` sit in the user's config (see ``audio_key``)."""
    if settings.n_mels != model_mels:
        raise ConfigError(f"{key}.n_mels is {settings.n_mels}, but the CLARA model reads {model_mels}-bin log-mels: "
                          f"prepare (and read) the features with {key}.n_mels={model_mels}")


class UnreadableStore(MeldDataError):
    """A split store that cannot be read: damaged on disk, or not one this version writes."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: not a readable feature store ({reason}); run meld.prepare again with the "
                         "same --data and --cache: it rebuilds the store")


def _mel_crc32(mel_slice, rows: int) -> int:
    """CRC32 of a store's mel bytes, read in chunks: a whole MELD train store is about half a gigabyte."""
    crc = 0
    for start in range(0, rows, _CRC_ROWS):
        crc = zlib.crc32(mel_slice[start : min(start + _CRC_ROWS, rows)], crc)  # safetensors slices do not clamp
    return crc


def _meta_digest(handle) -> str:
    """SHA-256 of a store's metadata, which fixes every clip's offset: tells whether a file is the one opened."""
    return hashlib.sha256(json.dumps(handle.metadata(), sort_keys=True).encode()).hexdigest()


class SplitStore:
    """Read access to one split's consolidated store; picklable, so DataLoader workers can share it.

    The file is opened (memory-mapped) on first use in each process, never pickled itself; a file that
    prepare replaced in between is refused (MeldDataError), not read with the old offsets. Raises
    UnreadableStore for a file that is not a complete store, or whose mel does not match its CRC32 (read
    in full once here: safetensors has no checksum, and a changed byte would be read as other numbers).
    ``checked`` is False for a store written without a CRC32 (read as it is; prepare adds one).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="np") as handle:
                # The settings and every clip's record (its source file's size and mtime, its frames): a
                # clip prepared again changes it.  Also what embedding caches key the audio on.
                self.digest = _meta_digest(handle)
                meta = json.loads((handle.metadata() or {})[_META_KEY])
                mel = handle.get_slice("mel")
                rows, self.n_mels = mel.get_shape()
                self.checked = "mel_crc32" in meta
                if self.checked and _mel_crc32(mel, rows) != meta["mel_crc32"]:
                    raise UnreadableStore(self.path, "its mel frames do not match the CRC32 written with them")
            if meta.get("format") != CACHE_FORMAT:
                raise UnreadableStore(self.path, f"cache format {meta.get('format')}, expected {CACHE_FORMAT}")
            self.settings = meta["settings"]
            if self.n_mels != self.settings["n_mels"]:
                raise UnreadableStore(self.path, f"its mel has {self.n_mels} bins, its settings say "
                                                 f"{self.settings['n_mels']}")
            self.records = [ClipRecord(**record) for record in meta["records"]]
            self._offsets: dict[str, tuple[int, int]] = {}
            offset = 0
            for record in self.records:
                if record.cached:
                    self._offsets[record.key] = (offset, record.frames)
                    offset += record.frames
        except (OSError, KeyError, ValueError, TypeError, AttributeError, SafetensorError) as err:
            # TypeError, AttributeError: metadata that is JSON but not the records written (damaged or foreign)
            raise UnreadableStore(self.path, f"{type(err).__name__}: {err}") from None
        if offset != rows:
            raise UnreadableStore(self.path, f"its records cover {offset} mel frames, its tensor has {rows}")
        self._mel = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mel": None}

    def __contains__(self, key: str) -> bool:
        return key in self._offsets

    def frames(self, key: str) -> np.ndarray:
        """float16 [T, n_mels] of a cached clip (a KeyError for any other key)."""
        offset, frames = self._offsets[key]
        if self._mel is None:
            # Opened again by path, here and in every DataLoader worker: a prepare run since __init__ may
            # have replaced the file, and the offsets read then would cut other clips' frames out of it.
            try:
                handle = safe_open(str(self.path), framework="np")
                same = _meta_digest(handle) == self.digest
            except (OSError, SafetensorError) as err:
                raise UnreadableStore(self.path, f"{type(err).__name__}: {err}") from None
            if not same:
                raise MeldDataError(f"{self.path}: the feature store was rewritten (meld.prepare ran again) after "
                                    "it was opened; load the datasets again to read the new one")
            self._mel = handle.get_slice("mel")
        return self._mel[offset : offset + frames]

    def log_mel(self, key: str) -> np.ndarray:
        """float32 [n_mels, T], as LogMel returned it (up to float16 rounding)."""
        return np.ascontiguousarray(self.frames(key).T, dtype=np.float32)


def open_stores(cache_dir: Path, splits: Sequence[str], log: Callable[[str], None] = print) -> dict[str, SplitStore]:
    """The writer's view of ``cache_dir``'s split stores: split -> store, for each readable one.

    A store that cannot be read is left out, with one line to ``log``, so its clips count as not cached:
    the caller (prepare) decodes them again and writes the store anew, atomically over the damaged file.
    Other splits' stores and the journals are untouched. Readers open ``SplitStore`` and get its error,
    whose advice (run prepare again) is this repair.
    """
    stores = {}
    for split in splits:
        path = store_path(cache_dir, split)
        if not path.is_file():
            continue
        try:
            stores[split] = SplitStore(path)
        except UnreadableStore as err:
            log(f"{path}: not a readable feature store ({err.reason}); decoding the {split} split's clips "
                "again to rebuild it")
    return stores


def write_store(path: Path, settings: AudioSettings, clips: Sequence[CachedClip]) -> None:
    """Write ``clips`` (in the order given) as a split store, atomically."""
    total = sum(clip.record.frames for clip in clips if clip.record.cached)
    mel = np.zeros((total, settings.n_mels), dtype=np.float16)  # [sum T, n_mels]
    offset = 0
    for clip in clips:
        if clip.record.cached:
            mel[offset : offset + clip.record.frames] = clip.mel()
            offset += clip.record.frames
    meta = {"format": CACHE_FORMAT, "settings": to_dict(settings), "records": [asdict(c.record) for c in clips],
            "mel_crc32": zlib.crc32(mel)}
    with atomic_path(path) as tmp:
        save_file({"mel": mel}, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


class Journal:
    """Append-only log of finished clips for one run: ``journal/run-NNNN.log``, created on first append."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._file = None

    def append(self, record: ClipRecord, mel: np.ndarray | None) -> CachedClip:
        """Write one clip (``mel``: float16 [frames, n_mels] for cached clips, else None); return where it is."""
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # By full name: a copy that a sync tool or file manager made ("run-0001 (1).log") is read like any
            # journal, but its name holds no run number.
            names = (_JOURNAL_NAME.fullmatch(p.name) for p in self.directory.glob("run-*.log"))
            runs = [int(match[1]) for match in names if match]
            self.path = self.directory / f"run-{max(runs, default=0) + 1:04d}.log"
            self._file = open(self.path, "xb")
        meta = json.dumps(asdict(record)).encode()
        data = b"" if mel is None else np.ascontiguousarray(mel, dtype=np.float16).tobytes()
        crc = zlib.crc32(data, zlib.crc32(meta))
        data_offset = self._file.tell() + _JOURNAL_HEADER.size + len(meta)
        self._file.write(_JOURNAL_HEADER.pack(_JOURNAL_MAGIC, crc, len(meta), len(data)) + meta + data)
        # Flushed to the OS at once: a killed process loses nothing it appended. (No fsync per clip:
        # that guards against power loss only, at a cost per clip.)
        self._file.flush()
        n_mels = 0 if mel is None else mel.shape[1]
        return CachedClip(record, journal=self.path, journal_offset=data_offset, n_mels=n_mels)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("run-*.log"))


def read_journal(path: Path, n_mels: int) -> Iterator[CachedClip]:
    """The intact records of one journal file, in order; stops at the first torn or corrupt one."""
    with open(path, "rb") as f:
        position = 0
        while True:
            header = f.read(_JOURNAL_HEADER.size)
            if len(header) < _JOURNAL_HEADER.size:
                return
            magic, crc, meta_len, data_len = _JOURNAL_HEADER.unpack(header)
            meta, data = f.read(meta_len), f.read(data_len)
            if magic != _JOURNAL_MAGIC or len(meta) < meta_len or len(data) < data_len:
                return
            if zlib.crc32(data, zlib.crc32(meta)) != crc:
                return
            record = ClipRecord(**json.loads(meta))
            data_offset = position + _JOURNAL_HEADER.size + meta_len
            yield CachedClip(record, journal=path, journal_offset=data_offset, n_mels=n_mels)
            position = data_offset + data_len
