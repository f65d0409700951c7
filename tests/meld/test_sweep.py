"""python -m meld.sweep: search space, pruning, parallel workers, a killed worker, outputs, CLI errors.

The process tests drive a stand-in fine-tune (below) whose dev macro-F1 is a known function of the
learning rate, so they are fast and their outcome is known: lr above BAD_LR is a bad region.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from clara import config as config_lib
from clara.config import ConfigError
from clara.engine import BatchDoesNotFit, TrainConfig, check_fits
from meld.labels import EMOTIONS
from meld.metrics import classification_metrics
from meld.sweep import load_sweep_config, main, run_sweep
from meld.sweep_study import (
    Backend, SweepError, check_space, finetune_backend, open_storage, open_study, suggest, trial_config,
)
from meld.sweep_config import Param, SweepConfig
from meld.sweep_worker import worker_device
from tests.meld.tensorboard_helpers import dashboards

REPO_ROOT = Path(__file__).resolve().parents[2]
BAD_LR = 0.1
HANG_ENV = "MELD_SWEEP_TEST_HANG"  # a trial folder name: the stand-in hangs there in epoch 2


# ---- the stand-in fine-tune: meld.finetune's API on a tiny config


@dataclass(frozen=True)
class StandInTrain:
    lr: float = 0.01
    epochs: int = 6
    seed: int = 0
    data_seed: int = 0  # recorded in config.yaml only: another final.seed_key
    device: str = "auto"  # recorded in config.yaml only (STANDIN_GPU's device_key)


@dataclass(frozen=True)
class StandInConfig:
    train: StandInTrain = field(default_factory=StandInTrain)
    fusion: str = "concat"
    loss: str = "ce"
    gamma: float = 2.0
    sleep: float = 0.0  # seconds per epoch
    outputs: str = "full"  # meld.finetune's output level; the sweep sets it (STANDIN's outputs_key)

    def __post_init__(self) -> None:
        if self.fusion not in ("concat", "gated", "attention"):
            raise ConfigError(f"fusion: unknown {self.fusion!r}")


def standin_load_config(path: str | None, overrides) -> StandInConfig:
    return config_lib.load(StandInConfig, path, overrides)


def standin_quality(config: StandInConfig) -> float:
    """The accuracy a run reaches: good and smooth in log lr below BAD_LR, poor above it."""
    if config.train.lr > BAD_LR:
        return 0.15
    return 0.9 - 0.08 * abs(math.log10(config.train.lr) + 2.5) + (0.03 if config.fusion == "gated" else 0.0)


def _split_metrics(accuracy: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, len(EMOTIONS), size=200)
    pred = np.where(rng.random(200) < accuracy, gold, rng.integers(0, len(EMOTIONS), size=200))
    return classification_metrics(gold, pred, EMOTIONS)


def standin_run(config: StandInConfig, *, out_dir: Path, epoch_callback=None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assert not (out_dir / "metrics.json").exists(), "a trial never reuses another's folder"
    print("stand-in progress")
    config_lib.save_yaml(config, out_dir / "config.yaml")
    quality = standin_quality(config)
    for epoch in range(1, config.train.epochs + 1):  # counted from 1, as meld.finetune does
        time.sleep(config.sleep)
        if epoch == 2 and os.environ.get(HANG_ENV) == out_dir.name:
            (out_dir / "hanging").touch()
            time.sleep(600)
        if epoch_callback is not None:
            epoch_callback(epoch, {"macro_f1": quality * epoch / config.train.epochs})
    document = {"dev": _split_metrics(quality, config.train.seed),
                "test": _split_metrics(quality - 0.05, config.train.seed + 100)}
    document["dev"]["macro_f1"] = quality  # the value the objective reads, exactly
    (out_dir / "metrics.json").write_text(json.dumps(document))
    return document


STANDIN = Backend(standin_load_config, standin_run, outputs_key="outputs")
STANDIN_GPU = Backend(standin_load_config, standin_run, outputs_key="outputs", device_key="train.device")

SPACE = [
    {"key": "train.lr", "type": "float", "low": 1.0e-4, "high": 1.0, "log": True},
    {"key": "fusion", "type": "categorical", "choices": ["concat", "gated"]},
]


def sweep_config(study_dir: Path, **sections) -> SweepConfig:
    """A small sweep of the stand-in; journal storage, as SQLite's synced commits cost seconds per test."""
    study = {"name": "t", "dir": str(study_dir), "n_trials": 6, "plots": False, "storage": f"journal:{study_dir}.log"}
    data = {"space": SPACE, "study": study,
            "sampler": {"type": "random", "seed": 3}, "pruner": {"type": "none"}, "final": {"seeds": 0}}
    for name, value in sections.items():
        data[name] = {**data[name], **value} if isinstance(value, dict) and name in data else value
    return config_lib.from_dict(SweepConfig, data)


def trials_of(config: SweepConfig) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(config, Path(config.study.dir))
    return optuna.load_study(study_name=config.study.name, storage=storage).get_trials()


def states(trials) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _quiet(line: str) -> None:
    pass


# ---- config and search space


def test_shipped_configs_fit_the_finetune_config():
    for name in ("fast", "full"):
        config = load_sweep_config(REPO_ROOT / "configs" / "sweep" / f"{name}.yaml")
        assert config.objective.metric == "macro_f1"
        check_space(config, finetune_backend())  # every key, bound and choice is a valid fine-tune setting
    assert load_sweep_config(None).study.name == load_sweep_config(REPO_ROOT / "configs/sweep/fast.yaml").study.name


