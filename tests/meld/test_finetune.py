"""python -m meld.finetune: the run directory, model selection, callbacks, resume, linear-probe cache, seeds, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clara import config as config_lib
from clara.run_dir import OutDirError
from meld.classifier_io import load_classifier
from clara.model_config import load_model_config
from meld.finetune import _Data, load_config, main, run_finetune
from meld.finetune_config import FinetuneConfig
from meld.layout import find_layout
from meld.records import load_splits
from meld.report import SPLIT_KEYS, coverage_lines
from tests.conftest import REPO_ROOT
from tests.meld.finetune_helpers import FAST, small_demo, text_config, write_csv_meld


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory) -> Path:
    return write_csv_meld(tmp_path_factory.mktemp("csv") / "meld")


@pytest.fixture(scope="module")
def text_run(csv_root, tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("run") / "text"
    doc = run_finetune(text_config(csv_root), out_dir=out, epoch_callback=lambda epoch, m: calls.append((epoch, m)))
    return out, doc, calls


def test_run_directory_holds_every_output(text_run):
    out, doc, _ = text_run
    for name in ("config.yaml", "metrics.json", "report.md", "confusion_test.png", "predictions.csv", "checkpoint.pt",
                 "model/model.safetensors", "model/classifier.json", "tensorboard"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(doc))
    for split in ("dev", "test"):
        assert all(key in metrics[split] for key in SPLIT_KEYS)
        assert len(metrics[split]["confusion_matrix"]) == 7
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("key,gold,predicted,p_neutral") and len(rows) == 1 + 14
    resolved = config_lib.from_dict(FinetuneConfig, yaml.safe_load((out / "config.yaml").read_text()))
    assert resolved.data.modality == "text" and resolved.train.epochs == 2
    assert "macro-F1" in (out / "report.md").read_text()


def test_selection_is_the_best_dev_epoch_and_callbacks_see_each_epoch(text_run):
    out, doc, calls = text_run
    assert [epoch for epoch, _ in calls] == [1, 2]
    best_epoch, best = max(calls, key=lambda call: (call[1]["macro_f1"], -call[0]))
    assert doc["selection"]["epoch"] == best_epoch
    assert doc["dev"]["macro_f1"] == pytest.approx(best["macro_f1"])  # re-scored from the saved weights
    classifier, spec, _ = load_classifier(out)
    assert spec["target"] == "emotion" and spec["inputs"] == ["text"]


def test_a_callback_exception_propagates_with_a_consistent_run_dir(csv_root, tmp_path):
    class Prune(Exception):
        pass

    def prune(epoch, metrics):
        raise Prune(f"pruned at epoch {epoch}")

    with pytest.raises(Prune):
        run_finetune(text_config(csv_root), out_dir=tmp_path, epoch_callback=prune)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "stopped" and "pruned at epoch 1" in status["error"]
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "config.yaml").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_interrupted_run_resumes_to_the_same_result(csv_root, tmp_path):
    config = text_config(csv_root, "train.epochs=3")
    straight = run_finetune(config, out_dir=tmp_path / "straight")

    def interrupt(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, out_dir=tmp_path / "resumed", epoch_callback=interrupt)
    assert json.loads((tmp_path / "resumed" / "status.json").read_text())["status"] == "interrupted"
    resumed = run_finetune(config, out_dir=tmp_path / "resumed")
    for split in ("dev", "test"):
        assert resumed[split] == straight[split]
    assert resumed["selection"]["epoch"] == straight["selection"]["epoch"]


def test_linear_probe_encodes_once_and_reuses_the_cache(csv_root, tmp_path, capsys):
    config = text_config(csv_root, "strategy.name=linear_probe", f"cache_root={tmp_path / 'cache'}", "train.epochs=3")
    first = run_finetune(config, out_dir=tmp_path / "a")
    assert "embeddings computed" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 1
    second = run_finetune(config, out_dir=tmp_path / "b")
    assert "embeddings read from" in capsys.readouterr().out
    assert first["test"] == second["test"]
    # Other data settings, another cache entry.
    run_finetune(config_lib.replace(config, ["data.context_turns=1"]), out_dir=tmp_path / "c")
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 2


def _in_training_mode_but_frozen_parts(model: torch.nn.Module) -> bool:
    """Whether every module is in training mode except those inside a part that trains none of its
    parameters (an unused tower, a partial fine-tune's frozen layers), which run as in evaluation."""
    frozen = [name for name, module in model.named_modules()
              if list(module.parameters()) and not any(p.requires_grad for p in module.parameters())]
    return all(module.training != any(name == part or name.startswith(f"{part}.") for part in frozen)
               for name, module in model.named_modules())


@pytest.mark.parametrize("strategy", ["linear_probe", "checkpoint", "partial"])
def test_every_training_step_runs_in_training_mode(csv_root, tmp_path, monkeypatch, strategy):
    # A loaded CLARA checkpoint comes in eval mode, and the linear probe encodes in eval mode; the engine
    # switches to train only after an evaluation, so the whole first epoch trained with dropout off. The parts
    # that train nothing stay in evaluation mode (MeldClassifier.train).
    from clara.checkpoint import save_checkpoint
    from clara.model import Clara
    from meld import finetune_task

    modes = []  # per training step: whether the trained model's modules are in training mode, frozen parts aside
    original = finetune_task.ClassificationTask.training_step

    def spy(self, model, batch):
        modes.append(_in_training_mode_but_frozen_parts(model))
        return original(self, model, batch)

    monkeypatch.setattr(finetune_task.ClassificationTask, "training_step", spy)
    if strategy == "linear_probe":
        extra = ["strategy.name=linear_probe", f"cache_root={tmp_path / 'cache'}"]
    else:
        save_checkpoint(Clara(load_model_config("tiny")), tmp_path / "clara")
        extra = [f"model.checkpoint={tmp_path / 'clara'}"]
        if strategy == "partial":
            extra += ["strategy.name=partial", "strategy.unfreeze_layers=1"]
    run_finetune(text_config(csv_root, *extra), out_dir=tmp_path / "run")
    assert len(modes) == 10 and all(modes)  # 2 epochs of 42 // 8 = 5 steps


def test_seeds_report_mean_and_std(csv_root, tmp_path):
    doc = run_finetune(text_config(csv_root, "seeds=2", "train.epochs=1", "target=sentiment"), out_dir=tmp_path)
    assert set(doc["seeds"]) == {"1234", "1235"} and doc["mean_std"]["runs"] == 2
    assert set(doc["mean_std"]["test"]["macro_f1"]) == {"mean", "std"}
    assert (tmp_path / "seed-1234" / "metrics.json").is_file() and (tmp_path / "model" / "classifier.json").is_file()
    assert len(doc["test"]["confusion_matrix"]) == 3
    assert "Mean ± std over 2 seeds" in (tmp_path / "report.md").read_text()
    # The best seed's classifier and predictions are copied up whole, with no staging copies left.
    best = max(doc["seeds"], key=lambda s: (doc["seeds"][s]["dev"], -int(s)))
    for name in ("predictions.csv", "model/classifier.json"):
        assert (tmp_path / name).read_bytes() == (tmp_path / f"seed-{best}" / name).read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # The top folder has a status.json of its own, as a one-seed run's folder has (it had none).
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "complete", "seeds": [1234, 1235]}


