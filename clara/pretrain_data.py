"""Audio-caption pairs for pretraining: manifests, tar shards, environmental-sound mixing, collation.

Sources:

* a manifest, JSONL (one object per line) or CSV (with a header), with the fields ``audio`` (a
  path, relative to the manifest's folder or absolute), ``caption`` and optionally ``language``
  (a code such as ``en`` or a Whisper language name such as ``English``, read as its code);
* webdataset-style tar shards: members named ``<key>.<ext>``, one audio member (flac, wav, mp3,
  ogg, opus, m4a) and one ``json`` member per key, the JSON holding ``text`` (a string, or a list
  whose first string is used) and optionally ``language`` or ``original_data.language``, as the
  reference's shards do.  Shards are indexed once with the standard library's ``tarfile``; items
  are then read by offset, so the dataset is map-style and shuffles like a manifest, and shards
  must be uncompressed (a .tar.gz is refused).

Items are dicts ``{"wave": [N] float 48 kHz mono, "caption": str, "language": str}``.
:class:`PretrainCollate` pads waveforms and tokenises captions; the log-mel is computed on the
device by the task, after the waveform augmentations.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from clara.audio_frontend import HOP_LENGTH, num_frames
from clara.audio_io import AudioDecodeError, load_audio
from clara.augment import CaptionRewriter, MixConfig, fit_env, merge_captions, mix, rms
from clara.config import ConfigError
from clara.masking import round_up
from clara.tokenizer import is_language, language_code, unknown_language

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a")


class DataError(ValueError):
    """A manifest or shard that cannot be read, named with the file (and line) at fault."""


@dataclass(frozen=True)
class DataConfig:
    """``clara.pretrain``'s ``data`` section."""

    train: str = ""  # "demo", a .jsonl/.csv manifest, or tar shards (file, folder, glob; comma-separated)
    eval: str = ""  # held-out pairs for retrieval metrics, same forms; "" = none
    env: str = ""  # environmental sounds (a manifest or shards) for augment.mix; "" = no mixing
    max_seconds: float = 10.0  # clips are cut to their first max_seconds
    language: str = "en"  # for items without a language: a code (en) or Whisper's name for it (english)
    # Keep decoded clips in memory (small sets).  Loader workers start afresh each epoch, so with
    # train.num_workers > 0 a worker's cache lasts one epoch; the gain is with num_workers 0 (the demos).
    cache_audio: bool = False
    eval_batch_size: int = 64
    demo_dir: str = ""  # where train=demo builds its files; "" = <cache>/demo-pairs
    # Pad each batch's audio so its mel frames are a multiple of this, and its token ids likewise (1:
    # to the batch's longest). A few shapes instead of one per batch, for torch.compile's graphs and
    # CUDA graphs; the padding is masked (unless the model sets mask_padding=false).
    frames_multiple: int = 1
    tokens_multiple: int = 1

    def __post_init__(self) -> None:
        # Each of these would otherwise fail deep in torch, after the model is built and the data read.
        problems = []
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            problems.append(f"max_seconds must be a positive number of seconds, got {self.max_seconds}")
        for name in ("eval_batch_size", "frames_multiple", "tokens_multiple"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not is_language(self.language):
            problems.append(f"language: {unknown_language(self.language)}")
        if problems:
            raise ConfigError("data: " + "; ".join(problems))


@dataclass(frozen=True)
class Record:
    audio: str  # a file path, or "<shard>#<member>" for tar members
    caption: str
    language: str | None = None
    origin: str = ""  # "<manifest>:<line>" that listed it, for errors found when it is decoded


def _record(fields: dict[str, Any], base: Path, where: str) -> Record:
    audio, caption = fields.get("audio"), fields.get("caption")
    if not isinstance(audio, str) or not audio.strip():
        raise DataError(f"{where}: expected a non-empty 'audio' path")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: expected a non-empty 'caption'")
    language = _language(fields.get("language"), f"{where}: 'language'")
    return Record(audio=str((base / audio).resolve()), caption=caption.strip(), language=language, origin=where)


def _language(value: Any, where: str) -> str | None:
    """A row's language as the code in clara.tokenizer.LANGUAGES (None when absent or empty), so that
    "English", "english" and "en" are one language everywhere after reading (held-out texts are
    grouped by it); ``where`` names the row and field in the error for one the tokenizer lacks."""
    if value is None or value == "":
        return None
    code = language_code(value)
    if code is None:
        raise DataError(f"{where}: {unknown_language(value)}")
    return code


def read_manifest(path: str | Path) -> list[Record]:
    """Records of a ``.jsonl`` or ``.csv`` manifest; every file it lists must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        records = _read_rows(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not records:
        raise DataError(f"{path}: the manifest lists no samples")
    # Checked before training, which would otherwise stop at the first missing file's batch, a
    # few steps in, with nothing saved.  After the rows, so a malformed row is reported first.
    missing = [record for record in records if not os.path.isfile(record.audio)]
    if missing:
        more = f" ({len(missing)} of the {len(records)} listed files are missing)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0].origin}: {missing[0].audio}: file not found{more}")
    return records


def _read_rows(path: Path) -> list[Record]:
    records = []
    if path.suffix.lower() == ".jsonl":
        # utf-8-sig: a byte-order mark (as editors on Windows write) is not part of the first row.
        # Rows end at "\n" only (JSON Lines): str.splitlines also splits at U+2028, U+0085 and the
        # like, which JSON writers (ensure_ascii=False) leave unescaped inside captions.
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(fields, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            records.append(_record(fields, path.parent, f"{path}:{number}"))
    elif path.suffix.lower() == ".csv":
        for row, line in _csv_rows(path):
            records.append(_record(row, path.parent, f"{path}:{line}"))
    else:
        raise DataError(f"{path}: expected a .jsonl or .csv manifest")
    return records


def _csv_rows(path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """The rows of a CSV manifest, each with the file line it ends on, once its header has the columns."""
    with open(path, newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8" starts with a BOM
        # strict: a quote left open (a caption such as `"It's raining`) is an error, not a field that
        # silently swallows every row after it (or, past 128 KiB, a traceback from the csv module).
        reader = csv.DictReader(handle, strict=True)
        start = 1  # the line the row being read (first the header) starts on
        try:
            missing = {"audio", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: the header needs the column(s) {', '.join(sorted(missing))}")
            start = reader.line_num + 1
            for row in reader:
                # line_num: the file line the row ends on; counting rows drifts past blank lines,
                # which the reader skips.
                yield row, reader.line_num
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}:{start}: not valid CSV from this line on ({err}); check the quotes there") from None


def _caption_of(meta: dict[str, Any]) -> tuple[str | None, str, Any]:
    """(caption or None, the field the language came from, its value) of a shard member's JSON."""
    text = meta.get("text")
    if isinstance(text, list):
        text = next((t for t in text if isinstance(t, str) and t.strip()), None)
    original = meta.get("original_data")
    field, language = "language", meta.get("language")
    if not language and isinstance(original, dict):
        field, language = "original_data.language", original.get("language")
    return (text.strip() if isinstance(text, str) and text.strip() else None), field, language


def index_shards(paths: Sequence[Path]) -> list[tuple[Record, tuple[Path, int, int]]]:
    """(record, (shard, data offset, size) of its audio member) for every complete sample."""
    samples = []
    for shard in paths:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            # "r:" (no compression): samples are later read by their byte offset in the shard file,
            # which only an uncompressed tar has.
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        folder, name = os.path.split(member.name)
                        key, _, extension = name.partition(".")
                        groups.setdefault(os.path.join(folder, key), {})[extension.lower()] = member
                for key, members in groups.items():
                    audio = next((members[e] for e in AUDIO_EXTENSIONS if e in members), None)
                    if audio is None or "json" not in members:
                        continue
                    try:
                        meta = json.loads(tar.extractfile(members["json"]).read())
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise DataError(f"{shard}: {members['json'].name}: not valid JSON ({err})") from None
                    caption, field, language = _caption_of(meta if isinstance(meta, dict) else {})
                    if caption is None:
                        raise DataError(f"{shard}: {members['json'].name}: expected a non-empty 'text'")
                    language = _language(language, f"{shard}: {members['json'].name}: '{field}'")
                    record = Record(audio=f"{shard}#{audio.name}", caption=caption, language=language)
                    samples.append((record, (shard, audio.offset_data, audio.size)))
        except tarfile.TarError as err:
            compression = _compression(shard)
            if compression:
                raise DataError(f"{shard}: a {compression}-compressed tar; shards must be uncompressed .tar files, as "
                                f"samples are read by their offset in the file (decompress it first)") from None
            # A manifest with another suffix (train.json, m.JSONL) lands here: say what each source must be.
            hint = "" if shard.suffix.lower() == ".tar" else "; manifests must end in .jsonl or .csv, shards in .tar"
            raise DataError(f"{shard}: not a readable tar file ({err}){hint}") from None
    return samples


_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression(path: Path) -> str | None:
    """The compression whose magic number starts ``path`` (gzip, bzip2, xz, zstd), else None."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    return next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def expand_source(spec: str) -> list[Path]:
    """``a.tar,b.tar``, a glob such as ``shards/*.tar``, or a folder of ``.tar`` files -> shard paths."""
    paths: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        expanded = os.path.expanduser(part)
        if os.path.isdir(expanded):
            paths += sorted(Path(expanded).glob("*.tar"))
        elif glob.has_magic(expanded):
            paths += sorted(Path(p) for p in glob.glob(expanded))
        else:
            paths.append(Path(expanded))
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: shard not found")
    if not paths:
        raise DataError(f"{spec}: matches no .tar shards")
    return paths


class PairDataset(Dataset):
    """Audio-caption pairs from a manifest or tar shards; decodes (and optionally caches) audio."""

    def __init__(self, source: str, *, max_seconds: float | None = 10.0, language: str = "en", cache_audio: bool = False):
        self.source = source
        self.max_seconds = max_seconds
        self.language = language_code(language)  # the default, as the code the records hold
        if self.language is None:
            raise ValueError(unknown_language(language))
        self.cache_audio = cache_audio
        self._cache: dict[int, torch.Tensor] = {}
        if source.lower().endswith((".jsonl", ".csv")):
            self.records = read_manifest(source)
            self._members: list[tuple[Path, int, int]] | None = None
        else:
            indexed = index_shards(expand_source(source))
            if not indexed:
                raise DataError(f"{source}: the shards hold no complete samples: each needs a json member and an audio "
                                f"member ({', '.join(AUDIO_EXTENSIONS)}) of the same key, such as k1.json and k1.flac")
            self.records = [record for record, _ in indexed]
            self._members = [member for _, member in indexed]

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, index: int) -> torch.Tensor:
        """Item ``index``'s waveform [N], N > 0; errors name the manifest line or the shard member."""
        record = self.records[index]
        if self._members is None:
            try:
                wave = load_audio(record.audio, max_seconds=self.max_seconds)
            except AudioDecodeError as err:
                raise AudioDecodeError(f"{record.origin}: {err}") from None
            where = f"{record.origin}: {record.audio}"
        else:
            shard, offset, size = self._members[index]
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
            # PyAV decodes from a path here; the member goes through a temporary file, whose name
            # load_audio's errors would give: they name the member instead.
            suffix = "." + record.audio.rsplit(".", 1)[-1]
            with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
                tmp.write(data)
                tmp.flush()
                try:
                    wave = load_audio(tmp.name, max_seconds=self.max_seconds)
                except AudioDecodeError as err:
                    raise AudioDecodeError(str(err).replace(tmp.name, record.audio)) from None
            where = record.audio
        if wave.numel() == 0:
            # FFmpeg reads some damaged files as streams without samples; an empty clip would fail
            # in the log-mel or the augmentations mid-training, with a traceback.
            raise AudioDecodeError(f"{where}: no audio samples decoded")
        return wave

    def wave(self, index: int) -> torch.Tensor:
        if index in self._cache:
            return self._cache[index]
        wave = self._decode(index)
        if self.cache_audio:
            self._cache[index] = wave
        return wave

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        return {"wave": self.wave(index), "caption": record.caption, "language": record.language or self.language}


class EnvMixDataset(Dataset):
    """Mixes environmental sounds into a pair dataset, the seed's â = λ·speech + (1 − λ)·env.

    Whether item ``i`` is mixed in epoch ``e``, with which env clip, from which offset and with which
    λ are drawn from a generator seeded by (seed, e, i): the same in every worker, process and
    resumed run.  The caption becomes ``template.format(speech=..., env=...)``, rewritten by the
    local language model when ``lm_path`` is set.
    """

    def __init__(self, base: Dataset, env: PairDataset, config: MixConfig, seed: int):
        self.base = base
        self.env = env
        self.config = config
        self.seed = seed
        self.epoch = 0
        self.rewriter = CaptionRewriter(config) if config.lm_path else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.config.p <= 0 or len(self.env) == 0 or rng.random() >= self.config.p:
            return item
        env_item = self.env[int(rng.integers(len(self.env)))]
        lam = float(rng.uniform(*self.config.lam))
        speech = item["wave"]
        noise = fit_env(env_item["wave"], speech.shape[-1], offset=int(rng.integers(max(1, env_item["wave"].numel()))))
        if self.config.match_loudness:
            noise = noise * (rms(speech) / rms(noise).clamp_min(1e-8))
        caption = merge_captions(self.config.template, item["caption"], env_item["caption"])
        if self.rewriter is not None:
            caption = self.rewriter(caption)
        return {**item, "wave": mix(speech, noise, lam), "caption": caption, "lam": lam}


def padded_samples(longest: int, frames_multiple: int) -> int:
    """Samples to pad a batch whose longest clip has ``longest`` to: that clip itself with a multiple
    of 1, else the most samples that give the next multiple of ``frames_multiple`` mel frames
    (``1 + N // hop``) at or above the longest clip's."""
    if frames_multiple == 1:
        return longest
    frames = round_up(num_frames(longest), frames_multiple)
    return frames * HOP_LENGTH - 1  # the most samples that still give `frames` frames


def pad_tokens(tokens: torch.Tensor, multiple: int, tokenizer) -> torch.Tensor:
    """Token ids [B, L] right-padded with the tokenizer's pad id to the next multiple of ``multiple``,
    at most its ``max_length`` (the text encoder's positions)."""
    width = min(round_up(tokens.shape[1], multiple), tokenizer.max_length)
    if width <= tokens.shape[1]:
        return tokens
    return torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=tokenizer.pad_id)


class PretrainCollate:
    """Items -> ``{"wave" [B, N] zero-padded, "wave_lengths" [B], "tokens" [B, L] (pad 0),
    "token_lengths" [B], "captions": list[str]}``.

    ``N`` is the longest clip, or with ``frames_multiple`` the samples whose frame count is the next
    multiple (``padded_samples``); ``L`` the longest caption, or the next multiple of
    ``tokens_multiple`` but at most the tokenizer's ``max_length`` (the text encoder's positions).
    """

    def __init__(self, tokenizer, *, frames_multiple: int = 1, tokens_multiple: int = 1):
        self.tokenizer = tokenizer
        self.frames_multiple = frames_multiple
        self.tokens_multiple = tokens_multiple

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = torch.tensor([item["wave"].shape[-1] for item in items], dtype=torch.long)
        waves = torch.zeros(len(items), padded_samples(int(lengths.max()), self.frames_multiple))
        for row, item in enumerate(items):
            waves[row, : item["wave"].shape[-1]] = item["wave"]
        captions = [item["caption"] for item in items]
        tokens, token_lengths = self.tokenizer.encode_batch(captions, [item["language"] for item in items])
        tokens = pad_tokens(tokens, self.tokens_multiple, self.tokenizer)
        return {
            "wave": waves,
            "wave_lengths": lengths,
            "tokens": tokens,
            "token_lengths": token_lengths,
            "captions": captions,
        }