def test_trials_sampled_from_the_shipped_spaces_all_load():
    """check_space tries each bound and choice alone; settings can also clash in combination (focal
    loss with label smoothing is refused), which would fail trials one by one mid-study."""
    for name in ("fast", "full"):
        config = load_sweep_config(REPO_ROOT / "configs" / "sweep" / f"{name}.yaml")
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(200):
            trial_config(config, finetune_backend(), suggest(study.ask(), config.space))


@pytest.mark.parametrize("param, message", [
    ({"key": "train.lr", "type": "float", "low": 0.0, "high": 1.0, "log": True}, "log scale needs low > 0"),
    ({"key": "train.lr", "type": "float", "low": 2.0, "high": 1.0}, "above high"),
    ({"key": "fusion", "type": "categorical"}, "needs choices"),
    ({"key": "fusion", "type": "categorical", "choices": ["a", "a"]}, "repeat"),
    ({"key": "train.epochs", "type": "int", "low": 1.5, "high": 4}, "whole"),
    ({"key": "train..lr", "type": "float", "low": 1, "high": 2}, "dotted config key"),
    # Optuna would search 0 to 0.9 and 1 to 7: high - low must be a multiple of step.
    ({"key": "model.dropout", "type": "float", "low": 0.0, "high": 1.0, "step": 0.3},
     r"space\[model.dropout\]: high - low \(1.0 - 0.0\) is not a multiple of step 0.3"),
    ({"key": "train.epochs", "type": "int", "low": 1, "high": 8, "step": 2}, "not a multiple of step 2"),
])
def test_bad_params_are_refused(param, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict(Param, param)


def test_a_step_that_divides_the_range_searches_the_whole_grid():
    space = config_lib.from_dict(SweepConfig, {"space": [
        {"key": "model.dropout", "type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        {"key": "train.epochs", "type": "int", "low": 1, "high": 7, "step": 2},
    ]}).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [suggest(study.ask(), space) for _ in range(100)]
    assert sorted({round(p["model.dropout"], 9) for p in seen}) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert sorted({p["train.epochs"] for p in seen}) == [1, 3, 5, 7]


def test_a_hyperband_whose_max_resource_is_below_its_min_is_refused():
    """Optuna's HyperbandPruner makes no bracket from it and silently never prunes."""
    with pytest.raises(ConfigError) as caught:
        load_sweep_config(None, ["pruner.type=hyperband", "pruner.min_resource=5", "pruner.max_resource=3"])
    assert str(caught.value).endswith("pruner: max_resource 3 is below min_resource 5")
    pruner = load_sweep_config(None, ["pruner.type=hyperband", "pruner.min_resource=5"]).pruner
    assert (pruner.min_resource, pruner.max_resource) == (5, 0)  # 0: learned from the first finished trial


def test_only_if_must_name_an_earlier_parameter():
    space = [{"key": "gamma", "type": "float", "low": 1, "high": 3, "only_if": {"loss": ["focal"]}}]
    with pytest.raises(ConfigError, match="not an earlier parameter"):
        config_lib.from_dict(SweepConfig, {"space": space})


@pytest.mark.parametrize("earlier, values", [
    ({"key": "loss", "type": "categorical", "choices": ["ce", "focal"]}, ["Focal"]),
    ({"key": "loss", "type": "categorical", "choices": [16, 32]}, ["16"]),
    ({"key": "layers", "type": "int", "low": 1, "high": 4}, [2, 6]),
    ({"key": "layers", "type": "int", "low": 1, "high": 4}, [2.5]),  # an int parameter takes whole numbers
    ({"key": "layers", "type": "int", "low": 1, "high": 7, "step": 2}, [3, 4]),  # 1, 3, 5, 7
])
def test_only_if_values_the_earlier_parameter_never_takes_are_refused(earlier, values):
    """Such a condition never holds, so the parameter would silently never be searched."""
    space = [earlier, {"key": "gamma", "type": "float", "low": 1, "high": 3, "only_if": {earlier["key"]: values}}]
    with pytest.raises(ConfigError, match=rf"space\[gamma\].only_if: {earlier['key']} never takes"):
        config_lib.from_dict(SweepConfig, {"space": space})


def test_only_if_on_a_grid_value_is_accepted_and_searched_only_there():
    space = config_lib.from_dict(SweepConfig, {"space": [
        {"key": "layers", "type": "int", "low": 1, "high": 7, "step": 2},
        {"key": "gamma", "type": "float", "low": 1, "high": 3, "only_if": {"layers": [3.0, 5]}},
    ]}).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(40):
        params = suggest(study.ask(), space)
        seen.setdefault(params["layers"], set()).add("gamma" in params)
    assert seen == {1: {False}, 3: {True}, 5: {True}, 7: {False}}


def test_only_if_with_no_values_is_refused():
    """An empty list is a condition no value meets: the parameter would silently never be searched."""
    space = [{"key": "loss", "type": "categorical", "choices": ["ce", "focal"]},
             {"key": "gamma", "type": "float", "low": 1, "high": 3, "only_if": {"loss": []}}]
    with pytest.raises(ConfigError) as caught:
        config_lib.from_dict(SweepConfig, {"space": space})
    assert str(caught.value) == "space[gamma].only_if: loss lists no values, so gamma would never be searched"


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_sampler_seed_numpy_cannot_take_is_refused_before_the_study_folder(tmp_path, capsys, monkeypatch, seed):
    """It failed at the first trial with a ValueError traceback, after study.db was made."""
    monkeypatch.setattr("meld.sweep.finetune_backend", lambda: STANDIN)
    assert main(["--study-dir", str(tmp_path / "s"), f"sampler.seed={seed}"]) == 2
    assert capsys.readouterr().err == (f"error: {REPO_ROOT / 'configs/sweep/fast.yaml'} + overrides: "
                                       f"sampler.seed must be between 0 and 2**32 - 1, got {seed}\n")
    assert not (tmp_path / "s").exists()
    assert load_sweep_config(None, [f"sampler.seed={2**32 - 1}"]).sampler.seed == 2**32 - 1


def test_a_base_config_with_several_seeds_is_refused():
    """Each seed of a trial would report epochs 1, 2, ... again, and the pruner keeps only the first
    report of a step; the objective would be the best seed's."""
    config = load_sweep_config(REPO_ROOT / "configs" / "sweep" / "fast.yaml")
    with pytest.raises(ConfigError, match="base config: seeds=2: a sweep trial is one run"):
        check_space(replace(config, base_overrides=(*config.base_overrides, "seeds=2")), finetune_backend())


def test_suggest_follows_types_and_conditions():
    space = config_lib.from_dict(SweepConfig, {"space": [
        {"key": "train.lr", "type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        {"key": "train.epochs", "type": "int", "low": 2, "high": 8, "step": 2},
        {"key": "loss", "type": "categorical", "choices": ["ce", "focal"]},
        {"key": "gamma", "type": "float", "low": 1.0, "high": 3.0, "only_if": {"loss": ["focal"]}},
    ]}).space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, space)
        assert 1e-4 <= params["train.lr"] <= 1e-1 and params["train.epochs"] in (2, 4, 6, 8)
        assert ("gamma" in params) == (params["loss"] == "focal")
        seen.append(params["loss"])
        study.tell(trial, 0.0)
    assert set(seen) == {"ce", "focal"}


def test_a_misspelt_key_fails_before_any_trial(tmp_path):
    config = sweep_config(tmp_path / "s", space=[*SPACE, {"key": "train.lrr", "type": "float", "low": 1, "high": 2}])
    with pytest.raises(SweepError, match=r"space\[train.lrr\].*unknown key"):
        run_sweep(config, backend=STANDIN, log=_quiet)
    assert not (tmp_path / "s" / "trials").exists()
    config = sweep_config(tmp_path / "f", final={"seeds": 2, "seed_key": "train.sed"})
    with pytest.raises(SweepError, match=r"final.seed_key 'train.sed'.*unknown key"):
        run_sweep(config, backend=STANDIN, log=_quiet)
    assert not (tmp_path / "f" / "trials").exists()
    # A key that loads but holds no whole number was found only when the final runs began, every trial done.
    config = sweep_config(tmp_path / "g", final={"seeds": 2, "seed_key": "gamma"})
    with pytest.raises(SweepError) as caught:
        run_sweep(config, backend=STANDIN, log=_quiet)
    assert str(caught.value) == "final.seed_key: gamma is not an integer"
    assert not (tmp_path / "g").exists()


# ---- one worker: outputs, resume, final seeds


def test_sweep_writes_trials_summary_plots_best_config_and_final(tmp_path):
    config = sweep_config(tmp_path / "s", final={"seeds": 3}, study={"plots": True, "storage": ""})  # SQLite
    result = run_sweep(config, backend=STANDIN, log=_quiet)
    study_dir = tmp_path / "s"
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 6}
    assert sorted(p.name for p in (study_dir / "trials").iterdir()) == [f"trial-{n:04d}" for n in range(6)]
    best = max(trials, key=lambda t: t.value)
    assert result["best"]["number"] == best.number

    best_config = standin_load_config(str(study_dir / "best_config.yaml"), [])
    assert best_config.train.lr == pytest.approx(best.params["train.lr"])
    assert best_config.fusion == best.params["fusion"]

    summary = (study_dir / "summary.csv").read_text().splitlines()
    assert summary[0].split(",")[:3] == ["trial", "state", "dev macro_f1"] and len(summary) == 7
    markdown = (study_dir / "summary.md").read_text()
    assert f"**Best: trial {best.number}" in markdown and "## The best config over 3 seeds" in markdown
    for plot in result["plots"]:
        assert plot.file and (study_dir / plot.file).stat().st_size > 1000, plot

    final = json.loads((study_dir / "final.json").read_text())
    # Fresh seeds: the trials ran with the base seed 0, and the best was picked for that run's dev score.
    assert final["seeds"] == [1, 2, 3] and final["mean_std"]["runs"] == 3
    assert final["mean_std"]["test"]["macro_f1"]["std"] > 0  # three different seeds
    for seed in (1, 2, 3):
        run = study_dir / "final" / f"trial-{best.number:04d}" / f"seed-{seed}"
        assert standin_load_config(str(run / "config.yaml"), []).train.seed == seed
        assert standin_load_config(str(run / "config.yaml"), []).outputs == "full"
    # Trials are written light; the best config and its final runs are not.
    for trial in trials:
        assert standin_load_config(str(study_dir / trial.user_attrs["run_dir"] / "config.yaml"), []).outputs == "light"
    assert best_config.outputs == "full"


def test_final_runs_are_reused_when_complete_and_run_again_when_their_settings_change(tmp_path):
    config = sweep_config(tmp_path / "s", final={"seeds": 2})
    lines: list[str] = []
    first = run_sweep(config, backend=STANDIN, log=lines.append)
    final_dir = tmp_path / "s" / first["final"]["dir"]
    assert sum(line.startswith("final: ") for line in lines) == 2
    lines.clear()
    again = run_sweep(config, backend=STANDIN, log=lines.append)  # complete: nothing runs, same numbers
    assert not [line for line in lines if line.startswith("final")] and again["final"] == first["final"]

    # Another seed key: the folders seed-1 and seed-2 hold runs of train.seed 1 and 2, not of these settings.
    changed = replace(config, final=replace(config.final, seed_key="train.data_seed"))
    lines.clear()
    result = run_sweep(changed, backend=STANDIN, log=lines.append)
    assert sum("holds a run of other settings; running it again" in line for line in lines) == 2, lines
    documents = []
    for seed in (1, 2):
        saved = standin_load_config(str(final_dir / f"seed-{seed}" / "config.yaml"), [])
        assert (saved.train.seed, saved.train.data_seed) == (0, seed)
        documents.append(json.loads((final_dir / f"seed-{seed}" / "metrics.json").read_text()))
    assert sorted(path.name for path in final_dir.iterdir()) == ["seed-1", "seed-2"]
    # The stand-in's metrics follow train.seed alone, now 0 for both runs: equal, so a std of 0.
    test_f1 = [document["test"]["macro_f1"] for document in documents]
    assert test_f1[0] == test_f1[1]
    assert result["final"]["mean_std"]["test"]["macro_f1"] == {"mean": pytest.approx(test_f1[0]), "std": 0.0}
    assert first["final"]["mean_std"]["test"]["macro_f1"]["std"] > 0


def test_trials_write_what_study_trial_outputs_says_and_the_final_runs_everything(tmp_path):
    config = sweep_config(tmp_path / "s", base_overrides=["outputs=light"], final={"seeds": 1},
                          study={"n_trials": 2, "trial_outputs": "full"})
    run_sweep(config, backend=STANDIN, log=_quiet)
    study_dir = tmp_path / "s"
    runs = sorted(study_dir.glob("trials/*/config.yaml")) + sorted(study_dir.glob("final/*/*/config.yaml"))
    assert len(runs) == 3 and {standin_load_config(str(path), []).outputs for path in runs} == {"full"}
    assert standin_load_config(str(study_dir / "best_config.yaml"), []).outputs == "light"  # the base's value


def test_rerun_resumes_and_adds_only_the_missing_trials(tmp_path):
    config = sweep_config(tmp_path / "s")
    run_sweep(config, backend=STANDIN, log=_quiet)
    run_sweep(config, backend=STANDIN, log=_quiet)  # nothing left to do
    assert states(trials_of(config)) == {"COMPLETE": 6}
    bigger = replace(config, study=replace(config.study, n_trials=9))
    run_sweep(bigger, backend=STANDIN, log=_quiet)
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 9}
    # A resumed sampler draws fresh points rather than repeating the first run's.
    assert len({t.params["train.lr"] for t in trials}) == 9


