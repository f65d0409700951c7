"""Captions and the pretraining manifest exported from a small demo."""

from __future__ import annotations

import json
import shutil

import pytest

from clara.config import ConfigError
from clara.pretrain_data import read_manifest
from meld.captions import CaptionConfig, caption_for, load_captions, template_index
from meld.demo import make_demo
from meld.errors import MeldDataError
from meld.feature_cache import AudioSettings
from meld.layout import find_layout
from meld.prepare import prepare
from meld.pretrain_manifest import export_manifest, main
from meld.records import load_splits


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 40-utterance demo and its feature cache: (MELD root, cache root, prepare's report)."""
    base = tmp_path_factory.mktemp("manifest")
    root = make_demo(base / "demo", size=40)
    report = prepare(root, base / "cache", workers=1)
    return root, base / "cache", report


def test_export_skips_what_prepare_could_not_use(prepared, tmp_path):
    root, cache, report = prepared
    summary = export_manifest(root, tmp_path / "m.jsonl", cache_root=cache)
    train = load_splits(find_layout(root, ("train",), need_clips=False))["train"]
    bad = {p["key"] for p in report["problems"] if p["split"] == "train" and p["status"] != "truncated"}
    assert bad, "the demo plants broken train clips"
    assert set(summary.skipped) == bad
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert summary.written == len(rows) == len(train) - len(bad)
    assert {row["key"] for row in rows} == {u.key for u in train} - bad
    captions = load_captions()
    by_key = {u.key: u for u in train}
    for row in rows:
        utt = by_key[row["key"]]
        assert row["emotion"] == utt.emotion and row["caption"] == caption_for(utt, captions)
        assert captions.emotion_words[utt.emotion] in row["caption"]
    assert any(by_key[row["key"]].text in row["caption"] for row in rows)
    # clara.pretrain reads it as is.
    records = read_manifest(tmp_path / "m.jsonl")
    assert len(records) == len(rows) and all(r.audio.endswith(".mp4") for r in records)


def test_captions_follow_the_templates(prepared, tmp_path):
    root, cache, _ = prepared
    templates = tmp_path / "captions.yaml"
    templates.write_text('templates: ["{speaker} ({sentiment}, {emotion_label}): {utterance}"]\n')
    export_manifest(root, tmp_path / "m.jsonl", templates=templates, splits=("dev",), cache_root=cache)
    row = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    dev = {u.key: u for u in load_splits(find_layout(root, ("dev",), need_clips=False))["dev"]}
    utt = dev[row["key"]]
    assert row["caption"] == f"{utt.speaker} ({utt.sentiment}, {utt.emotion}): {utt.text}"


# Hard-coded from the SHA-256 of each key (meld.captions.template_index), so a hash that changes between
# processes or versions (Python's salted ``hash``, another digest) fails here: a clip's caption template
# must be the same in every run, or an exported manifest would not match the next one.
KNOWN_TEMPLATES = {("train/dia0_utt0", 4): 0, ("train/dia2_utt0", 4): 1, ("test/dia7_utt4", 4): 2,
                   ("train/dia0_utt1", 4): 3, ("train/dia1_utt0", 3): 1, ("dev/dia3_utt2", 3): 2}


def test_template_choice_is_stable_across_processes_and_spread():
    assert {known: template_index(*known) for known in KNOWN_TEMPLATES} == KNOWN_TEMPLATES
    counts = [0] * 4
    for d in range(200):
        counts[template_index(f"train/dia{d}_utt0", 4)] += 1
    assert min(counts) > 30


def test_caption_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown field"):
        CaptionConfig(templates=("{mood}",))
    with pytest.raises(ConfigError, match="missing fear"):
        CaptionConfig(emotion_words={e: e for e in ("neutral", "joy", "surprise", "anger", "sadness", "disgust")})


def test_cli(prepared, tmp_path, capsys):
    root, cache, _ = prepared
    out = tmp_path / "m.jsonl"
    assert main(["--data", str(root), "--out", str(out), "--cache", str(cache)]) == 0
    assert out.is_file() and f"clara.pretrain data.train={out} train.out_dir=runs/clara-m\n" in capsys.readouterr().out


def test_a_split_named_twice_is_exported_once(prepared, tmp_path, capsys):
    root, cache, _ = prepared
    out = tmp_path / "m.jsonl"
    assert main(["--data", str(root), "--out", str(out), "--cache", str(cache), "--split", "train", "dev", "train"]) == 0
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    once = export_manifest(root, tmp_path / "once.jsonl", splits=("train", "dev"), cache_root=cache)
    assert keys == [json.loads(line)["key"] for line in (tmp_path / "once.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == once.written
    assert f"wrote {once.written} clips" in capsys.readouterr().out


def test_cli_reads_the_report_of_prepares_audio_settings(prepared, tmp_path, capsys):
    """prepare --max-seconds 20 --set audio.min_seconds=6 writes its report in that setting's cache
    folder and reports the demo's clips under 6 s silent or empty; the same flags find that report
    and export the default settings' manifest less those clips."""
    root, default_cache, _ = prepared
    flags = ["--max-seconds", "20", "--set", "audio.min_seconds=6"]
    report = prepare(root, tmp_path / "cache", AudioSettings(max_seconds=20.0, min_seconds=6.0), workers=1)
    short = {p["key"] for p in report["problems"] if p["reason"].endswith("under the 6 s minimum")}
    out = tmp_path / "m.jsonl"
    assert main(["--data", str(root), "--out", str(out), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.startswith("error: no prepare report")
    assert main(["--data", str(root), "--out", str(out), "--cache", str(tmp_path / "cache"), *flags]) == 0
    export_manifest(root, tmp_path / "default.jsonl", cache_root=default_cache)
    default = [json.loads(line)["key"] for line in (tmp_path / "default.jsonl").read_text().splitlines()]
    assert [json.loads(line)["key"] for line in out.read_text().splitlines()] == [k for k in default if k not in short]
    assert len(short & set(default)) >= 5


def test_cli_errors_are_one_line(prepared, tmp_path, capsys):
    root, _, _ = prepared
    assert main(["--data", str(root), "--out", str(tmp_path / "m.jsonl"), "--cache", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no prepare report") and err.count("\n") == 1
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert main(["--data", str(root), "--out", str(tmp_path / "m.csv")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_unprepared_data_is_an_error(prepared, tmp_path):
    root, _, _ = prepared
    with pytest.raises(MeldDataError, match="meld.prepare"):
        export_manifest(root, tmp_path / "m.jsonl", cache_root=tmp_path / "empty")


@pytest.mark.parametrize("damage", ['{"problems": [', '{"run": {}}', '{"problems": [{"key": "train/dia0_utt0"}]}'])
def test_a_damaged_prepare_report_is_one_clear_error_and_prepare_mends_it(prepared, tmp_path, damage):
    root, cache, _ = prepared
    own_cache = tmp_path / "cache"
    shutil.copytree(cache, own_cache)
    report = next(own_cache.glob("audio-*/prepare_report.json"))
    report.write_text(damage)
    with pytest.raises(MeldDataError, match=rf"^{report}: not a readable prepare report \(.*\); run `python -m "
                                            rf"meld.prepare --data {root} --cache {own_cache}` again"):
        export_manifest(root, tmp_path / "m.jsonl", cache_root=own_cache)
    assert not (tmp_path / "m.jsonl").exists()
    assert prepare(root, own_cache, workers=1)["run"]["decoded"] == 0  # every clip reused, the report rewritten
    assert export_manifest(root, tmp_path / "m.jsonl", cache_root=own_cache).written > 0


def test_the_language_is_written_as_its_code_and_an_unknown_one_is_refused_first(prepared, tmp_path):
    """A Whisper language name ("German") is written as its code; an unknown one is refused before
    the report is read (no cache here), not written into a manifest clara.pretrain then refuses."""
    root, cache, _ = prepared
    export_manifest(root, tmp_path / "m.jsonl", cache_root=cache, language="German")
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {row["language"] for row in rows} == {"de"}
    assert {record.language for record in read_manifest(tmp_path / "m.jsonl")} == {"de"}
    with pytest.raises(ConfigError, match=r"^language: unknown language code 'klingon'; valid codes: en, zh"):
        export_manifest(root, tmp_path / "k.jsonl", cache_root=tmp_path / "none", language="klingon")
    assert not (tmp_path / "k.jsonl").exists()
