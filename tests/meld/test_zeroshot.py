"""``python -m meld.zeroshot`` end to end on a small prepared demo with a random tiny CLARA."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clara.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clara.engine import available_devices
from clara.model import Clara
from clara.model_config import load_model_config
from meld.demo import make_demo
from meld.demo_clara import ensure_demo_clara
from meld.feature_cache import AudioSettings
from meld.labels import EMOTIONS
from meld.layout import find_layout
from meld.metrics import classification_metrics
from meld.prepare import prepare
from meld.prompts import PROMPT_ROOT
from meld.records import load_splits
from meld.zeroshot import check_finite, main
from meld.report import coverage_lines
from tests.clara.pretrain_helpers import interrupt_pretraining_at_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(MELD root of a 40-utterance demo, random tiny checkpoint, base folder); features are prepared in
    the default cache under a private MELD_CLARA_CACHE."""
    base = tmp_path_factory.mktemp("zeroshot")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MELD_CLARA_CACHE", str(base / "cache"))
        root = make_demo(base / "demo", size=40)
        prepare(root, workers=1)
        torch.manual_seed(0)
        checkpoint = save_checkpoint(Clara(load_model_config("tiny")), base / "tiny")
        yield root, checkpoint, base


@pytest.fixture(scope="module")
def run_dir(setup):
    root, checkpoint, base = setup
    out = base / "run"
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def test_outputs(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"dev", "test", "zeroshot", "retrieval", "run"} <= set(metrics)
    scores = metrics["zeroshot"]["scores"]
    assert set(scores) == {"T1", "T2", "T3", "T4", "ensemble"}
    assert set(scores["ensemble"]) == {"none", "prior", "content_free"}
    # The headline is the ensemble with the default calibration (prior).
    assert metrics["test"]["macro_f1"] == scores["ensemble"]["prior"]["test"]["macro_f1"]
    for split in ("dev", "test"):
        recall = metrics["retrieval"][split]["recall"]
        assert set(recall) == {f"{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)}
    report = (run_dir / "report.md").read_text()
    for heading in ("Each template alone and the ensemble (test", "Calibration (no labels", "Audio-text retrieval"):
        assert heading in report
    assert "A person talking in a {label} voice" in report
    assert (run_dir / "confusion_test.png").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_split_with_no_usable_clip_is_one_error(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    copy = tmp_path / "meld"
    shutil.copytree(root, copy)
    for clip in (copy / "dev_splits_complete").iterdir():
        clip.unlink()
    prepare(copy, tmp_path / "cache", workers=1)
    capsys.readouterr()
    argv = ["--data", str(copy), "--cache", str(tmp_path / "cache"), "--checkpoint", str(checkpoint)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the dev split of {copy} has no clip with audio features: all 10 rows are "
                          "missing, undecodable, silent or too short") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_predictions_agree_with_the_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for split in ("dev", "test"):
        ours = [r for r in rows if r["key"].startswith(f"{split}/")]
        assert len(ours) == sum(metrics[split]["per_class"][e]["support"] for e in EMOTIONS)
        probs = np.array([[float(r[f"p_{e}"]) for e in EMOTIONS] for r in ours])
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        assert [EMOTIONS[i] for i in probs.argmax(axis=1)] == [r["predicted"] for r in ours]
        recomputed = classification_metrics([EMOTIONS.index(r["gold"]) for r in ours],
                                            [EMOTIONS.index(r["predicted"]) for r in ours], EMOTIONS)
        assert recomputed["macro_f1"] == pytest.approx(metrics[split]["macro_f1"])


def test_the_report_names_the_csv_rows_left_out_for_lack_of_audio(setup, run_dir, capsys):
    """The demo has a missing dev clip and a too-short test clip (as MELD's test dia155_utt3): the scores
    are over fewer rows than the official split's, which the report must say, with the keys."""
    root, _, _ = setup
    rows = load_splits(find_layout(root, need_clips=False))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = (run_dir / "report.md").read_text()
    with open(run_dir / "predictions.csv", newline="") as handle:
        scored = [r["key"] for r in csv.DictReader(handle)]
    for split in ("dev", "test"):
        csv_keys = [u.key for u in rows[split]]
        missing = [key for key in csv_keys if key not in scored]
        counts = metrics["rows"][split]
        assert missing and list(counts["left_out"]) == missing and all(counts["left_out"].values())
        assert counts["used"] == len(csv_keys) - len(missing) == sum(
            metrics[split]["per_class"][e]["support"] for e in EMOTIONS)
        assert counts["csv_rows"] == len(csv_keys)
        line = f"- {split}: {len(csv_keys) - len(missing)} of {len(csv_keys)} CSV rows; left out for lack of audio: "
        assert line + "; ".join(f"{key} ({counts['left_out'][key]})" for key in missing) + "\n" in report
    long = {"test": {"used": 5, "csv_rows": 8, "left_out": {"test/a": "x", "test/b": "y", "test/c": "z"}}}
    assert coverage_lines(long, shown=2) == ("- test: 5 of 8 CSV rows; left out for lack of audio: test/a (x); "
                                             "test/b (y); and 1 more (metrics.json's rows lists them all)")


def _split_rows(run_dir, split: str) -> dict:
    """One split's predictions.csv rows: keys, gold indices, probabilities [N, C], predicted class names."""
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["key"].startswith(f"{split}/")]
    return {"keys": [r["key"] for r in rows], "gold": [EMOTIONS.index(r["gold"]) for r in rows],
            "probs": np.array([[float(r[f"p_{e}"]) for e in EMOTIONS] for r in rows]),
            "predicted": [r["predicted"] for r in rows]}


@pytest.mark.parametrize("calibration", ["prior", "content_free"])
def test_calibrated_predictions_are_the_raw_ones_divided_by_the_stored_prior(setup, run_dir, tmp_path, calibration):
    # End to end: the headline probabilities of a calibrated run must be the raw run's p(c|x) / p̂(c),
    # renormalised, with p̂ the estimate metrics.json reports. A run that skipped the calibration would
    # write the raw probabilities under the calibrated name; this recomputation catches it.
    root, checkpoint, _ = setup
    outs = {"none": tmp_path / "none", "prior": run_dir, "content_free": tmp_path / "content_free"}
    for name in ("none", calibration):
        if name != "prior":  # run_dir is the default, prior-calibrated run
            assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--calibration", name,
                         "--out", str(outs[name])]) == 0
    metrics = json.loads((outs[calibration] / "metrics.json").read_text())
    prior = np.array([metrics["zeroshot"]["priors"]["ensemble"][calibration][e] for e in EMOTIONS])
    assert prior.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(prior - 1 / len(EMOTIONS)).max() > 0.01  # else calibration would change nothing to see
    for split in ("dev", "test"):
        raw, ours = _split_rows(outs["none"], split), _split_rows(outs[calibration], split)
        assert ours["keys"] == raw["keys"] and len(ours["keys"]) > 0
        expected = raw["probs"] / prior
        expected /= expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(ours["probs"], expected, atol=1e-4)  # predictions.csv keeps 6 decimals
        assert not np.allclose(ours["probs"], raw["probs"], atol=1e-3)
        assert [EMOTIONS[i] for i in expected.argmax(axis=1)] == ours["predicted"]
        # The headline metrics are those of the recomputed calibrated predictions.
        recomputed = classification_metrics(ours["gold"], expected.argmax(axis=1), EMOTIONS)
        assert recomputed["macro_f1"] == pytest.approx(metrics[split]["macro_f1"])