def test_resuming_with_another_space_is_refused(tmp_path):
    run_sweep(sweep_config(tmp_path / "s"), backend=STANDIN, log=_quiet)
    changed = sweep_config(tmp_path / "s", space=SPACE[:1])
    with pytest.raises(SweepError, match="made with another space"):
        run_sweep(changed, backend=STANDIN, log=_quiet)


def test_resuming_after_the_base_yaml_was_edited_is_refused_naming_what_changed(tmp_path):
    """The base is recorded resolved: an edit to its file would otherwise go on unnoticed, the new
    trials (and best_config.yaml, the final runs) on other settings than the first ones."""
    base = tmp_path / "base.yaml"
    base.write_text("loss: ce\ngamma: 2.0\n")
    config = sweep_config(tmp_path / "s", base=str(base))
    run_sweep(config, backend=STANDIN, log=_quiet)
    recorded = yaml.safe_load((tmp_path / "s" / "base_config.yaml").read_text())
    assert (recorded["loss"], recorded["gamma"], recorded["train"]["epochs"]) == ("ce", 2.0, 6)
    assert yaml.safe_load((tmp_path / "s" / "sweep_config.yaml").read_text())["base"] == str(base)
    summary = (tmp_path / "s" / "summary.csv").read_text()

    base.write_text("loss: focal\ngamma: 4.0\n")
    more = replace(config, study=replace(config.study, n_trials=9))
    with pytest.raises(SweepError) as caught:
        run_sweep(more, backend=STANDIN, log=_quiet)
    assert "made with another base config (gamma: 2.0 then, 4.0 now; loss: 'ce' then, 'focal' now)" in str(caught.value)
    assert states(trials_of(config)) == {"COMPLETE": 6} and (tmp_path / "s" / "summary.csv").read_text() == summary
    assert yaml.safe_load((tmp_path / "s" / "base_config.yaml").read_text())["loss"] == "ce"

    # The same settings given another way (another file, an override) resolve the same and resume.
    moved = tmp_path / "moved.yaml"
    moved.write_text("gamma: 4.0\n")
    same = replace(more, base=str(moved), base_overrides=("loss=ce", "gamma=2.0"))
    run_sweep(same, backend=STANDIN, log=_quiet)
    assert states(trials_of(config)) == {"COMPLETE": 9}