def test_a_stop_in_a_later_seed_is_recorded_in_the_top_folder(csv_root, tmp_path):
    def stop_in_the_second_seed(epoch, metrics):
        if (tmp_path / "seed-1234" / "metrics.json").is_file():
            raise KeyboardInterrupt

    config = text_config(csv_root, "seeds=2", "train.epochs=1", "target=sentiment")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, out_dir=tmp_path, epoch_callback=stop_in_the_second_seed)
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "status": "interrupted", "seed": 1235, "seeds": [1234, 1235], "done": [1234], "error": "KeyboardInterrupt: "}
    assert json.loads((tmp_path / "seed-1235" / "status.json").read_text())["status"] == "interrupted"


def test_audio_and_text_with_gated_fusion_partial_unfreezing_and_balanced_sampling(tmp_path):
    root, cache = small_demo()
    config = load_config(None, [*FAST, f"data_root={root}", f"cache_root={cache}", "model.fusion=gated",
                                "strategy.name=partial", "strategy.layer_decay=0.7", "loss.sampler=balanced",
                                "loss.name=focal", "train.epochs=1", "data.frames_multiple=64", "data.tokens_multiple=8"])
    doc = run_finetune(config, out_dir=tmp_path)
    assert 0.0 <= doc["test"]["macro_f1"] <= 1.0
    _, spec, _ = load_classifier(tmp_path)
    assert spec["inputs"] == ["audio", "text"] and spec["head"]["options"]["fusion"] == "gated"
    # The demo's unimodal losses: a gated head gets a linear head per input, saved and reloaded with it.
    assert spec["head"]["options"]["unimodal_heads"] is True
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_audio" in record and "train/loss_text" in record for record in logged)
    # The demo plants clips that do not decode: metrics.json and report.md say how many CSV rows each
    # split used, and name the ones left out, so a score over fewer rows is not taken for the official one.
    csv_rows = load_splits(find_layout(root, need_clips=False))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == doc["rows"] and sum(len(c["left_out"]) for c in doc["rows"].values()) >= 1
    for split, coverage in doc["rows"].items():
        keys = [utt.key for utt in csv_rows[split]]
        assert coverage["csv_rows"] == len(keys) and coverage["used"] + len(coverage["left_out"]) == len(keys)
        assert set(coverage["left_out"]) <= set(keys) and all(coverage["left_out"].values())
    with open(tmp_path / "predictions.csv", newline="") as handle:
        scored = {row["key"] for row in csv.DictReader(handle)}
    assert scored == {utt.key for utt in csv_rows["test"]} - set(doc["rows"]["test"]["left_out"])
    assert "## CSV rows used\n\n" + coverage_lines(doc["rows"]) in (tmp_path / "report.md").read_text()