def test_one_template_ensemble_is_that_template(setup, tmp_path):
    root, checkpoint, _ = setup
    prompts = tmp_path / "one.yaml"
    prompts.write_text('target: emotion\ntemplates: ["A person talking in a {label} voice"]\n')
    out = tmp_path / "run"
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--split", "test",
                 "--calibration", "none", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dev" not in metrics
    scores = metrics["zeroshot"]["scores"]
    assert scores["ensemble"] == scores["T1"]


def test_sentiment_prompts(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "run"
    prompts = PROMPT_ROOT / "sentiment.yaml"
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--split", "dev",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["dev"]["per_class"]) == ["neutral", "positive", "negative"]


@pytest.mark.parametrize("argv, message", [
    (["--data", "{root}"], "--checkpoint is required"),
    (["--data", "{root}", "--checkpoint", "{base}/nothing"], "checkpoint not found"),
    (["--data", "{ckpt}", "--checkpoint", "{ckpt}"], "_sent_emo.csv"),
    (["--data", "{root}", "--checkpoint", "{ckpt}", "--prompts", "{base}/none.yaml"], "config file not found"),
    (["--data", "{root}", "--checkpoint", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["--data", "{root}", "--checkpoint", "{ckpt}", "--set", "audio.n_mels=64", "--out", "{base}/m"],
     "audio.n_mels is 64, but the CLARA model reads 80-bin log-mels"),
    (["--data", "{root}", "--checkpoint", "{ckpt}", "--set", "audio.bogus=1"], "unknown key(s) bogus"),
    (["--data", "{root}", "--checkpoint", "{ckpt}", "--set", "modality=text"], "only audio.* settings apply here"),
    (["--data", "{root}", "--checkpoint", "{ckpt}", "--max-seconds", "-1"], "--max-seconds"),
])
def test_user_mistakes_are_one_line(setup, capsys, argv, message):
    root, checkpoint, base = setup
    argv = [a.format(root=root, base=base, ckpt=checkpoint) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_features_prepared_with_other_audio_settings_are_read_with_the_same_flags(setup, tmp_path, capsys):
    root, checkpoint, base = setup
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MELD_CLARA_CACHE", str(base / "cache"))
        capped = AudioSettings(max_seconds=2.0)
        prepare(root, settings=capped, workers=1)
        argv = ["--data", str(root), "--checkpoint", str(checkpoint), "--split", "test"]
        assert main([*argv, "--max-seconds", "2", "--out", str(tmp_path / "capped")]) == 0
        assert main([*argv, "--set", "audio.max_seconds=30", "--out", str(tmp_path / "default")]) == 0
    runs = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("capped", "default")}
    assert Path(runs["capped"]["run"]["audio_features"]).name == f"audio-{capped.key()}"
    assert Path(runs["default"]["run"]["audio_features"]).name == f"audio-{AudioSettings().key()}"
    # The demo has clips over 2 s: cut to 2 s, some embeddings and so some scores differ.
    capped_rows = (tmp_path / "capped" / "predictions.csv").read_text()
    assert capped_rows != (tmp_path / "default" / "predictions.csv").read_text()


def test_unprepared_data_names_the_fix(tmp_path, setup, capsys, monkeypatch):
    root, checkpoint, _ = setup
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "empty-cache"))  # where no features were prepared
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "run")]) == 2
    assert "python -m meld.prepare" in capsys.readouterr().err