def test_a_study_made_by_an_earlier_kit_resumes_and_is_then_checked(tmp_path):
    """A record without base_config (made before it was recorded) is completed; fine-tune settings
    added or dropped by an update of the kit since (a key on one side only) do not block a resume."""
    config = sweep_config(tmp_path / "s")
    run_sweep(config, backend=STANDIN, log=_quiet)
    study = optuna.load_study(study_name="t", storage=open_storage(config, tmp_path / "s"))
    record = study.user_attrs["sweep"]
    study.set_user_attr("sweep", {key: value for key, value in record.items() if key != "base_config"})
    run_sweep(replace(config, study=replace(config.study, n_trials=7)), backend=STANDIN, log=_quiet)
    assert study.user_attrs["sweep"] == record  # recorded now
    with pytest.raises(SweepError, match=r"another base config \(gamma: 2.0 then, 3.0 now\)"):
        run_sweep(replace(config, base_overrides=("gamma=3.0",)), backend=STANDIN, log=_quiet)

    older = {key: value for key, value in record["base_config"].items() if key != "sleep"}
    study.set_user_attr("sweep", {**record, "base_config": {**older, "dropped_since": 1}})
    run_sweep(replace(config, study=replace(config.study, n_trials=8)), backend=STANDIN, log=_quiet)
    assert states(trials_of(config)) == {"COMPLETE": 8}