def test_the_data_multiples_reach_the_batches(csv_root):
    data = _Data(text_config(csv_root, "data.tokens_multiple=8"), load_model_config("tiny"))
    items = [data.views["train"][i] for i in range(5)]
    batch = data.collate(items)
    assert batch["tokens"].shape[1] % 8 == 0 and batch["tokens"].shape[1] - int(batch["token_lengths"].max()) < 8
    assert batch["token_lengths"].tolist() == [len(item["tokens"]) for item in items]


@pytest.mark.parametrize("extra, bucketed", [((), True), (("data.bucket_by_length=false",), False),
                                             (("strategy.name=linear_probe",), False)])
def test_training_batches_are_length_bucketed_as_data_says(csv_root, tmp_path, monkeypatch, extra, bucketed):
    """data.bucket_by_length hands the train split's lengths to the engine's sampler; a linear probe
    trains on cached embeddings, which have no length."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, lengths=None, **kwargs):
        seen["lengths"] = lengths
        raise Stop

    monkeypatch.setattr("meld.finetune.Trainer", fake_trainer)
    config = text_config(csv_root, *extra)
    with pytest.raises(Stop):
        run_finetune(config, out_dir=tmp_path / "run")
    if bucketed:
        train = _Data(config, load_model_config("tiny")).datasets["train"]
        assert seen["lengths"] == train.lengths and len(set(train.lengths)) > 1
    else:
        assert seen["lengths"] is None


def test_config_presets_load():
    for name in ("demo", "linear_probe", "full", "text_only"):
        assert isinstance(load_config(name, []), FinetuneConfig)
    assert load_config("linear_probe", ["strategy.name=full"]).strategy.name == "full"
    with pytest.raises(config_lib.ConfigError) as caught:
        load_config("linear_prob", [])
    assert str(caught.value) == "linear_prob: no such config file, nor a preset (demo, full, linear_probe, text_only)"


@pytest.mark.parametrize("prompt, problem", [
    ("a {tone} voice, {label}", "must contain {label} and no other field in braces, got 'a {tone} voice, {label}'"),
    ("a {{label}} voice", "must contain {label} and no other field in braces, got 'a {{label}} voice'"),
    ("{label}: {label!z}", "'{label}: {label!z}' is not a valid format string (Unknown conversion specifier z)"),
])  # fmt: skip
def test_a_prompt_that_str_format_cannot_fill_per_class_is_a_config_error(prompt, problem):
    """zero_shot_init fills model.prompt with str.format once the data and model are loaded: another field or
    conversion was a KeyError or ValueError traceback there, and a doubled brace pair gave every class the
    same prompt."""
    assert load_config("demo", ["model.prompt=a {label} and {label:>5}"]).model.prompt == "a {label} and {label:>5}"
    with pytest.raises(config_lib.ConfigError) as caught:
        load_config("demo", [f"model.prompt={json.dumps(prompt)}"])
    assert str(caught.value).endswith(f"demo.yaml + overrides: model.prompt{'' if problem.startswith('must') else ':'} "
                                      f"{problem}")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_csv_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, "--data", str(tmp_path / "empty"), "--modality", "text", "--out", str(tmp_path / "o"), *FAST)
    _assert_one_error(code, err, "sent_emo.csv")
    assert not (tmp_path / "o").exists()  # the data is checked before the run folder is made


def test_unknown_label_is_one_clear_error(tmp_path, capsys):
    root = write_csv_meld(tmp_path / "meld", bad_label="happy")
    code, err = _cli(capsys, "--data", str(root), "--modality", "text", "--out", str(tmp_path / "o"), *FAST)
    _assert_one_error(code, err, "happy")


def test_wrong_kind_of_checkpoint_is_one_clear_error(csv_root, tmp_path, capsys):
    text_file = tmp_path / "notes.ckpt"
    text_file.write_text("not a checkpoint")
    code, err = _cli(capsys, "--data", str(csv_root), "--modality", "text", "--checkpoint", str(text_file),
                     "--out", str(tmp_path / "o"), *FAST)
    _assert_one_error(code, err, "notes.ckpt")
    assert not (tmp_path / "o").exists()  # the checkpoint is checked before the run folder is made
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "classifier.json").write_text("{}")
    code, err = _cli(capsys, "--data", str(csv_root), "--modality", "text", "--checkpoint", str(tmp_path / "run"),
                     "--out", str(tmp_path / "o"), *FAST)
    _assert_one_error(code, err, "fine-tuned MELD classifier")


@pytest.mark.parametrize("override, fragment", [("train.epochs=many", "train.epochs"), ("modell.fusion=gated", "modell"),
                                                ("model.fusion=sum", "model.fusion"), ("seeds=0", "seeds"),
                                                ("data.frames_multiple=0", "frames_multiple"),
                                                ("data.tokens_multiple=3", "data.tokens_multiple (3)"),
                                                # the key as this command's config spells it, not prepare's audio.*
                                                ("data.audio.n_mels=64", "error: data.audio.n_mels is 64, but the CLARA "
                                                 "model reads 80-bin log-mels: prepare (and read) the features with "
                                                 "data.audio.n_mels=80"),
                                                ("data.audio.n_mels=128", "overrides: data.audio.n_mels 128 is too many "
                                                 "for 0-8000 Hz at data.audio.n_fft 1024")])
def test_bad_override_is_one_clear_error(tmp_path, capsys, override, fragment):
    code, err = _cli(capsys, "--out", str(tmp_path / "o"), override)
    _assert_one_error(code, err, fragment)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_a_device_the_machine_lacks_is_one_clear_error(tmp_path, capsys):
    code, err = _cli(capsys, "--out", str(tmp_path / "o"), "train.device=mps")
    _assert_one_error(code, err, "train.device: 'mps' is not available on this machine")
    assert not (tmp_path / "o").exists()  # checked before the run folder is made


def test_audio_on_csv_only_data_is_one_clear_error(csv_root, tmp_path, capsys):
    code, err = _cli(capsys, "--data", str(csv_root), "--modality", "audio", "--out", str(tmp_path / "o"), *FAST)
    _assert_one_error(code, err, "modality text")


@pytest.mark.slow
def test_demo_runs_end_to_end_with_no_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "test macro-F1" in out
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "metrics.json").read_text())["test"]["macro_f1"] > 0.4  # 0.582 measured (seed 1234)


@pytest.mark.slow
def test_demo_audio_plus_text_is_at_least_as_good_as_either_alone(tmp_path):
    """The README's demo table: 3 seeds per modality with the shipped defaults (about 4 minutes on 2 cores)."""
    quiet = ["train.progress=false", "tensorboard_extras=false", "train.log_every=1000", "seeds=3"]
    means = {}
    for modality in ("audio", "text", "both"):
        doc = run_finetune(load_config(None, [*quiet, f"data.modality={modality}"]), out_dir=tmp_path / modality)
        means[modality] = {split: doc["mean_std"][split]["macro_f1"]["mean"] for split in ("dev", "test")}
    # The README's figures: test 0.5144 / 0.4454 / 0.5397, dev 0.5357 / 0.4881 / 0.5869 (audio / text / both).
    assert means["both"]["test"] == pytest.approx(0.5397, abs=0.05)  # other CPUs round differently over 1700 steps
    for split in ("dev", "test"):
        assert means["both"][split] >= max(means["audio"][split], means["text"][split])


