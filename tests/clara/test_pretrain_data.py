"""Pretraining data read early: the data config, and manifests checked row by row before training."""

from __future__ import annotations

import io
import json
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest

from clara import config as config_lib
from clara.audio_io import AudioDecodeError
from clara.config import ConfigError
from clara.pretrain_data import DataConfig, DataError, PairDataset, read_manifest


def write_wav(path: Path, seconds: float = 0.2) -> Path:
    samples = (np.sin(np.arange(int(48_000 * seconds)) * 0.05) * 8000).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(48_000)
        handle.writeframes(samples.tobytes())
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("override, expected", [
    ("max_seconds=0", "max_seconds must be a positive number of seconds, got 0.0"),
    ("max_seconds=-1", "max_seconds must be a positive number of seconds, got -1.0"),
    ("eval_batch_size=0", "eval_batch_size must be at least 1, got 0"),
    ("language=xx", "language: unknown language code 'xx'; valid codes: en, zh, zh-CN"),
])  # fmt: skip
def test_data_config_refuses_what_would_fail_deep_in_torch(override, expected):
    with pytest.raises(ConfigError) as err:
        config_lib.load(DataConfig, None, [override])
    assert str(err.value).startswith(f"overrides: data: {expected}")
    assert config_lib.load(DataConfig, None, ["language=HE", "max_seconds=0.5"]).language == "HE"


def test_a_missing_file_is_named_with_its_manifest_line_at_read_time(tmp_path):
    write_wav(tmp_path / "a.wav")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "caption": "a tone"},
        {"audio": "/nonexistent.wav", "caption": "nothing"},
        {"audio": "gone.wav", "caption": "nothing either"},
    ])  # fmt: skip
    with pytest.raises(DataError) as err:
        read_manifest(manifest)
    assert str(err.value) == f"{manifest}:2: /nonexistent.wav: file not found (2 of the 3 listed files are missing)"
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("audio,caption\na.wav,a tone\nmissing.wav,nothing\n")
    with pytest.raises(DataError) as err:
        PairDataset(str(csv_manifest))
    assert str(err.value) == f"{csv_manifest}:3: {tmp_path / 'missing.wav'}: file not found"


def test_a_malformed_row_is_reported_before_missing_files(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "absent.wav", "caption": "x"}\n{"audio": "b.wav"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: expected a non-empty 'caption'"):
        read_manifest(manifest)


def test_an_unknown_language_is_named_with_its_row_or_member(tmp_path):
    write_wav(tmp_path / "a.wav")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "caption": "a tone", "language": "de"},
        {"audio": "a.wav", "caption": "a tone", "language": "xx"},
    ])  # fmt: skip
    with pytest.raises(DataError, match=rf"^{manifest}:2: unknown language code 'xx'; valid codes: en, "):
        read_manifest(manifest)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "a.wav", arcname="k1.wav")
        meta = json.dumps({"text": "a tone", "original_data": {"language": "klingon"}}).encode()
        info = tarfile.TarInfo("k1.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    with pytest.raises(DataError, match=rf"^{shard}: k1.json: unknown language code 'klingon'"):
        PairDataset(str(shard))


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_a_manifest_that_is_not_utf8_is_named(tmp_path, name):
    manifest = tmp_path / name
    manifest.write_bytes(b"audio,caption\n\xff\xfe\x00bad\n")
    with pytest.raises(DataError) as err:
        read_manifest(manifest)
    assert str(err.value) == f"{manifest}: not UTF-8 text"


def test_an_undecodable_file_is_named_with_its_manifest_line(tmp_path):
    write_wav(tmp_path / "a.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "caption": "a tone"},
        {"audio": "junk.wav", "caption": "junk"},
    ])  # fmt: skip
    data = PairDataset(str(manifest))  # present, so only decoding finds out
    assert data[0]["wave"].numel() == 9600
    with pytest.raises(AudioDecodeError, match=rf"^{manifest}:2: {tmp_path / 'junk.wav'}: cannot decode audio"):
        data[1]
