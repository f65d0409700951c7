"""python -m meld.predict: one text or one audio file through a finished run, and one clear error per mistake."""

from __future__ import annotations

import csv
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from meld.finetune import load_config, run_finetune
from meld.labels import EMOTIONS
from meld.layout import find_layout
from meld.predict import main, predict
from meld.records import load_splits
from tests.meld.finetune_helpers import FAST, small_demo, text_config, write_csv_meld


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    return write_csv_meld(tmp_path_factory.mktemp("csv") / "meld")


@pytest.fixture(scope="module")
def text_run(text_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "text"
    run_finetune(text_config(text_root, "train.epochs=1"), out_dir=out)
    return out


def demo_run(tmp_path_factory, modality: str) -> Path:
    """A one-epoch fine-tune on the smallest demo, on ``modality``."""
    root, cache = small_demo()
    out = tmp_path_factory.mktemp("run") / modality
    config = load_config(None, [*FAST, f"data_root={root}", f"cache_root={cache}", f"data.modality={modality}",
                                "train.epochs=1"])
    run_finetune(config, out_dir=out)
    return out


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory) -> Path:
    return demo_run(tmp_path_factory, "audio")


@pytest.fixture(scope="module")
def both_run(tmp_path_factory) -> Path:
    return demo_run(tmp_path_factory, "both")


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Mono 16-bit PCM of ``samples`` (int16 [N])."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.astype("<i2").tobytes())
    return path


def _wav(path: Path, seconds: float = 1.0, rate: int = 16_000, amplitude: float = 0.3) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    return _write_wav(path, np.round(amplitude * np.sin(2 * np.pi * 220 * t) * 32767), rate)