def test_a_space_point_the_finetune_rejects_fails_that_trial_only(tmp_path):
    space = [SPACE[0], {"key": "fusion", "type": "categorical", "choices": ["concat", "bogus"]}]
    config = sweep_config(tmp_path / "s", space=space, study={"n_trials": 4, "max_failures": 50})
    with pytest.raises(SweepError, match="space\\[fusion\\] = 'bogus'"):
        run_sweep(config, backend=STANDIN, log=_quiet)  # the upfront check names it


def test_failing_trials_stop_the_worker_with_the_last_error(tmp_path):
    def broken(config, *, out_dir, epoch_callback=None):
        raise RuntimeError("the GPU caught fire")

    config = sweep_config(tmp_path / "s", study={"max_failures": 2})
    with pytest.raises(SweepError, match="2 trials failed.*the GPU caught fire"):
        run_sweep(config, backend=Backend(standin_load_config, broken), log=_quiet)
    assert states(trials_of(config)) == {"FAIL": 2}


def test_trials_optuna_fails_itself_are_logged_with_their_own_reason(tmp_path):
    # Trial 1's folder cannot be made (a file is in the way) and trial 2 returns NaN: before, the first
    # was failed outside the objective's error handling and the second by Optuna alone, and both were
    # logged (and counted against max_failures) with trial 0's reason.
    def varied(config, *, out_dir, epoch_callback=None):
        number = int(Path(out_dir).name.removeprefix("trial-"))
        if number == 0:
            (Path(out_dir).parent / "trial-0001").write_text("in the way")
            raise RuntimeError("out of memory")
        document = standin_run(config, out_dir=out_dir, epoch_callback=epoch_callback)
        if number == 2:
            document["dev"]["macro_f1"] = float("nan")
        return document

    config = sweep_config(tmp_path / "s", study={"n_trials": 4, "max_failures": 50})
    lines: list[str] = []
    run_sweep(config, backend=Backend(standin_load_config, varied), log=lines.append)
    reasons = {t.number: t.user_attrs.get("fail_reason") for t in trials_of(config) if t.state == TrialState.FAIL}
    assert set(reasons) == {0, 1, 2}
    assert reasons[0] == "RuntimeError: out of memory"
    assert reasons[1].startswith("FileExistsError: ") and "trial-0001" in reasons[1]
    assert reasons[2] == "dev macro_f1 is nan (a run that diverged)"
    for number, reason in reasons.items():
        assert any(line.startswith(f"trial {number:4d} failed: {reason} (") for line in lines), lines


def test_a_failed_trial_keeps_its_reason_in_the_study_and_the_summary(tmp_path):
    def gated_breaks(config, *, out_dir, epoch_callback=None):
        if config.fusion == "gated":
            raise RuntimeError("out of memory\nin the gated block")
        return standin_run(config, out_dir=out_dir, epoch_callback=epoch_callback)

    config = sweep_config(tmp_path / "s", study={"n_trials": 6, "max_failures": 50})
    run_sweep(config, backend=Backend(standin_load_config, gated_breaks), log=_quiet)
    trials = trials_of(config)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["fusion"] == "gated" for t in failed)
    assert {t.user_attrs["fail_reason"] for t in failed} == {"RuntimeError: out of memory\nin the gated block"}
    assert all("fail_reason" not in t.user_attrs for t in trials if t.state == TrialState.COMPLETE)
    import csv

    with open(tmp_path / "s" / "summary.csv", newline="") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    for trial in trials:
        assert rows[str(trial.number)]["fail_reason"] == trial.user_attrs.get("fail_reason", "")
    markdown = (tmp_path / "s" / "summary.md").read_text()
    assert f"| {failed[0].number} | fail |" in markdown and "RuntimeError: out of memory in the gated block" in markdown


def test_an_interrupted_trial_says_so_and_a_rerun_replaces_it(tmp_path):
    def interrupted_at_trial_2(config, *, out_dir, epoch_callback=None):
        if out_dir.name == "trial-0002":
            raise KeyboardInterrupt  # Ctrl-C during the run
        return standin_run(config, out_dir=out_dir, epoch_callback=epoch_callback)

    config = sweep_config(tmp_path / "s", study={"n_trials": 4})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, backend=Backend(standin_load_config, interrupted_at_trial_2), log=_quiet)
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 2, "FAIL": 1}
    assert trials[2].user_attrs["fail_reason"] == "interrupted (KeyboardInterrupt)"
    run_sweep(config, backend=STANDIN, log=_quiet)
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 4, "FAIL": 1} and trials[2].state == TrialState.FAIL
    import csv

    with open(tmp_path / "s" / "summary.csv", newline="") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    assert (rows["2"]["state"], rows["2"]["fail_reason"]) == ("fail", "interrupted (KeyboardInterrupt)")


