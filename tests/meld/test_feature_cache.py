"""The feature cache format: settings key, journal (with torn tails), split stores."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from clara.audio_frontend import LogMel, empty_mel_bands
from clara.config import ConfigError
from meld import feature_cache
from meld.errors import MeldDataError
from meld.feature_cache import (
    OK, SILENT_OR_EMPTY, TRUNCATED, UNDECODABLE, AudioSettings, ClipRecord, Journal, SplitStore, audio_cache_dir,
    audio_key, check_model_mels, default_cache_root, journal_files, open_stores, read_journal, store_path, write_store,
)


def record(key: str, status: str = OK, frames: int = 0) -> ClipRecord:
    return ClipRecord(key=key, file=f"clips/{key.split('/')[1]}.mp4", size=100, mtime_ns=7, status=status,
                      reason="" if status == OK else "why", samples=frames * 512, frames=frames)


def mel(frames: int, fill: float) -> np.ndarray:
    """float16 [frames, 80], values that differ per frame and mel."""
    values = fill + np.arange(frames * 80).reshape(frames, 80) / (frames * 80)
    return values.astype(np.float16)


def test_key_depends_on_every_setting_and_the_format(monkeypatch):
    base = AudioSettings()
    assert base.key() == AudioSettings().key() and len(base.key()) == 12
    changes = {"sample_rate": 16000, "n_fft": 2048, "hop_length": 256, "n_mels": 64, "f_min": 20.0,
               "f_max": 7600.0, "top_db": 60.0, "max_seconds": 20.0, "min_seconds": 0.3, "silence_dbfs": -70.0}
    assert set(changes) == {f.name for f in dataclasses.fields(AudioSettings)}
    keys = {dataclasses.replace(base, **{name: value}).key() for name, value in changes.items()}
    keys.add(dataclasses.replace(base, max_seconds=None).key())
    assert len(keys) == len(changes) + 1 and base.key() not in keys
    before = base.key()
    monkeypatch.setattr(feature_cache, "CACHE_FORMAT", feature_cache.CACHE_FORMAT + 1)
    assert AudioSettings().key() != before


def test_whole_numbers_for_float_settings_give_the_same_key():
    # What a Python caller writes (max_seconds=30) must find the cache `prepare --max-seconds 30` made.
    whole = AudioSettings(f_min=0, f_max=8000, top_db=80, max_seconds=30, min_seconds=0, silence_dbfs=-80)
    assert whole == AudioSettings(min_seconds=0.0) and whole.key() == AudioSettings(min_seconds=0.0).key()
    assert json.dumps(dataclasses.asdict(whole)) == json.dumps(dataclasses.asdict(AudioSettings(min_seconds=0.0)))


def test_cache_dirs(tmp_path, monkeypatch):
    settings = AudioSettings()
    assert audio_cache_dir(tmp_path, settings) == tmp_path / f"audio-{settings.key()}"
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "home"))
    first, second = default_cache_root(tmp_path / "a" / "MELD.Raw"), default_cache_root(tmp_path / "b" / "MELD.Raw")
    assert first.parent == tmp_path / "home" / "features" and first.name.startswith("MELD.Raw-")
    assert first != second  # two copies of MELD never share a cache


def test_a_data_root_named_in_another_encoding_has_a_cache_folder(tmp_path, monkeypatch):
    # A folder unpacked from an old archive can have a name that is not UTF-8 (Python reads it with
    # surrogates); hashing str(path).encode() raised UnicodeEncodeError, a traceback from prepare.
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "home"))
    latin1 = tmp_path / os.fsdecode(b"caf\xe9") / "MELD.Raw"
    utf8 = tmp_path / "café" / "MELD.Raw"
    assert default_cache_root(latin1).parent == tmp_path / "home" / "features"
    assert default_cache_root(latin1) != default_cache_root(utf8)
    # A UTF-8 name hashes the same bytes as before, so the caches already prepared are still found.
    digest = hashlib.sha256(str(utf8.resolve()).encode()).hexdigest()[:8]
    assert default_cache_root(utf8).name == f"MELD.Raw-{digest}"


@pytest.mark.parametrize("bad", [{"max_seconds": 0.0}, {"max_seconds": float("nan")}, {"max_seconds": float("inf")},
                                 {"min_seconds": -1.0}, {"min_seconds": float("nan")}, {"n_mels": 0},
                                 {"f_min": 9000.0}, {"f_min": -1.0}, {"f_max": 24_001.0},
                                 {"sample_rate": 8000}, {"top_db": 0.0}, {"top_db": -5.0}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        AudioSettings(**bad)


@pytest.mark.filterwarnings("ignore:At least one mel filterbank has all zero values")
def test_mel_band_and_floor_limits_are_the_ones_that_keep_features_informative():
    """The refused settings give every clip one constant spectrogram; the edges of the allowed ones do not."""
    wave = torch.sin(torch.arange(48_000) * 0.05) * torch.linspace(0.01, 1.0, 48_000)
    for bad in ({"f_min": 9000.0}, {"top_db": -5.0}):
        spectrogram, _ = LogMel(**bad)(wave)
        assert float(spectrogram.std()) == 0.0, bad  # what the check keeps out of the cache
    for edge in ({"f_max": 24_000.0}, {"f_min": 4000.0}, {"top_db": 1.0}, {"sample_rate": 16_000}):
        settings = AudioSettings(**edge)
        assert float(settings.log_mel()(wave)[0].std()) > 0.0, edge


def test_more_mels_than_the_fft_bins_can_fill_is_a_config_error():
    # Slaney mels are linear below 1 kHz (200/3 Hz per mel); 0-8 kHz spans 15 + 27·ln 8 / ln 6.4 = 45.25
    # mels.  128 bands put their edge points 45.25 / 129 mel = 23.4 Hz apart, so band 0 runs from 0 to
    # 46.8 Hz: the bins at 0 and 46.875 Hz (48 kHz / 1024) fall on or past its edges and it is empty.
    # Band 1 (23.4-70.2 Hz) holds the 46.875 Hz bin.
    assert empty_mel_bands(48_000, 1024, 128, 0.0, 8000.0) == [0]
    assert empty_mel_bands(48_000, 1024, 80, 0.0, 8000.0) == [] == empty_mel_bands(48_000, 2048, 128, 0.0, 8000.0)
    with pytest.raises(ConfigError, match=r"^audio.n_mels 128 is too many for 0-8000 Hz at audio.n_fft 1024: 1 mel "
                                          r"band\(s\) reach no FFT bin \(first: band 0\)"):
        AudioSettings(n_mels=128)
    assert AudioSettings(n_mels=128, n_fft=2048).n_mels == 128


def test_errors_name_the_audio_keys_where_the_command_reads_them():
    # meld.finetune's settings hold the audio section at data.audio; prepare's and zeroshot's at audio.
    with audio_key("data.audio"):
        with pytest.raises(ConfigError, match=r"^data\.audio\.n_mels 128 is too many for 0-8000 Hz at data\.audio\.n_fft "):
            AudioSettings(n_mels=128)
        with pytest.raises(ConfigError, match=r"^data\.audio\.f_min and data\.audio\.f_max must satisfy"):
            AudioSettings(f_min=9000.0)
    with pytest.raises(ConfigError, match=r"^audio\.hop_length must be at least 1, got 0"):  # the block's key is gone
        AudioSettings(hop_length=0)
    with pytest.raises(ConfigError, match=r"^data\.audio\.n_mels is 64, but the CLARA model reads 80-bin log-mels: "
                                          r"prepare \(and read\) the features with data\.audio\.n_mels=80$"):
        check_model_mels(AudioSettings(n_mels=64), 80, key="data.audio")
    with pytest.raises(ConfigError, match=r"^audio\.n_mels is 64, but .* with audio\.n_mels=80$"):
        check_model_mels(AudioSettings(n_mels=64), 80)


def test_journal_round_trip_and_torn_tail(tmp_path):
    journal = Journal(tmp_path / "journal")
    written = [
        journal.append(record("train/dia0_utt0", OK, 5), mel(5, 0.0)),
        journal.append(record("train/dia0_utt1", UNDECODABLE), None),
        journal.append(record("train/dia0_utt2", TRUNCATED, 3), mel(3, -0.5)),
    ]
    journal.close()
    path = journal_files(tmp_path / "journal")[0]
    assert path.name == "run-0001.log" and all(clip.journal == path for clip in written)
    read = list(read_journal(path, 80))
    assert [clip.record for clip in read] == [clip.record for clip in written]
    np.testing.assert_array_equal(read[0].mel(), mel(5, 0.0))
    np.testing.assert_array_equal(read[2].mel(), mel(3, -0.5))

    # kill -9 in the middle of an append leaves a torn record: it is dropped, the ones before are kept.
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) - 3 * 80 * 2, len(data) - 3 * 80 * 2 - 10):
        path.write_bytes(data[:cut])
        assert [clip.record.key for clip in read_journal(path, 80)] == ["train/dia0_utt0", "train/dia0_utt1"]
    # A flipped byte fails the CRC: nothing from there on is trusted.
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    assert len(list(read_journal(path, 80))) == 2

    # The next run writes a file of its own.
    Journal(tmp_path / "journal").append(record("dev/dia1_utt0", SILENT_OR_EMPTY), None)
    assert [p.name for p in journal_files(tmp_path / "journal")] == ["run-0001.log", "run-0002.log"]


def test_a_copied_journal_is_read_and_does_not_stop_the_next_run(tmp_path):
    # A sync tool's or file manager's copy has no run number in its name; numbering the next run from
    # every "run-*.log" raised ValueError on it, a traceback at prepare's first finished clip.
    first = Journal(tmp_path / "journal")
    first.append(record("train/dia0_utt0", OK, 2), mel(2, 0.0))
    first.close()
    copy = tmp_path / "journal" / "run-0001 (1).log"
    copy.write_bytes(first.path.read_bytes())
    Journal(tmp_path / "journal").append(record("dev/dia1_utt0", SILENT_OR_EMPTY), None)
    assert [p.name for p in journal_files(tmp_path / "journal")] == ["run-0001 (1).log", "run-0001.log", "run-0002.log"]
    assert [clip.record.key for clip in read_journal(copy, 80)] == ["train/dia0_utt0"]


def test_store_round_trip_is_deterministic_and_picklable(tmp_path):
    journal = Journal(tmp_path / "journal")
    clips = [
        journal.append(record("dev/dia0_utt0", OK, 4), mel(4, 0.25)),
        journal.append(record("dev/dia0_utt1", SILENT_OR_EMPTY), None),
        journal.append(record("dev/dia0_utt2", TRUNCATED, 6), mel(6, -0.75)),
    ]
    journal.close()
    write_store(tmp_path / "a.safetensors", AudioSettings(), clips)
    write_store(tmp_path / "b.safetensors", AudioSettings(), clips)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~umask  # not safetensors' private 0o600

    store = SplitStore(tmp_path / "a.safetensors")
    assert store.records == [clip.record for clip in clips]
    assert "dev/dia0_utt0" in store and "dev/dia0_utt1" not in store
    log_mel = store.log_mel("dev/dia0_utt2")
    assert log_mel.shape == (80, 6) and log_mel.dtype == np.float32
    np.testing.assert_array_equal(log_mel, mel(6, -0.75).T.astype(np.float32))
    copy = pickle.loads(pickle.dumps(store))  # as DataLoader workers get it, after the parent read from it
    np.testing.assert_array_equal(copy.frames("dev/dia0_utt0"), mel(4, 0.25))

    # Rewriting from the store itself (what a rerun that drops a row does) keeps the data.
    again = [feature_cache.CachedClip(r, store=store) for r in store.records]
    write_store(tmp_path / "c.safetensors", AudioSettings(), again)
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


def _store(path, clips) -> bytes:
    write_store(path, AudioSettings(), clips)
    return path.read_bytes()


def _handmade(path, records: list[dict], frames: int, settings: dict | None = None, n_mels: int = 80) -> bytes:
    """A safetensors file with store metadata of our choosing and a mel of ``frames`` rows."""
    meta = {"format": feature_cache.CACHE_FORMAT, "settings": settings or {}, "records": records}
    save_file({"mel": mel(frames, 0.0)[:, :n_mels].copy()}, str(path), metadata={"meld_clara": json.dumps(meta)})
    return path.read_bytes()


def _flipped(data: bytes, back: int) -> bytes:
    """``data`` with one bit changed ``back`` bytes from its end (in a store: the last mel rows)."""
    changed = bytearray(data)
    changed[-back] ^= 0x04
    return bytes(changed)


def _damaged_stores(tmp_path) -> dict[str, bytes]:
    """name -> the bytes of a file that is not a complete store: the ways a store gets damaged on disk."""
    journal = Journal(tmp_path / "journal")
    clips = [journal.append(record("dev/dia0_utt0", OK, 4), mel(4, 0.25)),
             journal.append(record("dev/dia0_utt1", OK, 2), mel(2, 0.5))]
    journal.close()
    good = _store(tmp_path / "good.safetensors", clips)
    return {
        "garbage": b"garbage\n", "empty": b"", "truncated": good[:-1], "cut in the header": good[:5],
        "foreign records": _handmade(tmp_path / "foreign.safetensors", [{"key": "dev/dia0_utt0"}], 4),
        "records not a list of objects": _handmade(tmp_path / "list.safetensors", [["dev/dia0_utt0"]], 4),
        # Records that cover more frames than the tensor holds: a reader would slice past its end.
        "frames do not add up": _handmade(tmp_path / "short.safetensors",
                                          [dataclasses.asdict(record("dev/dia0_utt0", OK, 4))], 3),
        # Still a valid safetensors file of the right size and shape, but other numbers: only a checksum tells.
        "a changed mel byte": _flipped(good, 3),
        # A mel of fewer bins than its settings say: the model would fail on it with a traceback.
        "mel bins not its settings'": _handmade(tmp_path / "bins.safetensors",
                                                [dataclasses.asdict(record("dev/dia0_utt0", OK, 4))], 4,
                                                settings=dataclasses.asdict(AudioSettings()), n_mels=64),
    }


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "cut in the header", "foreign records",
                                    "records not a list of objects", "frames do not add up", "a changed mel byte",
                                    "mel bins not its settings'"])
def test_unreadable_store_is_one_clear_error_that_says_prepare_rebuilds_it(tmp_path, damage):
    path = tmp_path / "train.safetensors"
    path.write_bytes(_damaged_stores(tmp_path)[damage])
    with pytest.raises(MeldDataError, match="not a readable feature store") as caught:
        SplitStore(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "rebuilds the store" in message


def test_open_stores_leaves_damaged_stores_out_so_prepare_rebuilds_them(tmp_path):
    damaged = _damaged_stores(tmp_path)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    journal = Journal(tmp_path / "j2")
    dev = [journal.append(record("dev/dia3_utt0", TRUNCATED, 3), mel(3, 1.0))]
    journal.close()
    _store(store_path(cache_dir, "dev"), dev)
    for damage, data in damaged.items():
        store_path(cache_dir, "train").write_bytes(data)
        lines: list[str] = []
        stores = open_stores(cache_dir, ("train", "dev", "test"), log=lines.append)
        assert set(stores) == {"dev"}, damage  # test has no store yet; train's is left out to be rebuilt
        assert stores["dev"].records == [clip.record for clip in dev]
        assert len(lines) == 1 and lines[0].startswith(f"{store_path(cache_dir, 'train')}: not a readable")
        assert "rebuild" in lines[0] and "train split" in lines[0]
    # Once rebuilt (prepare writes the store anew), it is read again.
    store_path(cache_dir, "train").write_bytes((tmp_path / "good.safetensors").read_bytes())
    lines = []
    assert set(open_stores(cache_dir, ("train", "dev", "test"), log=lines.append)) == {"train", "dev"} and lines == []


def test_a_store_rewritten_after_it_was_opened_is_refused_not_misread(tmp_path):
    # A reader opens the mel lazily, by path (also in each DataLoader worker). prepare run again meanwhile
    # replaces the file; with the offsets of the old records, dia0_utt1 would be read from dia0_utt0's new
    # frames, with no error.
    journal = Journal(tmp_path / "journal")
    before = [journal.append(record("dev/dia0_utt0", OK, 2), mel(2, 0.25)),
              journal.append(record("dev/dia0_utt1", OK, 3), mel(3, 0.5))]
    after = [journal.append(record("dev/dia0_utt0", OK, 5), mel(5, -0.5)), before[1]]
    journal.close()
    path = tmp_path / "dev.safetensors"
    write_store(path, AudioSettings(), before)
    store = SplitStore(path)
    worker_copy = pickle.loads(pickle.dumps(store))
    write_store(path, AudioSettings(), after)
    for reader in (store, worker_copy):
        with pytest.raises(MeldDataError, match="rewritten .* after it was opened; load the datasets again"):
            reader.frames("dev/dia0_utt1")
    # The same content written again is the same store: read as before.
    write_store(path, AudioSettings(), before)
    np.testing.assert_array_equal(SplitStore(path).frames("dev/dia0_utt1"), mel(3, 0.5))
    fresh = pickle.loads(pickle.dumps(SplitStore(path)))
    write_store(path, AudioSettings(), before)
    np.testing.assert_array_equal(fresh.frames("dev/dia0_utt1"), mel(3, 0.5))
    # Deleted in between: the store's own one-line error, not a traceback from safetensors.
    path.unlink()
    with pytest.raises(MeldDataError, match="not a readable feature store"):
        pickle.loads(pickle.dumps(fresh)).frames("dev/dia0_utt0")


def test_the_mel_checksum_is_read_in_chunks_and_finds_a_change_in_any(tmp_path, monkeypatch):
    # Chunks of 3 rows over 4 + 6 rows: a change in the last, partial chunk is found as well as in the first.
    monkeypatch.setattr(feature_cache, "_CRC_ROWS", 3)
    journal = Journal(tmp_path / "journal")
    clips = [journal.append(record("dev/dia0_utt0", OK, 4), mel(4, 0.25)),
             journal.append(record("dev/dia0_utt1", OK, 6), mel(6, -0.5))]
    journal.close()
    path = tmp_path / "dev.safetensors"
    good = _store(path, clips)
    np.testing.assert_array_equal(SplitStore(path).frames("dev/dia0_utt1"), mel(6, -0.5))
    first_row = len(good) - 10 * 80 * 2  # the mel is the file's last bytes
    for at in (len(good) - first_row, 1):  # the first row's first byte; the last row's last byte
        path.write_bytes(_flipped(good, at))
        with pytest.raises(MeldDataError, match="do not match the CRC32 written with them"):
            SplitStore(path)


def test_a_store_written_without_a_checksum_is_read_unchecked(tmp_path):
    # Stores prepared before the checksum existed stay readable (prepare adds one; see test_prepare).
    journal = Journal(tmp_path / "journal")
    clips = [journal.append(record("dev/dia0_utt0", OK, 4), mel(4, 0.25))]
    journal.close()
    path = tmp_path / "dev.safetensors"
    _store(path, clips)
    assert SplitStore(path).checked
    with safe_open(str(path), framework="np") as handle:
        meta = json.loads(handle.metadata()["meld_clara"])
    del meta["mel_crc32"]
    save_file({"mel": mel(4, 0.25)}, str(path), metadata={"meld_clara": json.dumps(meta)})
    store = SplitStore(path)
    assert not store.checked
    np.testing.assert_array_equal(store.frames("dev/dia0_utt0"), mel(4, 0.25))