def test_text_prediction_prints_label_and_probabilities(text_run, capsys):
    assert main(["--run", str(text_run), "Yay, this is great!"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("emotion: ") and len(lines) == 8
    probabilities = [float(line.split()[-1]) for line in lines[1:]]
    assert sum(probabilities) == pytest.approx(1.0, abs=0.01) and probabilities == sorted(probabilities, reverse=True)


def _test_utterances(root: Path):
    """The test split's utterances (key, text, ...) of a MELD root, CSV-only or not."""
    return load_splits(find_layout(root, ("test",), need_clips=False))["test"]


def _run_predictions(run: Path) -> dict[str, dict[str, float]]:
    """predictions.csv of a run: {key: {class: p}}, the probabilities the run's own evaluation computed."""
    with open(run / "predictions.csv", newline="") as handle:
        return {row["key"]: {name[2:]: float(value) for name, value in row.items() if name.startswith("p_")}
                for row in csv.DictReader(handle)}


def _assert_same_probabilities(result: dict, expected: dict[str, float], what: str) -> None:
    # predictions.csv keeps 6 decimals, and its batch was padded differently: 1e-4 is well above both.
    assert result["probabilities"] == pytest.approx(expected, abs=1e-4), what
    top, second = sorted(expected.values(), reverse=True)[:2]
    assert result["label"] == max(expected, key=expected.get) or top - second < 1e-4, what


def test_prediction_matches_the_run_model(text_root, text_run):
    # predict() rebuilds the classifier from model/ and tokenizes the text itself; its probabilities must
    # be the ones the run's own test evaluation wrote for the same utterance (same model, same inputs).
    expected = _run_predictions(text_run)
    utterances = _test_utterances(text_root)
    assert {u.key for u in utterances} == set(expected)
    for utt in utterances:
        _assert_same_probabilities(predict(text_run, utt.text), expected[utt.key], utt.key)
    # And the model is not a constant: different texts get different distributions.
    rows = [tuple(expected[u.key].values()) for u in utterances]
    assert len({tuple(round(p, 3) for p in row) for row in rows}) > 1


def test_audio_file_prediction(audio_run, tmp_path, capsys):
    clip = _wav(tmp_path / "clip.wav")
    assert main(["--run", str(audio_run), str(clip), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "emotion" and sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    root, _ = small_demo()
    mp4 = next((root / "train" / "train_splits").glob("dia1_utt*.mp4"))
    assert main(["--run", str(audio_run), str(mp4)]) == 0


def test_audio_prediction_matches_the_run_model(audio_run):
    # A test clip decoded by predict() (the mp4 itself, not prepare's cached log-mel) must get the
    # probabilities the run's evaluation wrote for it: same model, same audio front-end.
    expected = _run_predictions(audio_run)
    root, _ = small_demo()
    clips, checked = find_layout(root, ("test",), need_clips=True)["test"].clips, 0
    for utt in _test_utterances(root):
        clip = clips / utt.clip_name
        if utt.key not in expected or not clip.is_file():
            continue  # the demo plants broken clips, which the run leaves out
        _assert_same_probabilities(predict(audio_run, str(clip)), expected[utt.key], utt.key)
        # A Path, as from Python code, is the same file (it raised AttributeError on str methods).
        _assert_same_probabilities(predict(audio_run, clip), expected[utt.key], utt.key)
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def _assert_one_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


def test_bad_items_give_one_clear_error(text_run, audio_run, tmp_path, capsys):
    _assert_one_error(capsys, ["--run", str(tmp_path), "hello"], "not a fine-tune run directory")
    _assert_one_error(capsys, ["--run", str(tmp_path / "nowhere"), "hello"], f"{tmp_path / 'nowhere'}: no such folder")
    _assert_one_error(capsys, ["--run", str(audio_run), "hello there"], "give an mp4 or wav file")
    _assert_one_error(capsys, ["--run", str(audio_run), str(tmp_path / "missing.wav")], "file not found")
    # A path with a suffix that is not an audio one, or a bare name like a file's, is still a missing file.
    _assert_one_error(capsys, ["--run", str(audio_run), "missing.avi", "--text", "hi"], "missing.avi: file not found")
    _assert_one_error(capsys, ["--run", str(audio_run), str(tmp_path / "clips" / "take1")], "take1: file not found")
    # A device is there but is no clip (it was "file not found").
    _assert_one_error(capsys, ["--run", str(audio_run), "/dev/null"], "error: /dev/null: not a regular file")
    _assert_one_error(capsys, ["--run", str(audio_run), "Oh. My. God."], "give an mp4 or wav file")
    _assert_one_error(capsys, ["--run", str(text_run), str(_wav(tmp_path / "a.wav"))], "classifies text")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    _assert_one_error(capsys, ["--run", str(audio_run), str(broken)], "broken.mp4")
    _assert_one_error(capsys, ["--run", str(text_run), "hi", "--context", "Ross: hello", "--speaker", "Joey"],
                      "trained without dialogue context")
    _assert_one_error(capsys, ["--run", str(audio_run), str(broken), "--context", "Ross: hello"], "audio only")
    # --speaker alone would be dropped unread by a run without context, or on audio only.
    _assert_one_error(capsys, ["--run", str(text_run), "hi", "--speaker", "Joey"], "leave out --speaker")
    _assert_one_error(capsys, ["--run", str(audio_run), str(broken), "--speaker", "Joey"],
                      "dialogue context (--speaker) is for runs on text")


def test_empty_text_is_one_error_naming_the_item_or_flag(text_run, audio_run, both_run, tmp_path, capsys):
    clip = str(_wav(tmp_path / "clip.wav"))
    for empty in ("", "   "):
        _assert_one_error(capsys, ["--run", str(text_run), empty],
                          "error: the item is empty; give the utterance's text as a quoted string")
        _assert_one_error(capsys, ["--run", str(both_run), clip, "--text", empty],
                          "error: --text is empty; give the transcript of the clip")
    # Path("") is the current folder: for an audio run the empty item is refused as empty, not as a folder.
    _assert_one_error(capsys, ["--run", str(audio_run), ""], "error: the item is empty; give an mp4 or wav file")


def test_an_utterance_longer_than_a_file_name_is_classified_as_text(text_run, both_run, capsys):
    # Checked as a path first, a text over the file system's 255-byte name limit raised ENAMETOOLONG.
    long_text = "So I was telling Joey about the whole thing, " * 8
    assert len(long_text.encode()) > 255
    assert predict(text_run, long_text)["label"] in EMOTIONS
    _assert_one_error(capsys, ["--run", str(both_run), long_text], "give an mp4 or wav file, not text")


def test_text_for_a_run_that_reads_no_transcript_is_one_error(text_run, audio_run, both_run, tmp_path, capsys):
    clip = str(_wav(tmp_path / "clip.wav"))
    _assert_one_error(capsys, ["--run", str(audio_run), clip, "--text", "No way!"],
                      "error: this run classifies audio only; leave out --text")
    _assert_one_error(capsys, ["--run", str(text_run), "No way!", "--text", "No way!"],
                      "error: this run classifies text: give the utterance as the item, without --text")
    # The other way round: a clip for a text run, and a clip without its transcript for a run on both.
    _assert_one_error(capsys, ["--run", str(text_run), clip], "error: this run classifies text")
    _assert_one_error(capsys, ["--run", str(both_run), clip], "error: this run uses audio and text: add the transcript")
    assert main(["--run", str(both_run), clip, "--text", "No way!"]) == 0


def test_a_folder_for_an_audio_file_is_one_error_saying_so(text_run, audio_run, both_run, tmp_path, monkeypatch,
                                                           capsys):  # fmt: skip
    for name in ("clips", "clip.wav"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    _assert_one_error(capsys, ["--run", str(audio_run), str(tmp_path / "clips")],
                      f"error: {tmp_path / 'clips'}: a folder, not an audio or video file")
    _assert_one_error(capsys, ["--run", str(audio_run), "clips"], "error: clips: a folder, not an audio or video file")
    _assert_one_error(capsys, ["--run", str(both_run), "clip.wav", "--text", "hi"],
                      "error: clip.wav: a folder, not an audio or video file")
    _assert_one_error(capsys, ["--run", str(text_run), "clip.wav"], "error: clip.wav: a folder, not an audio or video")
    # A text run reads a word that happens to name a folder as the text it is.
    assert main(["--run", str(text_run), "clips"]) == 0


def test_silent_audio_is_classified_with_the_reason_prepare_drops_it(audio_run, both_run, tmp_path, capsys):
    # The demo plants a clip of digital silence that prepare reported and training left out.
    root, cache = small_demo()
    report = json.loads(next(cache.glob("*/prepare_report.json")).read_text())
    (dropped,) = [p for p in report["problems"] if p["reason"].startswith("silent")]
    clip = root / dropped["file"]
    notice = (f"warning: {clip}: {dropped['reason']} (the run's audio.silence_dbfs): training left such clips out, "
              "so the audio gives the model nothing to go on")
    assert dropped["reason"] == "silent: digital silence, at or under -80 dBFS"
    assert main(["--run", str(audio_run), str(clip)]) == 0
    out, err = capsys.readouterr()
    assert err == notice + "\n" and out.startswith("emotion: ") and len(out.splitlines()) == 8
    # Not digital silence, but under the run's -80 dBFS: a peak of 2 in 16-bit samples is -84.3 dBFS. At
    # the run's 48 kHz, so no resampling moves the peak.
    quiet = _wav(tmp_path / "quiet.wav", rate=48_000, amplitude=2 / 32767)
    assert main(["--run", str(both_run), str(quiet), "--text", "No way!", "--json"]) == 0
    out, err = capsys.readouterr()
    line = f"{quiet}: silent: peak -84.3 dBFS, at or under -80 dBFS (the run's audio.silence_dbfs)"
    assert err.startswith(f"warning: {line}") and len(err.splitlines()) == 1
    result = json.loads(out)
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith(line)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    # Just over the threshold (a peak of 4, -78.3 dBFS) is audio as training had it: no warning.
    assert predict(audio_run, str(_wav(tmp_path / "audible.wav", rate=48_000, amplitude=4 / 32767)))["warnings"] == []
    assert main(["--run", str(audio_run), str(_wav(tmp_path / "clip.wav"))]) == 0
    assert capsys.readouterr().err == ""


def test_a_clip_over_the_runs_cap_is_classified_on_its_first_seconds_with_a_warning(audio_run, tmp_path, capsys):
    # The run's audio.max_seconds is 30: a 31 s clip is read as prepare read long clips for training, its
    # first 30 s, and the user is told. At the run's 48 kHz, so no resampling blurs the cut.
    rate, seconds = 48_000, 31.0
    t = np.arange(int(seconds * rate)) / rate
    tone = np.where(t < 30.0, np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 3_000 * t))  # the end differs
    samples = np.round(0.3 * tone * 32767)

    long = _write_wav(tmp_path / "long.wav", samples, rate)
    first = _write_wav(tmp_path / "first30.wav", samples[: 30 * rate], rate)
    expected = predict(audio_run, str(first))
    assert expected["warnings"] == []  # a clip exactly at the cap is whole
    assert main(["--run", str(audio_run), str(long), "--json"]) == 0
    out, err = capsys.readouterr()
    line = f"{long}: longer than the run's audio.max_seconds (30 s): only its first 30 s were classified"
    assert err.startswith(f"warning: {line}") and len(err.splitlines()) == 1, err
    result = json.loads(out)
    assert result["warnings"][0].startswith(line)
    assert result["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)


def _spec_changes(spec: dict) -> dict:
    """name -> (a damaged or foreign classifier.json, the fragment its error must have after the file name)."""
    head = spec["head"]
    without_target = {k: v for k, v in spec.items() if k != "target"}
    return {
        "a list": ([], "expected a JSON object with the fields format, target"),
        "a string": ("model", "expected a JSON object"),
        "no target": (without_target, "field 'target' is missing; expected emotion or sentiment"),
        "unknown target": ({**spec, "target": "mood"}, "field 'target' is 'mood'; expected emotion or sentiment"),
        "inputs a string": ({**spec, "inputs": "text"}, "field 'inputs' is \"text\"; expected a list"),
        "unknown input": ({**spec, "inputs": ["video"]}, "field 'inputs' is [\"video\"]; expected some of audio"),
        "no classes": ({**spec, "class_names": []}, "field 'class_names' is []; expected two or more"),
        "features": ({**spec, "features": "raw"}, "field 'features' is 'raw'; expected projected or pooled"),
        "clara missing": ({**spec, "clara": None}, "field 'clara' is null, but the inputs text need CLARA"),
        "head a list": ({**spec, "head": []}, "field 'head' is []; expected an object {\"dims\""),
        "head dims of another input": ({**spec, "head": {**head, "dims": {"audio": 32}}}, "field 'head' is"),
        "head option unknown": ({**spec, "head": {**head, "options": {"depth": 3}}},
                                "field 'head' does not describe a head (TypeError"),
        "token limit": ({**spec, "hf_max_tokens": "512"}, "field 'hf_max_tokens' is \"512\"; expected a whole number"),
        "data unknown key": ({**spec, "data": {"bogus": 1}}, ": data: unknown key(s) bogus"),
    }


def test_a_damaged_model_spec_is_one_error_naming_the_file_and_field(text_run, tmp_path, capsys):
    spec = json.loads((text_run / "model" / "classifier.json").read_text())
    for name, (changed, fragment) in _spec_changes(spec).items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(text_run / "model", run / "model")
        path = run / "model" / "classifier.json"
        path.write_text(json.dumps(changed))
        assert main(["--run", str(run), "hello"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: ") and fragment in err, (name, err)


def test_missing_damaged_or_foreign_weights_are_one_error_saying_which(text_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    weights = text_run / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    damaged = {
        "missing": (None, "model.safetensors: missing; a finished run's model/ holds model.safetensors"),
        "cut short": (weights.read_bytes()[:500], "model.safetensors: not a readable safetensors file"),
        "another model's": (dict(list(tensors.items())[1:]), "model.safetensors: does not fit classifier.json"),
    }
    for name, (content, fragment) in damaged.items():
        run = tmp_path / name.replace(" ", "-").replace("'", "")
        shutil.copytree(text_run / "model", run / "model")
        path = run / "model" / "model.safetensors"
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            save_file(content, str(path))
        _assert_one_error(capsys, ["--run", str(run), "hello"], f"{run}/model/{fragment}")


def test_a_local_transformers_text_encoder_beside_clara_trains_and_predicts(tmp_path, capsys):
    from tests.meld.test_classifier import tiny_bert

    bert = tiny_bert(tmp_path / "bert")
    root = write_csv_meld(tmp_path / "meld")
    config = text_config(root, f"model.hf_text={bert}", "model.hf_text_mode=beside", "model.fusion=attention",
                         "data.context_turns=1", "train.epochs=1")
    run_finetune(config, out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "model" / "hf_text" / "tokenizer_config.json").is_file()
    # The run's test predictions came from CLARA's text and the BERT text of each utterance after its
    # previous turn (context_turns=1); predict() must rebuild both towers and the attention head from
    # model/ and, given the same turn, give the same probabilities.
    expected = _run_predictions(tmp_path / "run")
    utterances = _test_utterances(root)
    for utt in utterances:
        context = _previous_turns(utterances, utt)
        result = predict(tmp_path / "run", utt.text, context=context, speaker=utt.speaker)
        _assert_same_probabilities(result, expected[utt.key], utt.key)
    assert sum(1 for utt in utterances if _previous_turns(utterances, utt)) == 7
    # A model/ copied without its hf_text/ folder, or with a damaged one, is one error naming that folder.
    hf_dir = tmp_path / "run" / "model" / "hf_text"
    (hf_dir / "config.json").write_text("{")
    capsys.readouterr()
    _assert_one_error(capsys, ["--run", str(tmp_path / "run"), "hello"],
                      f"{hf_dir}: cannot load the transformers text encoder's config and tokenizer")
    shutil.rmtree(hf_dir)
    _assert_one_error(capsys, ["--run", str(tmp_path / "run"), "hello"], f"{hf_dir}: missing; classifier.json has")


def _previous_turns(utterances, utt) -> list[tuple[str, str]]:
    """(speaker, text) of the turns before ``utt`` in its dialogue, oldest first, as the CSV has them."""
    earlier = sorted((u for u in utterances if u.dialogue_id == utt.dialogue_id and u.utterance_id < utt.utterance_id),
                     key=lambda u: u.utterance_id)
    return [(u.speaker, u.text) for u in earlier]


def test_dialogue_context_is_read_as_the_run_read_it(text_root, tmp_path, capsys):
    run = tmp_path / "context"
    run_finetune(text_config(text_root, "train.epochs=1", "data.context_turns=2"), out_dir=run)
    expected = _run_predictions(run)
    utterances = _test_utterances(text_root)
    later = [utt for utt in utterances if utt.utterance_id > 0]
    assert len(later) == 7
    for utt in utterances:
        result = predict(run, utt.text, context=_previous_turns(utterances, utt), speaker=utt.speaker)
        _assert_same_probabilities(result, expected[utt.key], utt.key)
    # The context changes the input: without it a later turn is read as a first turn, and differs.
    utt = later[0]
    alone = predict(run, utt.text, speaker=utt.speaker)["probabilities"]
    assert alone != pytest.approx(expected[utt.key], abs=1e-4)
    # The run read every utterance after its speaker's name, so the name changes the input too.
    assert predict(run, utt.text, speaker="Gunther")["probabilities"] != pytest.approx(alone, abs=1e-4)
    # Older turns than the run's two are left out, as in training.
    turns = [("Chandler", "Could this BE any longer?"), *_previous_turns(utterances, utt)]
    padded = predict(run, utt.text, context=[("Joey", "How you doin'?"), *turns], speaker=utt.speaker)
    assert padded == predict(run, utt.text, context=turns[-2:], speaker=utt.speaker)
    # And the CLI takes the turns as "Speaker: text".
    argv = ["--run", str(run), utt.text, "--speaker", utt.speaker, "--json"]
    for speaker, text in _previous_turns(utterances, utt):
        argv += ["--context", f"{speaker}: {text}"]
    capsys.readouterr()  # the run's own printing
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["probabilities"] == pytest.approx(expected[utt.key], abs=1e-4)
    _assert_one_error(capsys, ["--run", str(run), "hi", "--context", "no speaker here", "--speaker", "Ross"],
                      "expected \"Speaker: what they said\"")
    _assert_one_error(capsys, ["--run", str(run), "hi", "--context", "Ross: hello"], "--speaker")
    for argv in (["hi"], ["hi", "--speaker", "  "]):
        _assert_one_error(capsys, ["--run", str(run), *argv], "read every utterance as \"Speaker: text\"")


def test_a_file_it_may_not_read_is_one_error_line(tmp_path, capsys, monkeypatch):
    # Root reads any file here, so the refusal is staged: what the OS says for a classifier.json
    # (or clip) without read permission reaches the user as one line.
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "model" / "classifier.json"))

    monkeypatch.setattr("meld.predict.predict", refused)
    assert main(["--run", str(tmp_path), "Hello there."]) == 2
    err = capsys.readouterr().err
    assert err == f"error: [Errno 13] Permission denied: '{tmp_path / 'model' / 'classifier.json'}'\n"