def test_a_point_whose_batch_the_data_cannot_fill_fails_alone(tmp_path):
    # A searched batch_size above a small training set: that trial fails with the reason; the others run.
    def gated_does_not_fit(config, *, out_dir, epoch_callback=None):
        if config.fusion == "gated":
            check_fits(TrainConfig(batch_size=64), train_size=40)
        return standin_run(config, out_dir=out_dir, epoch_callback=epoch_callback)

    config = sweep_config(tmp_path / "s", study={"n_trials": 6, "max_failures": 50})
    backend = Backend(standin_load_config, gated_does_not_fit, point_errors=(BatchDoesNotFit,))
    run_sweep(config, backend=backend, log=_quiet)
    trials = trials_of(config)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and {t.params["fusion"] for t in failed} == {"gated"}
    assert {t.user_attrs["fail_reason"] for t in failed} == {
        "BatchDoesNotFit: train: 40 training samples make no full step of batch_size 64 x accumulation 1 x 1 "
        "process(es); lower batch_size"}
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    # Without point_errors the same error is the user's mistake: the sweep stops at it.
    with pytest.raises(SweepError, match="no full step of batch_size 64"):
        run_sweep(sweep_config(tmp_path / "t"), backend=Backend(standin_load_config, gated_does_not_fit), log=_quiet)
    assert finetune_backend().point_errors == (BatchDoesNotFit,)


def test_a_bad_objective_metric_stops_the_sweep(tmp_path):
    config = sweep_config(tmp_path / "s", objective={"metric": "macro_f2"})
    with pytest.raises(SweepError, match="no 'macro_f2'"):
        run_sweep(config, backend=STANDIN, log=_quiet)


# ---- pruning


@pytest.mark.parametrize("pruner, latest_epoch", [
    ({"type": "median", "n_startup_trials": 3}, 1),
    # Hyperband's brackets start at different rungs (1 or 3 epochs here), so some judge later.
    ({"type": "hyperband", "min_resource": 1, "reduction_factor": 3}, 3),
])
def test_bad_region_trials_are_pruned_early(tmp_path, pruner, latest_epoch):
    config = sweep_config(tmp_path / "s", pruner=pruner, study={"n_trials": 24})
    run_sweep(config, backend=STANDIN, log=_quiet)
    trials = trials_of(config)
    bad = [t for t in trials if t.params["train.lr"] > BAD_LR]
    startup = {t.number for t in sorted(trials, key=lambda t: t.number)[:4]}
    judged = [t for t in bad if t.number not in startup]
    assert judged, "the seed should sample the bad region"
    for trial in judged:
        assert trial.state == TrialState.PRUNED and trial.last_step <= latest_epoch, (trial.number, trial.last_step)
    assert max((t for t in trials if t.value is not None), key=lambda t: t.value).params["train.lr"] <= BAD_LR


# ---- storage, several workers, a killed worker


def test_sqlite_storage_commits_through_a_synced_write_ahead_log(tmp_path):
    config = sweep_config(tmp_path / "s", study={"storage": ""})
    (tmp_path / "s").mkdir()
    storage = open_storage(config, tmp_path / "s")
    optuna.create_study(storage=storage, study_name="t")
    with storage.engine.connect() as connection:
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    assert (mode, synchronous) == ("wal", 2)  # 2 = FULL: every commit is on disk before it returns
    assert (tmp_path / "s" / "study.db").is_file()



@pytest.mark.parametrize("storage", ["", "journal"])
def test_two_workers_share_the_study_without_duplicates_or_losses(tmp_path, storage):
    study_dir = tmp_path / "s"
    storage = f"journal:{tmp_path / 'study.log'}" if storage else ""
    config = sweep_config(study_dir, study={"n_trials": 10, "workers": 2, "storage": storage},
                          base_overrides=["sleep=0.05"])
    run_sweep(config, backend=STANDIN, log=_quiet)
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 10}
    assert sorted(t.number for t in trials) == list(range(10))
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers  # both took trials
    dirs = sorted(t.user_attrs["run_dir"] for t in trials)
    assert dirs == [f"trials/trial-{n:04d}" for n in range(10)]
    assert all((study_dir / d / "metrics.json").is_file() for d in dirs)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_workers_that_start_together_on_one_study_sample_different_points(tmp_path, sampler):
    """The same command started at once on two machines (both worker 0, both seeing an empty study)."""
    config = sweep_config(tmp_path / "s", sampler={"type": sampler})
    (tmp_path / "s").mkdir()
    first, second = open_study(config, tmp_path / "s", STANDIN), open_study(config, tmp_path / "s", STANDIN)
    points = [suggest(study.ask(), config.space)["train.lr"] for study in (first, second, first, second)]
    assert len(set(points)) == 4, points
    # One worker's points still follow from sampler.seed alone.
    again = sweep_config(tmp_path / "t", sampler={"type": sampler})
    (tmp_path / "t").mkdir()
    study = open_study(again, tmp_path / "t", STANDIN)
    assert [suggest(study.ask(), again.space)["train.lr"] for _ in range(4)] == points