def test_demo_recipe_builds_once_then_reuses(tmp_path, monkeypatch):
    """The shipped recipe with a 3-step override: built once, atomically, then reused; other settings, other key."""
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "cache"))
    root = make_demo(tmp_path / "demo", size=40)
    overrides = ["train.steps=3", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false"]
    path = ensure_demo_clara(data_root=root, overrides=overrides)
    assert load_checkpoint(path).config.output_dim == 32
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_clara(data_root=root, overrides=overrides) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(path.parent.parent.glob(".meld-demo-*"))  # no staging folder left behind
    assert ensure_demo_clara(data_root=root, overrides=[*overrides, "train.steps=4"]) != path


def test_embeddings_are_cached_across_runs(tmp_path, monkeypatch):
    """A second zero-shot run with the same weights, prompts and data reads its embeddings from disk."""
    import torch

    from clara.model import Clara
    from clara.model_config import load_model_config
    from clara.tokenizer import Tokenizer
    from meld.dataset import DataConfig, build_datasets
    from meld.prompts import load_prompts
    from meld.zeroshot import DEFAULT_PROMPTS, cached_embeddings
    from tests.meld.finetune_helpers import small_demo

    root, cache = small_demo()
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "user-cache"))
    data = DataConfig(modality="audio")
    datasets = build_datasets(root, data, splits=("train", "test"), cache_root=cache)
    torch.manual_seed(0)
    model = Clara(load_model_config("tiny")).eval()
    prompts = load_prompts(DEFAULT_PROMPTS)
    first, first_prompts, hit = cached_embeddings(model, Tokenizer(), prompts, datasets, root, data, 8)
    second, second_prompts, hit_again = cached_embeddings(model, Tokenizer(), prompts, datasets, root, data, 8)
    assert not hit and hit_again
    assert list((tmp_path / "user-cache").rglob("*.safetensors"))
    assert torch.equal(first["test"], second["test"]) and len(first_prompts) == 7
    assert torch.equal(first_prompts[0], second_prompts[0])


