import csv
import json
import math

import numpy as np
import pytest

from meld.labels import EMOTIONS
from meld.metrics import classification_metrics, mean_std
from meld.sweep_summary import _final_lines
from meld.report import (
    format_table,
    log_confusion_figure,
    log_embeddings,
    log_hparams,
    log_pr_curves,
    render_report_md,
    save_confusion_png,
    write_metrics_json,
    write_predictions_csv,
    write_report_md,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _split(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skewed gold labels without fear, a model that never predicts disgust, and its probabilities."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(6, size=n, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    logits = rng.normal(size=(n, 7))
    logits[np.arange(n), gold] += 1.5
    logits[:, 5] -= 100.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return gold, probs.argmax(axis=1), probs


@pytest.fixture
def metrics() -> dict:
    return {name: classification_metrics(*_split(seed)[:2], EMOTIONS) for seed, name in enumerate(("dev", "test"))}


def test_metrics_json_shape_and_round_trip(tmp_path, metrics):
    path = write_metrics_json(tmp_path / "metrics.json", {**metrics, "seeds": {"runs": np.int64(1)}})
    loaded = json.loads(path.read_text())
    assert list(loaded) == ["dev", "test", "seeds"]
    assert list(loaded["test"]) == ["macro_f1", "weighted_f1", "accuracy", "balanced_accuracy", "per_class",
                                    "confusion_matrix"]
    assert list(loaded["test"]["per_class"]) == list(EMOTIONS)
    assert list(loaded["test"]["per_class"]["joy"]) == ["precision", "recall", "f1", "support"]
    assert np.asarray(loaded["test"]["confusion_matrix"]).shape == (7, 7)
    assert loaded["dev"] == metrics["dev"] and loaded["test"] == metrics["test"]
    assert loaded["seeds"] == {"runs": 1}
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_metrics_json_refuses_incomplete_splits_and_nan(tmp_path, metrics):
    incomplete = {key: value for key, value in metrics["test"].items() if key != "per_class"}
    with pytest.raises(ValueError, match=r"metrics\['test'\] lacks per_class"):
        write_metrics_json(tmp_path / "metrics.json", {"test": incomplete})
    with pytest.raises(ValueError, match="no split"):
        write_metrics_json(tmp_path / "metrics.json", {"retrieval": {"a2t_R@1": 0.5}})
    with pytest.raises(ValueError):
        write_metrics_json(tmp_path / "metrics.json", {"test": {**metrics["test"], "macro_f1": math.nan}})
    assert not list(tmp_path.iterdir())


def test_predictions_csv_columns_and_rows(tmp_path):
    gold, pred, probs = _split(0, n=5)
    keys = [f"dia{i}_utt0" for i in range(5)]
    path = write_predictions_csv(tmp_path / "predictions.csv", keys, gold, pred, probs, EMOTIONS)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["key", "gold", "predicted", *(f"p_{name}" for name in EMOTIONS)]
    assert [row["key"] for row in rows] == keys
    assert [row["gold"] for row in rows] == [EMOTIONS[g] for g in gold]
    assert [row["predicted"] for row in rows] == [EMOTIONS[p] for p in pred]
    read_probs = np.array([[float(row[f"p_{name}"]) for name in EMOTIONS] for row in rows])
    assert read_probs == pytest.approx(probs, abs=1e-6)
    with pytest.raises(ValueError, match="do not match 7 classes"):
        write_predictions_csv(tmp_path / "bad.csv", keys, gold, pred, probs[:, :3], EMOTIONS)


def test_confusion_png_is_a_png(tmp_path, metrics):
    path = save_confusion_png(tmp_path / "confusion_test.png", metrics["test"]["confusion_matrix"], EMOTIONS, "test")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") > 300  # width in pixels


def test_report_md_headline_tables_and_references(tmp_path, metrics):
    seeds = mean_std([metrics, metrics])
    path = write_report_md(tmp_path / "report.md", "Text-only fine-tune", metrics, EMOTIONS,
                           confusion_png="confusion_test.png", seeds=seeds,
                           extra_sections={"Retrieval": "R@1 12.00"})
    text = path.read_text()
    test = metrics["test"]
    headline = f"**test macro-F1: {100 * test['macro_f1']:.2f} ± 0.00**"  # two identical runs: the mean is the run
    assert text.startswith("# Text-only fine-tune\n\n" + headline)
    assert text.index("macro-F1") < text.index("weighted-F1") < text.index("accuracy") < text.index("balanced accuracy")
    assert "| metric | dev | test | always neutral (test) | uniform chance (test) |" in text
    assert "How to read this" in text and "class (each emotion, or each sentiment) equally" in text
    joy = test["per_class"]["joy"]
    assert (f"| joy | {100 * joy['precision']:.2f} | {100 * joy['recall']:.2f} | {100 * joy['f1']:.2f} | "
            f"{joy['support']} |") in text
    assert "| fear | 0.00 | – | – | 0 |" in text  # absent from gold: recall and F1 undefined
    assert "Never predicted (F1 0): disgust." in text
    assert "excluded from macro-F1 and balanced accuracy): fear." in text
    assert "| gold \\ predicted | neutral | joy |" in text
    assert "| neutral | " + " | ".join(str(c) for c in test["confusion_matrix"][0]) + " |" in text
    assert "![confusion matrix, test](confusion_test.png)" in text
    assert "## Mean ± std over 2 seeds" in text
    dev_macro, test_macro = (f"{100 * metrics[split]['macro_f1']:.2f}" for split in ("dev", "test"))
    assert f"| macro-F1 | {dev_macro} ± 0.00 | {test_macro} ± 0.00 |" in text
    assert "| F1 fear | – | – |" in text  # absent from gold in both splits
    assert text.rstrip().endswith("## Retrieval\n\nR@1 12.00")


def _abc_runs() -> list[dict]:
    """Two seeds' documents on classes a, b, c; c is absent from dev's gold labels.

    dev:  run 1 perfect; run 2 gold [a a b b] pred [a b b b]: F1 a 2/3, b 4/5 -> macro 11/15.
    test: run 1 perfect; run 2 gold [a a b c] pred [a b b b]: F1 a 2/3, b 1/2, c 0 -> macro 7/18,
          weighted (2 * 2/3 + 1/2 + 0)/4 = 11/24, accuracy 1/2.
    """
    abc = ("a", "b", "c")
    dev = [classification_metrics([0, 0, 1, 1], pred, abc) for pred in ([0, 0, 1, 1], [0, 1, 1, 1])]
    test = [classification_metrics([0, 0, 1, 2], pred, abc) for pred in ([0, 0, 1, 2], [0, 1, 1, 1])]
    return [{"dev": d, "test": t} for d, t in zip(dev, test)]


def test_multi_seed_headline_is_the_mean_over_seeds_not_the_selected_run():
    runs = _abc_runs()
    # test macro-F1 over seeds: mean (1 + 7/18)/2 = 25/36 = 69.44%, sample std (11/18)/sqrt(2) = 43.21%
    # (the population std would be 30.56%); weighted-F1 (1 + 11/24)/2 = 72.92% ± (13/24)/sqrt(2) = 38.30%;
    # accuracy 75.00% ± 0.5/sqrt(2) = 35.36%. The selected run (the first) scores 100 on everything.
    text = render_report_md("three classes", runs[0], ("a", "b", "c"), seeds=mean_std(runs))
    assert text.startswith("# three classes\n\n**test macro-F1: 69.44 ± 43.21** · weighted-F1 72.92 ± 38.30 · "
                           "accuracy 75.00 ± 35.36 (mean ± sample std (ddof=1) over 2 seeds, percent)\n\n"
                           "The tables below are one of those runs, not the mean: test macro-F1 100.00 · ")
    assert "| macro-F1 | 86.67 ± 18.86 | 69.44 ± 43.21 |" in text  # dev: (1 + 11/15)/2, (4/15)/sqrt(2)


def test_one_seed_shows_no_standard_deviation():
    # The sample std of one run is undefined; mean_std stores 0, which must not be shown as "± 0.00".
    runs = _abc_runs()[1:]
    text = render_report_md("one seed", runs[0], ("a", "b", "c"), seeds=mean_std(runs))
    assert "**test macro-F1: 38.89** · weighted-F1 45.83 · accuracy 50.00 (one seed, so no standard deviation" in text
    assert "| macro-F1 | 73.33 | 38.89 |" in text and "±" not in text


def test_sweep_final_table_dashes_a_class_absent_from_a_split():
    # c is absent from dev's gold: its dev F1 is undefined and left out of dev macro-F1, so it must read
    # "–", not "0.00 ± 0.00". Its test F1 is 1 and 0: mean 50.00, sample std 1/sqrt(2) = 70.71.
    runs = _abc_runs()
    lines = _final_lines({"trial": 4, "seeds": [0, 1], "dir": "final/trial-0004", "mean_std": mean_std(runs)})
    assert "| F1 c | – | 50.00 ± 70.71 |" in lines
    assert "| macro-F1 | 86.67 ± 18.86 | 69.44 ± 43.21 |" in lines
    assert any("mean ± sample std (ddof=1) over 2 seeds" in line for line in lines)
    one = _final_lines({"trial": 4, "seeds": [1], "dir": "final/trial-0004", "mean_std": mean_std(runs[1:])})
    assert "| macro-F1 | 73.33 | 38.89 |" in one and any("one seed, so no standard deviation" in line for line in one)


def test_format_table_for_the_terminal(metrics):
    table = format_table(metrics, EMOTIONS)
    lines = table.splitlines()
    assert lines[0] == f"test macro-F1 {100 * metrics['test']['macro_f1']:.2f}"
    assert lines[2].split() == ["metric", "dev", "test", "always", "neutral", "(test)", "uniform", "chance", "(test)"]
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in EMOTIONS] == list(EMOTIONS)
    with pytest.raises(ValueError, match="no split 'val'; it has dev, test"):
        format_table(metrics, EMOTIONS, split="val")


def test_tensorboard_helpers_write_readable_events(tmp_path, metrics):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    gold, _, probs = _split(1)
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        log_confusion_figure(writer, "confusion/test", metrics["test"]["confusion_matrix"], EMOTIONS, step=3)
        log_pr_curves(writer, "pr/test", gold, probs, EMOTIONS, step=3)
        log_hparams(writer, {"optim": {"lr": 1e-3, "betas": [0.9, 0.98]}, "modality": "text", "frozen": True,
                             "seed": np.int64(7)}, metrics)
        log_embeddings(writer, np.random.default_rng(0).normal(size=(len(gold), 8)),
                       [EMOTIONS[g] for g in gold], tag="test_audio", step=3)

    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert tags["images"] == ["confusion/test"]
    image = events.Images("confusion/test")[0]
    assert image.step == 3 and image.encoded_image_string.startswith(PNG_SIGNATURE)
    # fear is absent from gold, so it has no curve
    assert sorted(events.PluginTagToContent("pr_curves")) == sorted(f"pr/test/{name}" for name in EMOTIONS[:6])
    hparams = events.PluginTagToContent("hparams")
    assert set(hparams) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["optim.betas"].string_value == "[0.9, 0.98]"
    assert start.hparams["frozen"].string_value == "True"
    assert start.hparams["seed"].number_value == 7
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "hparams/test/macro_f1" in {info.name.tag for info in experiment.metric_infos}
    assert events.Scalars("hparams/test/macro_f1")[0].value == pytest.approx(metrics["test"]["macro_f1"])
    assert not any("confusion_matrix" in tag for tag in tags["scalars"])
    projector = (tmp_path / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "test_audio:00003"' in projector
    metadata = next(tmp_path.glob("00003/test_audio/metadata.tsv")).read_text().splitlines()
    assert metadata == [EMOTIONS[g] for g in gold]