def test_worker_device_spreads_auto_over_the_gpus_and_keeps_a_named_device():
    assert [worker_device(i, "auto", 2) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_device(1, "auto", 1) is None and worker_device(1, "auto", 0) is None  # auto is already right
    assert worker_device(1, "cuda:3", 4) is None and worker_device(0, "cpu", 4) is None


def test_local_workers_on_a_machine_with_two_gpus_each_take_one(tmp_path, monkeypatch):
    import torch

    # The choice is made in the parent and handed to each worker; the stand-in only records its device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    study_dir = tmp_path / "s"
    config = sweep_config(study_dir, study={"n_trials": 10, "workers": 2}, base_overrides=["sleep=0.05"])
    run_sweep(config, backend=STANDIN_GPU, log=_quiet)
    devices: dict[str, set[str]] = {}
    for trial in trials_of(config):
        saved = yaml.safe_load((study_dir / trial.user_attrs["run_dir"] / "config.yaml").read_text())
        devices.setdefault(trial.user_attrs["worker"], set()).add(saved["train"]["device"])
    assert sorted(devices.values(), key=sorted) == [{"cuda:0"}, {"cuda:1"}], devices
    # A device the user set is left alone.
    config = sweep_config(tmp_path / "t", study={"n_trials": 2, "workers": 2}, base_overrides=["train.device=cpu"])
    run_sweep(config, backend=STANDIN_GPU, log=_quiet)
    for trial in trials_of(config):
        saved = yaml.safe_load((tmp_path / "t" / trial.user_attrs["run_dir"] / "config.yaml").read_text())
        assert saved["train"]["device"] == "cpu"


def _sweep_subprocess(config: SweepConfig, env: dict) -> subprocess.Popen:
    code = ("import sys, json; from clara import config as c; from meld.sweep_config import SweepConfig; "
            "from meld.sweep import run_sweep; from tests.meld.test_sweep import STANDIN; "
            "run_sweep(c.from_dict(SweepConfig, json.loads(sys.argv[1])), backend=STANDIN)")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(config_lib.to_dict(config))], cwd=REPO_ROOT,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("storage", ["", "journal"])
def test_a_killed_worker_leaves_a_consistent_study_that_a_rerun_completes(tmp_path, storage):
    study_dir = tmp_path / "s"
    storage = f"journal:{tmp_path / 'study.log'}" if storage else ""
    config = sweep_config(study_dir, study={"n_trials": 6, "storage": storage, "heartbeat_interval": 1,
                                            "grace_period": 2})
    worker = _sweep_subprocess(config, {HANG_ENV: "trial-0003"})
    hanging = study_dir / "trials" / "trial-0003" / "hanging"
    deadline = time.monotonic() + 60
    while not hanging.exists():
        assert worker.poll() is None, worker.stderr.read().decode()
        assert time.monotonic() < deadline, "the worker never reached trial 3"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 3, "RUNNING": 1}  # consistent: three results and the one cut short
    lines = []
    run_sweep(config, backend=STANDIN, log=lines.append)
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 6, "FAIL": 1}
    assert next(t for t in trials if t.number == 3).state == TrialState.FAIL
    assert any("trial 3: its worker stopped" in line for line in lines), lines
    assert next(t for t in trials if t.number == 3).user_attrs["fail_reason"] == "its worker stopped: no heartbeat for 2 s"
    assert len({t.user_attrs["run_dir"] for t in trials}) == 7


@pytest.mark.parametrize("at_epoch", [3, 6])  # mid-run (its next report is refused), or after its last report
def test_a_worker_whose_trial_another_worker_judged_dead_drops_it_and_goes_on(tmp_path, at_epoch):
    """A worker silent past grace_period (a stalled disk, a suspended machine) whose trial another worker
    has marked failed: its tell is then refused, and it must drop that result and go on, not crash."""
    from meld.sweep_worker import fail_stale_trials

    config = sweep_config(tmp_path / "s", study={"n_trials": 4})

    def judged_dead(run_config, *, out_dir, epoch_callback=None):
        def callback(epoch, dev_metrics):
            epoch_callback(epoch, dev_metrics)
            if out_dir.name == "trial-0001" and epoch == at_epoch:
                # What another worker does once this trial's heartbeat looks older than grace_period.
                other = optuna.load_study(study_name="t", storage=open_storage(config, tmp_path / "s"))
                fail_stale_trials(other, -1, lambda number: None)

        return standin_run(run_config, out_dir=out_dir, epoch_callback=callback)

    lines = []
    result = run_sweep(config, backend=Backend(standin_load_config, judged_dead), log=lines.append)
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 4, "FAIL": 1} and result["counts"] == {"COMPLETE": 4, "FAIL": 1}
    dropped = next(t for t in trials if t.number == 1)
    assert dropped.state == TrialState.FAIL and dropped.value is None
    assert dropped.user_attrs["fail_reason"] == "its worker stopped: no heartbeat for -1 s"
    assert sum("was marked failed by another worker; its result is dropped" in line for line in lines) == 1, lines
    assert sorted(t.number for t in trials if t.state == TrialState.COMPLETE) == [0, 2, 3, 4]


# ---- the command line


def test_cli_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("meld.sweep.finetune_backend", lambda: STANDIN)
    for argv in (["--config", str(tmp_path / "missing.yaml")], ["study.n_trials=0"], ["nope=1"],
                 ["--workers", "0"], ["--storage", "mysql-ish", "--study-dir", str(tmp_path / "x")],
                 ["--storage", "postgresql://bob:secret@127.0.0.1:1/optuna", "--study-dir", str(tmp_path / "y")],
                 ["--storage", "sqlite:///", "--study-dir", str(tmp_path / "z")]):  # sqlite:///$UNSET: in memory
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert "secret" not in err


def test_unusable_storage_and_study_paths_are_named(tmp_path):
    (tmp_path / "file").touch()
    for study, message in (
        ({"storage": f"journal:{tmp_path}"}, f"storage journal:{tmp_path}: Is a directory: {tmp_path}"),
        ({"storage": f"journal:{tmp_path / 'file' / 'study.log'}"},
         f"storage journal:{tmp_path / 'file' / 'study.log'}: File exists: {tmp_path / 'file'}"),
        ({"dir": str(tmp_path / "file")}, f"{tmp_path / 'file'}: exists and is not a folder"),
        ({"storage": "sqlite:///:memory:"}, "storage sqlite:///:memory:: an in-memory SQLite database cannot hold "
         "a study; give a file, e.g. sqlite:///runs/sweeps/study.db, or leave --storage out for STUDY_DIR/study.db"),
    ):
        with pytest.raises((SweepError, ConfigError)) as caught:
            run_sweep(sweep_config(tmp_path / "s", study=study), backend=STANDIN, log=_quiet)
        assert str(caught.value) == message