def test_a_clip_prepared_again_is_encoded_again(setup, tmp_path):
    """The embedding cache keys on the prepared features, not only on the utterance keys: a clip replaced
    and prepared again gets the embedding of its new audio, not the one cached for the old."""
    from clara.tokenizer import Tokenizer
    from meld.dataset import DataConfig, build_datasets
    from meld.layout import find_layout
    from meld.prompts import load_prompts
    from meld.zeroshot import cached_embeddings

    source, checkpoint, _ = setup
    root, cache = shutil.copytree(source, tmp_path / "demo"), tmp_path / "cache"
    prepare(root, cache, workers=1)
    data, model, prompts = DataConfig(modality="audio"), load_checkpoint(checkpoint).eval(), load_prompts()

    def embeddings():
        datasets = build_datasets(root, data, splits=("train", "test"), cache_root=cache)
        audio, _, hit = cached_embeddings(model, Tokenizer(), prompts, datasets, root, data, 8, cache_root=cache)
        return datasets["test"], audio["test"], hit

    test, before, hit = embeddings()
    assert not hit and not torch.allclose(before[0], before[1], atol=1e-3)
    clips = find_layout(root, ("test",), need_clips=True)["test"].clips
    first, second = test.utterances[0], test.utterances[1]
    shutil.copyfile(clips / second.clip_name, clips / first.clip_name)  # the first clip now holds the second's audio
    prepare(root, cache, workers=1)
    test, after, hit = embeddings()
    assert not hit
    assert [u.key for u in test.utterances[:2]] == [first.key, second.key]
    # The first clip's embedding is now the second's, and what the model computes from its new features.
    torch.testing.assert_close(after[0], before[1], atol=1e-5, rtol=0)
    with torch.no_grad():
        mel = test[0]["mel"]  # [n_mels, T], as prepared again
        naive = model.encode_audio(mel[None], torch.tensor([mel.shape[-1]]))[0]
    torch.testing.assert_close(after[0], naive, atol=1e-5, rtol=0)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_must_be_new_empty_or_a_zeroshot_run(setup, run_dir, tmp_path, capsys, monkeypatch):
    root, checkpoint, _ = setup
    finetune_run = tmp_path / "finetune-run"  # what a fine-tune run keeps at its top level
    finetune_run.mkdir()
    (finetune_run / "config.yaml").write_text("data_root: meld\n")
    (finetune_run / "metrics.json").write_text('{"dev": {}, "test": {}}')
    (finetune_run / "report.md").write_text("# the fine-tune's report\n")
    user = tmp_path / "userdir"
    (user / "model").mkdir(parents=True)
    (user / "model" / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("")

    def never(*args, **kwargs):
        raise AssertionError("the output folder is checked before any work")

    with monkeypatch.context() as patch:
        patch.setattr("meld.zeroshot.load_checkpoint", never)
        for out, message in ((finetune_run, f"{finetune_run} exists and is not a meld.zeroshot run"),
                             (user, f"{user} exists and is not a meld.zeroshot run; give an empty or new folder"),
                             (afile, f"{afile}: exists and is not a folder"),
                             (afile / "sub", f"{afile}: exists and is not a folder")):
            before = _snapshot(out) if out.is_dir() else None
            assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
            assert before is None or _snapshot(out) == before
    # An earlier zero-shot run is rescored in place.
    rerun = tmp_path / "rerun"
    shutil.copytree(run_dir, rerun)
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--out", str(rerun), "--split", "dev"]) == 0
    assert "test" not in json.loads((rerun / "metrics.json").read_text())
    assert len(list((rerun / "tensorboard").glob("events.out.tfevents.*"))) == 1  # replaced, not added to


def test_a_second_command_in_a_running_folder_is_refused_not_mixed_in(setup, tmp_path, capsys, monkeypatch):
    """The run holds its folder while it runs. Two commands given the same --out (or started in the same
    second with the default one) both wrote into it, each printing success: one's metrics.json beside the
    other's predictions.csv, and one's confusion PNG deleted by the other."""
    from meld import zeroshot

    root, checkpoint, _ = setup
    out = tmp_path / "run"
    argv = ["--data", str(root), "--checkpoint", str(checkpoint), "--out", str(out)]
    real_score, second = zeroshot.score, {}

    def score_while_another_starts(*args, **kwargs):
        if not second:  # once: a second command let in would come here too
            second["started"] = True
            second["rc"] = main([*argv, "--split", "dev"])
            second["err"] = capsys.readouterr().err
        return real_score(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "score", score_while_another_starts)
    assert main([*argv, "--split", "test"]) == 0
    assert second["rc"] == 2 and second["err"] == (
        f"error: {out}: another command is running in this folder; wait for it to end (the same command then "
        "resumes or reruns its run), or give another folder\n"), second
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test" in metrics and "dev" not in metrics
    assert (out / "confusion_test.png").is_file() and not (out / "confusion_dev.png").exists()


def test_a_finetune_run_or_a_missing_gpu_is_one_line(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "classifier.json").write_text("{}")
    assert main(["--data", str(root), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "a fine-tuned MELD classifier, not a CLARA checkpoint" in err and "meld.predict --run" in err
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--device", "cuda:99", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --device: 'cuda:99' is not available on this machine; available: {', '.join(available_devices())} (or auto)\n", err
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--device", "gpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'\n", err
    assert not (tmp_path / "o").exists()


def test_a_diverged_checkpoint_is_one_line_not_scores_of_class_zero(setup, run_dir, tmp_path, capsys):
    """NaN embeddings were scored as all-neutral (argmax of a NaN row), then metrics.json refused the NaN
    prior with a traceback."""
    root, checkpoint, _ = setup
    model = load_checkpoint(checkpoint)
    with torch.no_grad():
        model.audio_head.weight[0, 0] = float("nan")  # every audio embedding becomes NaN
    diverged = save_checkpoint(model, tmp_path / "diverged")
    train_clips = json.loads((run_dir / "metrics.json").read_text())["run"]["train_clips_unlabelled"]
    out = tmp_path / "o"
    assert main(["--data", str(root), "--checkpoint", str(diverged), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {diverged}: train audio embeddings: {train_clips} of {train_clips} are NaN or infinite "
                   "(a diverged or damaged checkpoint)\n"), err
    assert not (out / "metrics.json").exists()


def test_check_finite_counts_the_bad_rows_and_names_the_precision():
    embeds = torch.ones(5, 3)
    embeds[1, 2], embeds[3, 0] = float("nan"), float("inf")
    with pytest.raises(CheckpointError, match=r"^ck: dev audio embeddings: 2 of 5 are NaN or infinite "
                       r"\(a diverged or damaged checkpoint, or fp16 overflow \(try --precision fp32\)\)$"):
        check_finite(Path("ck"), "fp16", {"train audio embeddings": torch.ones(4, 3), "dev audio embeddings": embeds})
    with pytest.raises(CheckpointError, match=r"^ck: audio scale: 1 of 1 are NaN"):
        check_finite(Path("ck"), "fp32", {"audio scale": torch.tensor(float("inf"))})
    check_finite(Path("ck"), "fp32", {"audio scale": torch.tensor(14.3), "prompts": torch.ones(7, 3)})


def test_ctrl_c_is_one_line(setup, tmp_path, capsys, monkeypatch):
    root, checkpoint, _ = setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("meld.zeroshot.load_checkpoint", interrupted)
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.count("\n") == 1


def test_an_interrupted_demo_recipe_resumes_from_its_last_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "cache"))
    root = make_demo(tmp_path / "demo", size=40)
    overrides = ["train.steps=4", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false",
                 "train.eval_at_start=false"]
    with monkeypatch.context() as patch:
        interrupt_pretraining_at_step(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            ensure_demo_clara(data_root=root, overrides=overrides)
    staging = list((tmp_path / "cache" / "clara").glob(".meld-demo-*"))
    assert len(staging) == 1 and torch.load(staging[0] / "checkpoint.pt", weights_only=True)["step"] == 2
    capsys.readouterr()
    path = ensure_demo_clara(data_root=root, overrides=overrides)
    assert f"resumed from {staging[0] / 'checkpoint.pt'} at step 2" in capsys.readouterr().out
    assert not staging[0].exists()
    # The same weights as a build that was never interrupted.
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "cache-straight"))
    straight = ensure_demo_clara(data_root=root, overrides=overrides)
    first, second = load_checkpoint(path).state_dict(), load_checkpoint(straight).state_dict()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_cache_clara_override_and_allow_pickle_options(setup, tmp_path, capsys, monkeypatch):
    from tests.clara.test_checkpoint import Evil
    from tests.clara.test_model import write_reference_checkpoint

    root, checkpoint, _ = setup
    monkeypatch.setenv("MELD_CLARA_CACHE", str(tmp_path / "empty-user-cache"))  # nothing prepared there
    cache = tmp_path / "my-cache"
    prepare(root, cache, workers=1)
    args = ["--data", str(root), "--checkpoint", str(checkpoint), "--split", "test"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 2  # the default cache has no features
    assert "meld.prepare" in capsys.readouterr().err
    assert main([*args, "--cache", str(cache), "--out", str(tmp_path / "a")]) == 0
    embeddings = cache / "embeddings"
    assert len(list(embeddings.glob("*.safetensors"))) == 1
    assert not list((tmp_path / "empty-user-cache").rglob("*.safetensors"))
    # A setting that changes the embeddings but not the weights: the model gets it, and a new cache entry.
    assert main([*args, "--cache", str(cache), "--clara-override", "mask_padding=false",
                 "--clara-override", "attention=eager", "--out", str(tmp_path / "b")]) == 0
    assert len(list(embeddings.glob("*.safetensors"))) == 2
    run = json.loads((tmp_path / "b" / "metrics.json").read_text())["run"]
    assert run["clara_overrides"] == "mask_padding=false attention=eager" and run["cache"] == str(cache)
    # The default prompt and caption files are recorded as files that exist from any working folder.
    assert Path(run["prompts"]).is_absolute() and Path(run["prompts"]).is_file() and Path(run["captions"]).is_file()
    capsys.readouterr()
    assert main([*args, "--cache", str(cache), "--clara-override", "audio.layers=1", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit the model" in err and "--clara-override audio.layers=1" in err
    # A reference checkpoint with pickled objects: refused with the flag to pass, loaded with it.
    path, _, _ = write_reference_checkpoint(tmp_path, "tiny")
    payload = torch.load(path, weights_only=True)
    payload["callbacks"] = Evil()
    torch.save(payload, path)
    pickled = ["--data", str(root), "--checkpoint", str(path), "--cache", str(cache), "--split", "test"]
    assert main([*pickled, "--out", str(tmp_path / "d")]) == 2
    assert "meld.zeroshot: --allow-pickle" in capsys.readouterr().err
    assert main([*pickled, "--allow-pickle", "--out", str(tmp_path / "e")]) == 0


def test_the_demo_clara_is_built_from_the_cache_given(tmp_path, monkeypatch):
    # Without --data the demo CLARA is pretrained first; its clips must be decoded into --cache, not the
    # default cache as well.
    from argparse import Namespace

    from meld import zeroshot

    seen = {}
    monkeypatch.setattr(zeroshot, "ensure_demo", lambda log=None: tmp_path / "demo")
    monkeypatch.setattr(zeroshot, "ensure_demo_clara", lambda **kwargs: seen.update(kwargs) or tmp_path / "clara")
    args = Namespace(data=None, checkpoint=None, cache=str(tmp_path / "my-cache"))
    assert zeroshot.resolve_inputs(args) == (tmp_path / "demo", tmp_path / "clara")
    assert seen["cache_root"] == str(tmp_path / "my-cache") and seen["data_root"] == tmp_path / "demo"


def test_a_rerun_on_fewer_splits_leaves_no_plot_of_the_split_it_dropped(setup, run_dir, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert (out / "confusion_test.png").is_file()
    assert main(["--data", str(root), "--checkpoint", str(checkpoint), "--split", "dev", "--out", str(out)]) == 0
    assert (out / "confusion_dev.png").is_file() and not (out / "confusion_test.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dev" in metrics and "test" not in metrics


def test_a_folder_of_csvs_alone_says_there_are_no_clips_not_to_run_prepare(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    csvs = tmp_path / "csvs"
    csvs.mkdir()
    for csv_file in root.rglob("*_sent_emo.csv"):
        shutil.copy(csv_file, csvs / csv_file.name)
    assert main(["--data", str(csvs), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no audio features for the train split, and no clips to prepare them from: ")
    assert "python -m meld.prepare" not in err and err.count("\n") == 1