# -- the run folder: resume only the same run, never write over other files --------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _text_cli(root: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--data", str(root), "--modality", "text", "--out", str(out), *FAST, *extra]


def test_a_run_folder_with_other_settings_is_refused_untouched(text_run, csv_root, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(text_run[0], copy)
    before = _snapshot(copy)
    other = write_csv_meld(tmp_path / "other", {"train": 4, "dev": 2, "test": 2})
    for extra in (["train.lr=0.5"], ["model.hidden_dim=16"], ["target=sentiment"], ["seeds=2"]):
        code, err = _cli(capsys, *_text_cli(other, copy, *extra))
        _assert_one_error(code, err, f"{copy} holds a run with other settings (data_root, {extra[0].split('=')[0]})",
                          "use a new --out")
    assert _snapshot(copy) == before


def test_a_run_folder_resumes_with_other_logging_and_continues_to_more_epochs(text_run, csv_root, tmp_path, capsys):
    out, doc, _ = text_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # Progress, logging, threads, workers and a memory switch change nothing the run computes: the finished
    # run is re-scored as it was.
    # The data folder spelt another way is the same folder.
    code, _ = _cli(capsys, *_text_cli(f"{csv_root}/./", copy, "train.progress=true", "train.log_every=1", "threads=2",
                                      "data.num_workers=2", "model.clara_overrides=[selective_recompute=true]"))
    assert code == 0
    metrics = json.loads((copy / "metrics.json").read_text())
    assert {split: metrics[split] for split in ("dev", "test")} == json.loads(json.dumps({s: doc[s] for s in ("dev", "test")}))
    steps = torch.load(copy / "checkpoint.pt", weights_only=True)["step"]
    code, _ = _cli(capsys, *_text_cli(csv_root, copy, "train.epochs=3"))
    assert code == 0 and torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == steps * 3 // 2
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("start_over", ["train.resume=false", "checkpoint.pt deleted"])
def test_a_run_started_over_in_its_folder_selects_among_its_own_epochs(text_run, csv_root, tmp_path, start_over):
    """Training afresh in a run's folder (train.resume=false, or checkpoint.pt deleted as the engine advises) kept
    the old run's best.json: the new run, beating it at no epoch, reported the old epoch 2 and its weights."""
    out, old, _ = text_run
    assert old["selection"]["epoch"] == 2  # a 1-epoch run has no epoch 2
    fresh = run_finetune(text_config(csv_root, "train.epochs=1"), out_dir=tmp_path / "fresh")
    assert fresh["selection"]["macro_f1"] < old["selection"]["macro_f1"]  # 0.044 < 0.433: the old best would stay
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    extra = ["train.epochs=1"]
    if start_over == "train.resume=false":
        extra.append(start_over)
    else:
        (copy / "checkpoint.pt").unlink()
    again = run_finetune(text_config(csv_root, *extra), out_dir=copy)
    assert again["selection"]["epoch"] == 1 and again["test"] == fresh["test"] and again["dev"] == fresh["dev"]
    assert json.loads((copy / "best.json").read_text())["step"] == 5
    assert (copy / "predictions.csv").read_text() == (tmp_path / "fresh" / "predictions.csv").read_text()


@pytest.mark.parametrize("shorter, steps, advice", [("train.epochs=1", 5, "give train.epochs=2 or more"),
                                                    ("train.steps=7", 7, "give train.steps=10 or more")])
def test_a_run_folder_given_fewer_steps_than_it_trained_is_refused_untouched(text_run, csv_root, tmp_path, capsys,
                                                                           shorter, steps, advice):  # fmt: skip
    """train.epochs may grow on resume; given fewer, the rerun trained nothing, reported the 2-epoch run's
    selection and rewrote config.yaml to the shorter run."""
    copy = tmp_path / "copy"
    shutil.copytree(text_run[0], copy)
    before = _snapshot(copy)
    code, err = _cli(capsys, *_text_cli(csv_root, copy, shorter))
    _assert_one_error(code, err, f"{copy / 'checkpoint.pt'} holds 10 training steps, more than this run's {steps} "
                      f"(5 per epoch): {advice} to continue it, train.resume=false")
    assert _snapshot(copy) == before
    # Started over, the shorter run is this folder's.
    code, _ = _cli(capsys, *_text_cli(csv_root, copy, shorter, "train.resume=false"))
    assert code == 0 and torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == steps


def test_a_folder_that_is_not_a_finetune_run_is_refused_untouched(csv_root, tmp_path, capsys):
    user = tmp_path / "userdir"
    (user / "model").mkdir(parents=True)
    (user / "model" / "notes.txt").write_text("mine")
    (user / "report.md").write_text("my report")
    zeroshot = tmp_path / "zeroshot"
    zeroshot.mkdir()
    (zeroshot / "metrics.json").write_text('{"zeroshot": {}}')
    for folder in (user, zeroshot):
        before = _snapshot(folder)
        code, err = _cli(capsys, *_text_cli(csv_root, folder))
        _assert_one_error(code, err, f"{folder} exists and is not a meld.finetune run; give an empty or new folder")
        assert _snapshot(folder) == before
    # Another command's run is refused through the API too (a sweep calls run_finetune directly).
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    (pretrain / "config.yaml").write_text("model: tiny\ndata:\n  train: demo\n")
    with pytest.raises(OutDirError, match="is not a meld.finetune run"):
        run_finetune(text_config(csv_root), out_dir=pretrain)
    assert (pretrain / "config.yaml").read_text() == "model: tiny\ndata:\n  train: demo\n"


@pytest.mark.parametrize("settings, fragment", [
    (["train.batch_size=43"], "train: 42 training samples make no full step of batch_size 43 x accumulation 1"),
    (["train.batch_size=8", "train.accumulation=6"], "42 training samples make no full step of batch_size 8 x "
                                                     "accumulation 6 x 1 process(es)"),
    (["train.cycle_steps=5", "train.warmup_steps=5"], "train: warmup_steps (5) must be below cycle_steps (5)"),
])
def test_training_settings_the_engine_refuses_leave_no_run_folder(csv_root, tmp_path, capsys, settings, fragment):
    # A config.yaml left behind would make the folder refuse the corrected settings as another run's.
    out = tmp_path / "run"
    code, err = _cli(capsys, *_text_cli(csv_root, out, *settings))
    _assert_one_error(code, err, fragment)
    assert not out.exists()


def test_an_output_path_that_is_a_file_is_one_clear_error(csv_root, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv in (_text_cli(csv_root, afile), _text_cli(csv_root, afile / "sub"),
                 ["--data", str(csv_root), "--modality", "audio", "--cache", str(afile), "--out", str(tmp_path / "o"), *FAST]):
        code, err = _cli(capsys, *argv)
        _assert_one_error(code, err, f"{afile}: exists and is not a folder")
    assert not (tmp_path / "o").exists()


def test_a_run_folder_another_command_runs_in_is_one_clear_error_and_left_untouched(text_run, csv_root, tmp_path,
                                                                                   capsys):  # fmt: skip
    from clara.run_dir import exclusive_run

    copy = tmp_path / "copy"
    shutil.copytree(text_run[0], copy)
    before = _snapshot(copy)
    with exclusive_run(copy):  # as the first command holds it while it runs
        code, err = _cli(capsys, *_text_cli(csv_root, copy))
    _assert_one_error(code, err, f"{copy}: another command is running in this folder")
    assert _snapshot(copy) == before


def test_an_output_folder_the_os_refuses_is_one_clear_error(csv_root, tmp_path, capsys, monkeypatch):
    # Root may write anywhere, so the refusal (no permission, a read-only disk) is staged on mkdir.
    refused = tmp_path / "readonly" / "run"

    def mkdir(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = _cli(capsys, *_text_cli(csv_root, refused))
    _assert_one_error(code, err, f"Permission denied: '{refused}'")


# ---- model.clara_overrides: the speed and memory switches, from scratch and on a checkpoint

SWITCHES = "model.clara_overrides=[attention=eager, selective_recompute=true, mask_padding=false]"


def _clara_settings(run_dir: Path) -> tuple:
    classifier, _, _ = load_classifier(run_dir)
    config = classifier.clara.config
    return config.attention, config.selective_recompute, config.mask_padding


def test_clara_overrides_reach_a_from_scratch_and_a_checkpoint_model(csv_root, tmp_path, monkeypatch):
    from clara.checkpoint import save_checkpoint
    from clara.model import Clara
    from meld import finetune

    built = []  # the CLARA each seed trains (a copy of the loaded one, or built from scratch)
    original = finetune.build_classifier
    monkeypatch.setattr(finetune, "build_classifier",
                        lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    run_finetune(text_config(csv_root, "train.epochs=1", SWITCHES), out_dir=tmp_path / "scratch")
    save_checkpoint(Clara(load_model_config("tiny")), tmp_path / "clara")
    run_finetune(text_config(csv_root, "train.epochs=1", f"model.checkpoint={tmp_path / 'clara'}", SWITCHES),
                 out_dir=tmp_path / "checkpoint")
    for (classifier, _), run_dir in zip(built, ("scratch", "checkpoint")):
        config = classifier.clara.config
        assert (config.attention, config.selective_recompute, config.mask_padding) == ("eager", True, False)
        assert _clara_settings(tmp_path / run_dir) == ("eager", True, False)  # and the saved classifier's
    assert len(built) == 2


def test_a_transcript_edited_in_place_is_encoded_again(tmp_path, capsys):
    # Same utterance keys, other words: the cached text embeddings would be the old transcript's.
    root = write_csv_meld(tmp_path / "meld")
    config = text_config(root, "strategy.name=linear_probe", f"cache_root={tmp_path / 'cache'}", "train.epochs=1")
    run_finetune(config, out_dir=tmp_path / "a")
    with open(root / "train_sent_emo.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    rows[1][1] = "Something else entirely"  # the first utterance's text
    with open(root / "train_sent_emo.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    run_finetune(config, out_dir=tmp_path / "b")
    assert capsys.readouterr().out.count("embeddings computed") == 2
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 2


def test_clara_overrides_join_the_linear_probe_cache_key(csv_root, tmp_path, capsys):
    # mask_padding changes the embeddings, not the weights the key hashes: reusing them would be wrong.
    config = text_config(csv_root, "strategy.name=linear_probe", f"cache_root={tmp_path / 'cache'}", "train.epochs=1")
    run_finetune(config, out_dir=tmp_path / "a")
    run_finetune(config_lib.replace(config, ["model.clara_overrides=[mask_padding=false]"]), out_dir=tmp_path / "b")
    assert capsys.readouterr().out.count("embeddings computed") == 2
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 2


def test_bad_clara_overrides_are_one_clear_error(csv_root, tmp_path, capsys):
    from clara.checkpoint import save_checkpoint
    from clara.model import Clara

    save_checkpoint(Clara(load_model_config("tiny")), tmp_path / "clara")
    base = ("--data", str(csv_root), "--modality", "text", "--out", str(tmp_path / "o"), *FAST)
    code, err = _cli(capsys, "--checkpoint", str(tmp_path / "clara"), *base, "model.clara_overrides=[text.layers=1]")
    _assert_one_error(code, err, "does not fit the model", "model.clara_overrides ['text.layers=1']")
    code, err = _cli(capsys, *base, "model.clara_overrides=[attention=fast]")
    _assert_one_error(code, err, "model.clara_overrides: ", "attention: 'fast' is not one of")
    code, err = _cli(capsys, *base, "model.clara_overrides=[attention]")
    _assert_one_error(code, err, "model.clara_overrides: override 'attention': expected key=value")
    assert not (tmp_path / "o").exists()


def test_torchrun_with_two_processes_matches_one_process_and_writes_once(csv_root, tmp_path, capsys):
    """2 gloo processes of 8 utterances per step match one process of 16 (the default class-weighted
    CE, on sentiment's unequal classes, without dropout: a sum over the batch size, so the global
    batch's mean is the mean of the processes' means), and the main process alone prints
    and writes the run, into its own --out even where the other's differs (a default --out is a
    timestamp that each process reads)."""
    settings = ["--data", str(csv_root), "--modality", "text", *FAST, "train.log_every=1", "loss.name=weighted_ce", "target=sentiment",
                "model.dropout=0.0", "model.clara_overrides=[text.dropout=0.0]"]
    single = tmp_path / "single"
    assert main([*settings, "train.batch_size=16", "--out", str(single)]) == 0
    capsys.readouterr()
    launch = tmp_path / "launch.py"
    launch.write_text("import os, sys\nfrom meld.finetune import main\n"
                      f"out = os.path.join({str(tmp_path)!r}, 'double-' + os.environ['RANK'])\n"
                      "sys.exit(main([*sys.argv[1:], '--out', out]))\n")
    # PYTHONFAULTHANDLER: a process aborted here after finishing ("terminate called without an active
    # exception"), once in CI and in 3 of 12 runs beside other test jobs on 2 cores: its process group, kept
    # alive by a reference cycle, was freed at interpreter exit (clara.distributed.shutdown now frees it).
    # Should an abort recur, each process's Python stack is in the message.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MELD_CLARA_CACHE": str(tmp_path / "cache"),
           "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launch),
               *settings, "train.batch_size=8"]
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-12000:]
    double = tmp_path / "double-0"
    assert not (tmp_path / "double-1").exists()
    assert finished.stdout.count("seed 1234:") == 1 and finished.stdout.count("run directory:") == 1

    def records(out_dir, key):
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        return [record[key] for record in map(json.loads, lines) if key in record]

    assert len(records(double, "train/loss")) == len(records(single, "train/loss")) == 4
    assert records(double, "train/loss") == pytest.approx(records(single, "train/loss"), abs=1e-5)
    assert records(double, "eval/loss") == pytest.approx(records(single, "eval/loss"), abs=1e-5)
    one, two = (json.loads((out / "metrics.json").read_text()) for out in (single, double))
    assert two["test"]["macro_f1"] == pytest.approx(one["test"]["macro_f1"])
    assert two["selection"]["epoch"] == one["selection"]["epoch"]
    assert json.loads((double / "status.json").read_text())["status"] == "complete"
    assert not list(double.glob(".*.tmp"))
    # A mistake in the settings meets both processes: it is said once.
    refused = subprocess.run([*command, "train.epochs=many"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=240)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1 and "train.epochs" in errors[0], refused.stderr[-2000:]



# ---- a finished run given again, status.json, the default --out, the transformers tokenizer in the cache key


def test_a_finished_run_given_again_returns_the_same_document(text_run, csv_root, tmp_path):
    """Training nothing, the rerun rewrote metrics.json with the ~0 s it took as the run's training time."""
    copy = tmp_path / "copy"
    shutil.copytree(text_run[0], copy)
    saved = json.loads((copy / "metrics.json").read_text())
    saved["selection"]["train_seconds"] = 12.3  # what the first command measured, whatever this machine takes
    (copy / "metrics.json").write_text(json.dumps(saved))
    again = run_finetune(text_config(csv_root), out_dir=copy)
    assert json.loads(json.dumps(again)) == saved == json.loads((copy / "metrics.json").read_text())


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "interrupted"), (OSError, "stopped")])
def test_a_stop_while_the_outputs_are_written_is_recorded_and_the_rerun_completes(csv_root, tmp_path, monkeypatch,
                                                                                    error, status):  # fmt: skip
    """status.json said "running" for good after a Ctrl-C (or a full disk) once training had finished."""
    from meld import finetune

    original = finetune.write_run_outputs

    def fail(*args, **kwargs):
        raise error("while drawing")

    monkeypatch.setattr(finetune, "write_run_outputs", fail)
    with pytest.raises(error):
        run_finetune(text_config(csv_root), out_dir=tmp_path)
    recorded = json.loads((tmp_path / "status.json").read_text())
    assert recorded == {"status": status, "seed": 1234, "step": 10, "error": f"{error.__name__}: while drawing"}
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(finetune, "write_run_outputs", original)
    doc = run_finetune(text_config(csv_root), out_dir=tmp_path)
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "complete", "seed": 1234}
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == json.loads(json.dumps(doc["test"]))


def test_runs_started_in_the_same_second_get_their_own_default_folders(csv_root, tmp_path, capsys, monkeypatch):
    """The default --out is runs/finetune-<timestamp>: a second run started in the same second was refused
    while the first ran in that folder, or afterwards resumed it (the same settings) or refused it (others)."""
    from clara.run_dir import exclusive_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("meld.finetune.time.strftime", lambda fmt: "finetune-20260101-120000")
    first = tmp_path / "runs" / "finetune-20260101-120000"
    first.mkdir(parents=True)
    argv = ["--data", str(csv_root), "--modality", "text", *FAST, "train.epochs=1"]
    with exclusive_run(first):  # the first run, started the same second, made its folder and runs in it
        assert main(argv) == 0
    assert main([*argv, "train.lr=0.0005"]) == 0
    out = capsys.readouterr().out
    assert "run directory: runs/finetune-20260101-120000-2 " in out and "run directory: runs/finetune-20260101-120000-3 " in out
    assert yaml.safe_load((first.with_name(first.name + "-3") / "config.yaml").read_text())["train"]["lr"] == 0.0005
    assert not any(first.iterdir())
    # A run refused before it begins leaves no empty folder behind.
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--modality", "text", *FAST]) == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [first.name, f"{first.name}-2", f"{first.name}-3"]


def test_an_edited_transformers_tokenizer_is_encoded_again(tmp_path, capsys):
    """The linear-probe cache key hashed the transformers weights, not its tokenizer: with two words of the
    vocabulary swapped, the embeddings of the old ids were read back."""
    from tests.meld.test_classifier import tiny_bert

    bert = tiny_bert(tmp_path / "bert")
    root = write_csv_meld(tmp_path / "meld")
    config = text_config(root, "strategy.name=linear_probe", f"cache_root={tmp_path / 'cache'}", "train.epochs=1",
                         f"model.hf_text={bert}", "model.hf_text_mode=replace")
    before = _Data(config, load_model_config("tiny")).views["train"].ids
    run_finetune(config, out_dir=tmp_path / "a")
    run_finetune(config, out_dir=tmp_path / "b")
    tokenizer = json.loads((bert / "tokenizer.json").read_text())  # what the fast tokenizer reads
    vocab = tokenizer["model"]["vocab"]
    vocab["great"], vocab["sad"] = vocab["sad"], vocab["great"]
    (bert / "tokenizer.json").write_text(json.dumps(tokenizer))
    after = _Data(config, load_model_config("tiny")).views["train"].ids
    assert any(not torch.equal(old, new) for old, new in zip(before, after))  # "great" is in the joy lines
    run_finetune(config, out_dir=tmp_path / "c")
    printed = capsys.readouterr().out
    assert printed.count("embeddings computed") == 2 and printed.count("embeddings read from") == 1
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 2