def test_a_study_folder_holding_something_else_is_refused_untouched(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["--study-dir", str(busy), "--trials", "1"]) == 2
    assert capsys.readouterr().err == f"error: {busy} exists and is not a meld.sweep run; give an empty or new folder\n"
    assert sorted(path.name for path in busy.iterdir()) == ["notes.txt"]
    # A mistake in the space is found before the folder is made.
    assert main(["--study-dir", str(tmp_path / "new"), "base_overrides=[trian.lr=0.1]"]) == 2
    assert "trian" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_data_and_checkpoint_flags_fix_them_for_every_trial(tmp_path, monkeypatch):
    seen = {}

    def fake_run(config, **kwargs):
        seen["config"] = config
        raise SweepError("stop here")

    monkeypatch.setattr("meld.sweep.run_sweep", fake_run)
    # Names that YAML would read as something else: a comment, a mapping, a number.
    data, checkpoint = tmp_path / "MELD #2: raw", tmp_path / "2024"
    data.mkdir()
    checkpoint.write_bytes(b"")
    assert main(["--data", str(data), "--checkpoint", str(checkpoint), "--study-dir", str(tmp_path / "study")]) == 2
    overrides = seen["config"].base_overrides
    assert "train.epochs=10" in overrides  # the config's own base overrides stay
    trial = trial_config(seen["config"], finetune_backend(), {})
    assert (trial.data_root, trial.model.checkpoint) == (str(data), str(checkpoint))


def test_a_missing_data_folder_is_refused_before_any_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("meld.sweep.run_sweep", lambda config, **kwargs: pytest.fail("the sweep started"))
    assert main(["--data", str(tmp_path / "nowhere"), "--study-dir", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --data {tmp_path / 'nowhere'}: no such file or folder\n"
    assert not (tmp_path / "study").exists()


# ---- with the real fine-tune


def test_a_linear_probe_sweep_on_the_demo_with_the_real_finetune(tmp_path):
    from tests.meld.finetune_helpers import small_demo

    root, cache = small_demo()
    base_overrides = [f"data_root={json.dumps(str(root))}", f"cache_root={json.dumps(str(cache))}", "threads=1",
                      "train.epochs=2", "train.batch_size=4", "train.warmup_steps=1", "train.progress=false"]
    config = config_lib.from_dict(SweepConfig, {
        "base": "linear_probe", "base_overrides": base_overrides,
        "space": [{"key": "train.lr", "type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                  {"key": "model.fusion", "type": "categorical", "choices": ["concat", "gated"]}],
        "study": {"name": "real", "dir": str(tmp_path / "s"), "n_trials": 2, "plots": False},
        "final": {"seeds": 2},
    })
    result = run_sweep(config, log=_quiet)
    study_dir = tmp_path / "s"
    trials = trials_of(config)
    assert states(trials) == {"COMPLETE": 2} and all(t.intermediate_values.keys() == {1, 2} for t in trials)
    for trial in trials:  # light runs: scalars and hparams, no figures, PR curves or projector
        run = study_dir / trial.user_attrs["run_dir"]
        assert (run / "metrics.json").is_file() and (run / "stdout.log").read_text()
        scalars, images, tensors, plugins = dashboards(run / "tensorboard")
        assert "eval/macro_f1" in scalars and "hparams/dev/macro_f1" in scalars, scalars  # epoch curves, HParams
        assert plugins == {"hparams"} and not images and not any(tag.startswith("test/pr/") for tag in tensors)
        assert not (run / "confusion_test.png").exists() and not list(run.rglob("projector_config.pbtxt"))
    from meld.finetune import load_config

    best = load_config(str(study_dir / "best_config.yaml"), [])
    assert best.train.lr == pytest.approx(result["best"]["params"]["train.lr"]) and best.outputs == "full"
    final = json.loads((study_dir / "final.json").read_text())
    assert final["mean_std"]["runs"] == 2 and 0 <= final["mean_std"]["test"]["macro_f1"]["mean"] <= 1
    for seed in final["seeds"]:  # the best config's runs: the full report
        run = study_dir / final["dir"] / f"seed-{seed}"
        scalars, images, tensors, plugins = dashboards(run / "tensorboard")
        assert {"dev/confusion_matrix", "test/confusion_matrix"} <= images and plugins == {"hparams", "pr_curves"}
        assert list(run.rglob("projector_config.pbtxt")) and (run / "confusion_test.png").is_file()
        assert "confusion_test.png" in (run / "report.md").read_text()


def test_a_final_run_is_reused_by_the_fine_tunes_resume_rule(tmp_path, monkeypatch):
    """Exact config.yaml equality would run an hours-long final run again for a --data spelt otherwise
    (relative, not absolute) or another train.num_workers; the fine-tune's own resume rule lets those differ."""
    from meld.finetune import run_finetune
    from meld.sweep_study import _same_finetune_run
    from tests.meld.finetune_helpers import text_config, write_csv_meld

    root = write_csv_meld(tmp_path / "meld")
    run_dir = tmp_path / "final" / "seed-0"
    config = text_config(root, "train.epochs=1")
    run_finetune(config, out_dir=run_dir)
    monkeypatch.chdir(tmp_path)
    assert _same_finetune_run(run_dir, config_lib.replace(config, ["data_root=meld", "train.num_workers=1"]))
    assert not _same_finetune_run(run_dir, config_lib.replace(config, ["train.lr=0.5"]))
    assert not _same_finetune_run(tmp_path / "final", config)  # no run there

