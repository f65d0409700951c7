"""python -m meld.predict: one text or one audio file through a finished run, and one clear error per mistake."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from meld.finetune import load_config, run_finetune
from meld.predict import main, predict
from tests.meld.finetune_helpers import FAST, small_demo, text_config, write_csv_meld


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    root = write_csv_meld(tmp_path_factory.mktemp("csv") / "meld")
    out = tmp_path_factory.mktemp("run") / "text"
    run_finetune(text_config(root, "train.epochs=1"), out_dir=out)
    return out


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory) -> Path:
    root, cache = small_demo()
    out = tmp_path_factory.mktemp("run") / "audio"
    config = load_config(None, [*FAST, f"data_root={root}", f"cache_root={cache}", "data.modality=audio",
                                "train.epochs=1"])
    run_finetune(config, out_dir=out)
    return out


def _wav(path: Path, seconds: float = 1.0, rate: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    return path


def test_text_prediction_prints_label_and_probabilities(text_run, capsys):
    assert main(["--run", str(text_run), "Yay, this is great!"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("emotion: ") and len(lines) == 8
    probabilities = [float(line.split()[-1]) for line in lines[1:]]
    assert sum(probabilities) == pytest.approx(1.0, abs=0.01) and probabilities == sorted(probabilities, reverse=True)


def test_prediction_matches_the_run_model(text_run):
    result = predict(text_run, "I am so sad and alone.")
    assert result["label"] == next(iter(result["probabilities"]))
    assert set(result["probabilities"]) == {"neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"}


def test_audio_file_prediction(audio_run, tmp_path, capsys):
    clip = _wav(tmp_path / "clip.wav")
    assert main(["--run", str(audio_run), str(clip), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "emotion" and sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    root, _ = small_demo()
    mp4 = next((root / "train" / "train_splits").glob("dia1_utt*.mp4"))
    assert main(["--run", str(audio_run), str(mp4)]) == 0


def _assert_one_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


def test_bad_items_give_one_clear_error(text_run, audio_run, tmp_path, capsys):
    _assert_one_error(capsys, ["--run", str(tmp_path), "hello"], "not a fine-tune run directory")
    _assert_one_error(capsys, ["--run", str(audio_run), "hello there"], "give an mp4 or wav file")
    _assert_one_error(capsys, ["--run", str(audio_run), str(tmp_path / "missing.wav")], "file not found")
    _assert_one_error(capsys, ["--run", str(text_run), str(_wav(tmp_path / "a.wav"))], "classifies text")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    _assert_one_error(capsys, ["--run", str(audio_run), str(broken)], "broken.mp4")


def test_a_local_transformers_text_encoder_beside_clara_trains_and_predicts(tmp_path, capsys):
    from tests.meld.test_classifier import tiny_bert

    bert = tiny_bert(tmp_path / "bert")
    root = write_csv_meld(tmp_path / "meld")
    config = text_config(root, f"model.hf_text={bert}", "model.hf_text_mode=beside", "model.fusion=attention",
                         "data.context_turns=1", "train.epochs=1")
    run_finetune(config, out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "model" / "hf_text" / "tokenizer_config.json").is_file()
    result = predict(tmp_path / "run", "i am so happy")
    assert len(result["probabilities"]) == 7
