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
from clara.pretrain_data import DataConfig, DataError, PairDataset, PretrainCollate, padded_samples, read_manifest


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
    ("frames_multiple=0", "frames_multiple must be at least 1, got 0"),
    ("tokens_multiple=-8", "tokens_multiple must be at least 1, got -8"),
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
    with pytest.raises(DataError, match=rf"^{manifest}:2: 'language': unknown language code 'xx'; valid codes: en, "):
        read_manifest(manifest)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "a.wav", arcname="k1.wav")
        meta = json.dumps({"text": "a tone", "original_data": {"language": "klingon"}}).encode()
        info = tarfile.TarInfo("k1.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    with pytest.raises(DataError, match=rf"^{shard}: k1.json: 'original_data.language': unknown language code 'klingon'"):
        PairDataset(str(shard))


def test_language_names_read_as_their_codes_in_rows_members_and_the_default(tmp_path):
    """Whisper takes "english" as well as "en"; rows labelled "English" or "german" were refused as
    unknown codes.  Every spelling reads as the code, so items and held-out texts agree."""
    write_wav(tmp_path / "a.wav")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "caption": "a tone", "language": "English"},
        {"audio": "a.wav", "caption": "a tone", "language": "GERMAN"},
        {"audio": "a.wav", "caption": "a tone", "language": "castilian"},
        {"audio": "a.wav", "caption": "a tone", "language": "he"},
        {"audio": "a.wav", "caption": "a tone"},
    ])  # fmt: skip
    assert [r.language for r in read_manifest(manifest)] == ["en", "de", "es", "iw", None]
    data = PairDataset(str(manifest), language="French")
    assert [data[i]["language"] for i in range(5)] == ["en", "de", "es", "iw", "fr"]
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("audio,caption,language\na.wav,a tone,Japanese\na.wav,a tone,\n")
    assert [r.language for r in read_manifest(csv_manifest)] == ["ja", None]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, meta in (("k1", {"text": "a tone", "language": "Dutch"}),
                          ("k2", {"text": "a tone", "original_data": {"language": "mandarin"}})):  # fmt: skip
            tar.add(tmp_path / "a.wav", arcname=f"{key}.wav")
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
    assert [r.language for r in PairDataset(str(shard)).records] == ["nl", "zh"]
    assert config_lib.load(DataConfig, None, ["language=English"]).language == "English"
    with pytest.raises(DataError, match=rf"^{csv_manifest}:2: 'language': unknown language code 'cantonese'"):
        csv_manifest.write_text("audio,caption,language\na.wav,a tone,cantonese\n")
        read_manifest(csv_manifest)
    with pytest.raises(DataError, match=rf"^{manifest}:1: 'language': unknown language code 5; "):
        write_jsonl(manifest, [{"audio": "a.wav", "caption": "a tone", "language": 5}])
        read_manifest(manifest)


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


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_shard_member_that_cannot_be_decoded_is_named_not_its_temporary_copy(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "k1.wav", b"not audio at all")
        add_member(tar, "k1.json", json.dumps({"text": "junk"}).encode())
    with pytest.raises(AudioDecodeError) as err:
        PairDataset(str(shard))[0]
    message = str(err.value)
    assert message.startswith(f"{shard}#k1.wav: cannot decode audio (")
    assert "/" not in message.replace(str(shard), "")  # no other path: the temporary file's is gone


def test_a_clip_without_samples_is_one_named_error(tmp_path):
    """FFmpeg decodes a header-only WAV to no samples; such a clip used to stop pretraining with a
    traceback from the log-mel's reshape."""
    write_wav(tmp_path / "empty.wav", seconds=0)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "empty.wav", "caption": "nothing"}])
    with pytest.raises(AudioDecodeError) as err:
        PairDataset(str(manifest))[0]
    assert str(err.value) == f"{manifest}:1: {tmp_path / 'empty.wav'}: no audio samples decoded"
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "empty.wav", arcname="k1.wav")
        add_member(tar, "k1.json", json.dumps({"text": "nothing"}).encode())
    with pytest.raises(AudioDecodeError, match=rf"^{shard}#k1.wav: no audio samples decoded$"):
        PairDataset(str(shard))[0]


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_a_manifest_starting_with_a_byte_order_mark_reads(tmp_path, name):
    """Excel's "CSV UTF-8" and some Windows editors begin the file with a BOM; it used to stick to the
    first header ("the header needs the column(s) audio") or make the first JSON line invalid."""
    write_wav(tmp_path / "a.wav")
    text = ('{"audio": "a.wav", "caption": "a tone"}\n' if name.endswith(".jsonl") else "audio,caption\na.wav,a tone\n")
    (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
    records = read_manifest(tmp_path / name)
    assert [(r.audio, r.caption) for r in records] == [(str(tmp_path / "a.wav"), "a tone")]


def test_padded_samples_give_the_next_multiple_of_frames():
    """1 + N // 512 frames: a 1,000-sample clip has 2; to a multiple of 4 it pads to 2,047 samples
    (4 frames, the most samples that still give 4); a multiple of 1 leaves it alone."""
    from clara.audio_frontend import num_frames

    assert padded_samples(1000, 1) == 1000
    assert padded_samples(1000, 4) == 2047 and num_frames(2047) == 4 and num_frames(2048) == 5
    for longest in (1, 511, 512, 2047, 2048, 48_000 * 3 + 7):
        for multiple in (2, 8, 64):
            padded = padded_samples(longest, multiple)
            frames = num_frames(padded)
            assert padded >= longest and frames % multiple == 0 and frames - num_frames(longest) < multiple


def test_pretrain_collate_pads_to_multiples_and_keeps_true_lengths():
    import torch

    from clara.tokenizer import Tokenizer

    tokenizer = Tokenizer(max_length=12)
    items = [{"wave": torch.full((n,), 0.5), "caption": caption, "language": "en"}
             for n, caption in ((900, "a dog barks"), (3000, "rain on a tin roof, then thunder far away"))]  # fmt: skip
    plain = PretrainCollate(tokenizer)(items)
    padded = PretrainCollate(tokenizer, frames_multiple=8, tokens_multiple=8)(items)
    assert plain["wave"].shape == (2, 3000) and padded["wave"].shape == (2, padded_samples(3000, 8)) == (2, 4095)
    assert torch.equal(padded["wave"][:, :3000], plain["wave"]) and not padded["wave"][:, 3000:].any()
    assert torch.equal(padded["wave_lengths"], plain["wave_lengths"])
    assert torch.equal(padded["token_lengths"], plain["token_lengths"])
    width = plain["tokens"].shape[1]  # the longest caption, cut to 12 tokens
    assert width == 12 and padded["tokens"].shape[1] == 12  # the next multiple (16) is capped at max_length
    short = PretrainCollate(tokenizer, tokens_multiple=8)(items[:1])
    assert short["tokens"].shape[1] == 8 and not short["tokens"][0, int(short["token_lengths"][0]):].any()


def test_padding_to_multiples_leaves_clara_embeddings_unchanged():
    """The padding is masked: both towers embed a padded batch as the unpadded one (tiny CLARA, eval,
    the pretraining task's own log-mel)."""
    import torch

    from clara.audio_frontend import LogMel
    from clara.model import Clara
    from clara.model_config import load_model_config
    from clara.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Clara(load_model_config("tiny")).eval()
    frontend, tokenizer = LogMel(), Tokenizer(max_length=64)
    items = [{"wave": torch.randn(n) * 0.1, "caption": caption, "language": "en"}
             for n, caption in ((20_000, "a door creaks"), (33_000, "two people laugh in a small room"))]  # fmt: skip
    embeds = []
    for collate in (PretrainCollate(tokenizer), PretrainCollate(tokenizer, frames_multiple=64, tokens_multiple=8)):
        batch = collate(items)
        mel, frames = frontend(batch["wave"], batch["wave_lengths"])
        with torch.no_grad():
            out = model(mel, batch["tokens"], frames, batch["token_lengths"])
        embeds.append((mel.shape[-1], out.audio_embeds, out.text_embeds))
    (plain_frames, plain_audio, plain_text), (padded_frames, padded_audio, padded_text) = embeds
    assert padded_frames % 64 == 0 and padded_frames > plain_frames
    torch.testing.assert_close(padded_audio, plain_audio, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_text, plain_text, rtol=1e-5, atol=1e-6)


def test_a_caption_holding_a_unicode_line_separator_stays_one_row(tmp_path):
    """JSON writers with ensure_ascii=False leave U+2028 / U+0085 unescaped inside strings; the rows
    used to be cut there (str.splitlines), so a valid manifest read as "not valid JSON"."""
    write_wav(tmp_path / "a.wav")
    captions = ["rain\u2028then thunder", "a sigh\x85and a cough", "a plain caption"]
    lines = [json.dumps({"audio": "a.wav", "caption": caption}, ensure_ascii=False) for caption in captions]
    (tmp_path / "m.jsonl").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    records = read_manifest(tmp_path / "m.jsonl")
    assert [r.caption for r in records] == captions
    assert [r.origin for r in records] == [f"{tmp_path / 'm.jsonl'}:{n}" for n in (1, 2, 3)]


def test_csv_errors_name_the_file_line_past_blank_lines(tmp_path):
    """The reader skips blank lines; counting rows named line 3 for a row on line 5."""
    write_wav(tmp_path / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio,caption\na.wav,a tone\n\n\nb.wav,missing\n")
    with pytest.raises(DataError) as err:
        read_manifest(manifest)
    assert str(err.value) == f"{manifest}:5: {tmp_path / 'b.wav'}: file not found"
    manifest.write_text("audio,caption\n\na.wav,a tone\na.wav,\n")
    with pytest.raises(DataError) as err:
        read_manifest(manifest)
    assert str(err.value) == f"{manifest}:4: expected a non-empty 'caption'"


def test_a_csv_quote_left_open_is_named_with_its_line(tmp_path):
    """A caption opening a quote it never closes ran on through every later row: a small manifest read
    as fewer pairs, one caption holding the rest of the file, without a word; past 128 KiB the csv
    module stopped the run with a traceback.  Valid quoting (commas, doubled quotes, line breaks
    inside quotes) still reads."""
    write_wav(tmp_path / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text('audio,caption\na.wav,"a tone, then ""rain""\nand wind"\na.wav,plain\n')
    assert [r.caption for r in read_manifest(manifest)] == ['a tone, then "rain"\nand wind', "plain"]
    assert [r.origin for r in read_manifest(manifest)] == [f"{manifest}:3", f"{manifest}:4"]
    # 4 later rows were swallowed silently; 8,000 (200 KB) overflowed the csv module's field limit.
    for later, reason in ((4, "unexpected end of data"), (8000, "field larger than field limit (131072)")):
        rows = "".join(f"a.wav,caption number {i}\n" for i in range(later))
        manifest.write_text("audio,caption\na.wav,a tone\na.wav,\"it's raining\n" + rows)
        with pytest.raises(DataError) as err:
            read_manifest(manifest)
        assert str(err.value) == f"{manifest}:3: not valid CSV from this line on ({reason}); check the quotes there"
    manifest.write_text('audio,caption\na.wav,a tone\na.wav,"a tone" with more\n')
    with pytest.raises(DataError, match=rf"^{manifest}:3: not valid CSV from this line on \(',' expected after"):
        read_manifest(manifest)


@pytest.mark.parametrize("mode, compression", [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_a_compressed_shard_is_refused_when_indexed(tmp_path, mode, compression):
    """Members are read by their offset in the shard file, which a compressed tar does not have: a
    .tar.gz used to index fine and then fail every sample mid-training with "cannot decode audio"."""
    write_wav(tmp_path / "a.wav")
    shard = tmp_path / "s.tar.gz"
    with tarfile.open(shard, mode) as tar:
        tar.add(tmp_path / "a.wav", arcname="k1.wav")
        add_member(tar, "k1.json", json.dumps({"text": "a tone"}).encode())
    with pytest.raises(DataError) as err:
        PairDataset(str(shard))
    assert str(err.value).startswith(f"{shard}: a {compression}-compressed tar; shards must be uncompressed .tar files")
    (tmp_path / "junk.tar").write_bytes(b"neither tar nor compressed" * 40)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'junk.tar'}: not a readable tar file"):
        PairDataset(str(tmp_path / "junk.tar"))


def test_a_manifest_suffix_in_capitals_reads_and_another_suffix_says_what_sources_must_be(tmp_path):
    """m.JSONL and m.CSV (Windows tools write capitals) were taken for tar shards; a manifest named
    train.json was "not a readable tar file (truncated header)", with no word of what was expected."""
    write_wav(tmp_path / "a.wav")
    row = {"audio": "a.wav", "caption": "a tone"}
    write_jsonl(tmp_path / "m.JSONL", [row])
    (tmp_path / "m.CSV").write_text("audio,caption\na.wav,a tone\n")
    for name in ("m.JSONL", "m.CSV"):
        assert [(r.audio, r.caption) for r in PairDataset(str(tmp_path / name)).records] == [(str(tmp_path / "a.wav"), "a tone")]
    write_jsonl(tmp_path / "train.json", [row])
    with pytest.raises(DataError) as err:
        PairDataset(str(tmp_path / "train.json"))
    assert str(err.value).startswith(f"{tmp_path / 'train.json'}: not a readable tar file (")
    assert str(err.value).endswith("); manifests must end in .jsonl or .csv, shards in .tar")
    (tmp_path / "junk.tar").write_bytes(b"neither tar nor compressed" * 40)
    with pytest.raises(DataError, match=r"not a readable tar file \([^)]*\)$"):  # a .tar is meant as a shard
        PairDataset(str(tmp_path / "junk.tar"))


def test_shards_without_a_complete_sample_say_what_a_sample_needs(tmp_path):
    """A shard of video clips (k1.mp4 + k1.json) held "no complete (audio + json) samples", without
    a word of which members count as audio."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "k1.mp4", b"a video")
        add_member(tar, "k1.json", json.dumps({"text": "a tone"}).encode())
    with pytest.raises(DataError) as err:
        PairDataset(str(shard))
    assert str(err.value) == (f"{shard}: the shards hold no complete samples: each needs a json member and an audio "
                              "member (flac, wav, mp3, ogg, opus, m4a) of the same key, such as k1.json and k1.flac")
