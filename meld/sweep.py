"""``python -m meld.sweep``: Optuna sweeps over fine-tuning, resumable, parallel, pruned on a dev metric.

    python -m meld.sweep [--config YAML] [--study-dir DIR] [--storage URL] [--workers N] [--trials N]
                         [--data MELD_ROOT] [--checkpoint CKPT] [key=value ...]

Without ``--config`` the settings come from ``configs/sweep/fast.yaml``: linear-probe trials on the
demo's cached embeddings, under a second each. Every trial is one ``meld.finetune`` run in
STUDY_DIR/trials/trial-NNNN/ (its config, metrics, report and TensorBoard events, hparams included),
written light (``study.trial_outputs``: no figures, PR curves or projector); after each epoch the
trial reports its dev metric, so the pruner can stop a hopeless one early.

Storage: STUDY_DIR/study.db (SQLite) by default; any Optuna RDB URL (``postgresql://...``), or
``journal:PATH`` (an append-only file, for workers on several machines that share a folder). Every
worker on the same storage and study name joins the same study, and running the same command again
resumes it: it only adds trials until ``study.n_trials`` are finished (complete or pruned); a rerun whose
base config (resolved: an edited base YAML counts), space or objective differs is refused. A trial
whose worker died (its heartbeat went silent for ``study.grace_period`` seconds) is marked failed and
replaced. As it starts, the study folder gets ``sweep_config.yaml`` (this command's settings) and
``base_config.yaml`` (the fine-tune config every trial starts from, resolved).

When the study is complete the study folder gets ``best_config.yaml`` (ready for ``python -m
meld.finetune --config``), ``summary.md`` and ``summary.csv`` (every trial), Optuna's plots, and
``final/``: the best config re-run with ``final.seeds`` fresh seeds and scored on test, the only time test
is looked at, reported as mean ± std. The final runs write everything a fine-tune writes (full outputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from clara import config as config_lib
from clara.cli import describe
from clara.config import ConfigError
from clara.io_utils import atomic_write_text
from clara.model_config import CONFIG_ROOT
from clara.run_dir import claim, saved_config, shared_run
from meld.errors import MeldDataError
from meld.metrics import mean_std
from meld.report import seed_cell, spread_label
from meld.sweep_config import SweepConfig
from meld.sweep_plots import write_plots
from meld.sweep_study import (
    FINISHED, Backend, SweepError, base_config, check_space, check_trial_dirs, final_seed, finetune_backend,
    open_study, outputs_override, override, shown_url, storage_url, trial_config,
)
from meld.sweep_summary import write_summary
from meld.sweep_worker import FileLock, run_workers, short

DEFAULT_CONFIG = CONFIG_ROOT / "sweep" / "fast.yaml"


def load_sweep_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SweepConfig:
    return config_lib.load(SweepConfig, path if path is not None else DEFAULT_CONFIG, overrides)


def run_final(config: SweepConfig, backend: Backend, study_dir: Path, best: FrozenTrial,
              log: Callable[[str], None]) -> dict | None:
    """Re-run the best trial's config with ``final.seeds`` fresh seeds; each run is scored once on test.

    The seeds follow the trial's own: its run was picked for its dev score, so re-running its seed would
    bring that luck back into the mean.
    """
    if config.final.seeds == 0:
        return None
    base = trial_config(config, backend, best.params)
    trial_seed = final_seed(config, base)
    seeds = list(range(trial_seed + 1, trial_seed + 1 + config.final.seeds))
    final_dir = study_dir / "final" / f"trial-{best.number:04d}"
    documents = []
    with FileLock(study_dir / "final.lock"):  # workers on other machines finishing too wait, then reuse
        for seed in seeds:
            run_dir = final_dir / f"seed-{seed}"
            metrics_path = run_dir / "metrics.json"
            run_config = trial_config(config, backend, best.params,
                                      [override(config.final.seed_key, seed), *outputs_override(backend, "full")])
            if run_dir.exists() and not _same_run(backend, run_dir, run_config):
                # A run of other settings (another final.seed_key, an edited base file, an earlier study
                # in this folder): run again. Set aside in one rename first, so that a kill while it is
                # removed leaves no part of it to be taken for a run of these settings.
                log(f"final: {run_dir} holds a run of other settings; running it again")
                stale = run_dir.with_name(f"{run_dir.name}.stale")
                shutil.rmtree(stale, ignore_errors=True)
                run_dir.rename(stale)
                shutil.rmtree(stale)
            elif metrics_path.is_file():
                documents.append(json.loads(metrics_path.read_text(encoding="utf-8")))
                continue
            log(f"final: best trial {best.number} with seed {seed} -> {run_dir}")
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "stdout.log", "a", encoding="utf-8") as out, redirect_stdout(out):
                documents.append(backend.run_finetune(run_config, out_dir=run_dir))
    return {"trial": best.number, "seeds": seeds, "dir": str(final_dir.relative_to(study_dir)),
            "mean_std": mean_std([{"dev": d["dev"], "test": d["test"]} for d in documents])}


def _same_run(backend: Backend, run_dir: Path, run_config: Any) -> bool:
    """Whether ``run_dir`` holds a run (finished or not) that ``run_config`` resumes or reuses: by the
    backend's rule, or else by its config.yaml equal to ``run_config``."""
    if backend.same_run is not None:
        return backend.same_run(run_dir, run_config)
    saved = saved_config(run_dir, type(run_config))
    return saved is not None and config_lib.to_dict(saved) == config_lib.to_dict(run_config)


def write_best_config(config: SweepConfig, backend: Backend, study: optuna.Study, study_dir: Path) -> Path:
    best = study.best_trial
    path = study_dir / "best_config.yaml"
    header = (f"# Best trial {best.number} of sweep {study.study_name!r}: dev {config.objective.metric} "
              f"{best.value:.4f}.\n# Run it: python -m meld.finetune --config {path}\n")
    body = yaml.safe_dump(config_lib.to_dict(trial_config(config, backend, best.params)), sort_keys=False)
    atomic_write_text(path, header + body)
    return path


def write_settings(config: SweepConfig, backend: Backend, study: optuna.Study, study_dir: Path) -> None:
    """Record, as the sweep starts, the settings it runs with: ``sweep_config.yaml`` (this command's, for
    ``--config``) and ``base_config.yaml`` (the fine-tune config every trial starts from, resolved; the
    study refuses a rerun whose base resolves otherwise, so it holds for every trial)."""
    atomic_write_text(study_dir / "sweep_config.yaml",
                      f"# The settings of the latest run of sweep {study.study_name!r} "
                      "(python -m meld.sweep --config).\n"
                      + yaml.safe_dump(config_lib.to_dict(config), sort_keys=False))
    atomic_write_text(study_dir / "base_config.yaml",
                      f"# The fine-tune config every trial of sweep {study.study_name!r} starts from (base, then "
                      "base_overrides), resolved;\n# each trial's sampled values and study.trial_outputs go on top "
                      "(trials/*/config.yaml).\n"
                      + yaml.safe_dump(base_config(config, backend), sort_keys=False))


def run_sweep(config: SweepConfig, *, backend: Backend | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the sweep to ``study.n_trials`` finished trials, then write its outputs.

    Returns ``{"study_dir", "counts", "best" (trial number, value, params), "final" (or None), "plots"}``.
    """
    backend = backend or finetune_backend()
    try:
        return _run_sweep(config, backend, log)
    except backend.user_errors as err:  # the fine-tune's own one-line errors (missing data, a bad checkpoint)
        raise SweepError(str(err)) from err


# What a study folder holds from its first moments: the default SQLite storage, or the lock every
# worker takes before its first trial (with a storage elsewhere); then trials and reports.
STUDY_FILES = ("study.db", "sweep_config.yaml", "base_config.yaml", "ask.lock", "trials", "final.json", "summary.md",
               "best_config.yaml")


def holds_study(path: Path) -> bool:
    """Whether ``path`` is a sweep's study folder (to resume or join), by the files a sweep writes."""
    return any((path / name).exists() for name in STUDY_FILES)


def _run_sweep(config: SweepConfig, backend: Backend, log: Callable[[str], None]) -> dict:
    study_dir = Path(config.study.dir).resolve()
    # Before anything is written: a folder holding something else is refused (a sweep would mix its
    # trials, plots and reports in), and a mistake in the space leaves no study folder behind.
    claim(study_dir, "meld.sweep", holds_study, shared=True)  # other sweep commands may be working in it
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line of ours instead
    check_space(config, backend)
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # no permission, a read-only disk
        raise SweepError(f"study.dir {study_dir}: {err.strerror or err}: {err.filename or study_dir}") from None
    with shared_run(study_dir):  # another sweep command's claim leaves this one's writes in progress alone
        return _run_study(config, backend, study_dir, log)


def _run_study(config: SweepConfig, backend: Backend, study_dir: Path, log: Callable[[str], None]) -> dict:
    """The trials (every worker's), the best trial's config, plots, the final runs and the summary."""
    study = open_study(config, study_dir, backend)
    check_trial_dirs(study, study_dir)
    write_settings(config, backend, study, study_dir)
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    finished = sum(states[s] for s in FINISHED)
    log(f"study {config.study.name!r} in {shown_url(storage_url(config, study_dir))}: {finished} of "
        f"{config.study.n_trials} trials finished; {config.study.workers} worker(s); "
        f"trial runs in {study_dir / 'trials'}")
    run_workers(config, study_dir, backend, log)

    trials = study.get_trials(deepcopy=False)
    counts = {state.name: n for state, n in Counter(t.state for t in trials).items()}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    result: dict[str, Any] = {"study_dir": str(study_dir), "counts": counts, "best": None, "final": None}
    if complete:
        best = study.best_trial
        result["best"] = {"number": best.number, "value": best.value, "params": best.params}
        write_best_config(config, backend, study, study_dir)
    result["plots"] = write_plots(study, study_dir, log) if config.study.plots else []
    if complete:
        result["final"] = run_final(config, backend, study_dir, study.best_trial, log)
    write_summary(study, config, study_dir, result)
    return result


def _print_result(result: dict, config: SweepConfig) -> None:
    study_dir = Path(result["study_dir"])
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result["counts"].items()))
    print(f"trials: {counts}")
    best = result["best"]
    if best is None:
        print("no trial completed, so there is no best config")
    else:
        params = " ".join(f"{k}={short(v)}" for k, v in best["params"].items())
        print(f"best trial {best['number']}: dev {config.objective.metric} {best['value']:.4f}  {params}")
        print(f"best config: {study_dir / 'best_config.yaml'}")
    final = result["final"]
    if final is not None:
        stats = final["mean_std"]
        test, dev, runs = stats["test"], stats["dev"], stats["runs"]
        print(f"best config over seeds {final['seeds']}: dev macro-F1 {seed_cell(dev['macro_f1'], runs)}, test macro-F1 "
              f"{seed_cell(test['macro_f1'], runs)}, test weighted-F1 {seed_cell(test['weighted_f1'], runs)} "
              f"(percent, {spread_label(runs)})")
    print(f"summary: {study_dir / 'summary.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meld.sweep", description=describe(__doc__))
    parser.add_argument("--config", help=f"a sweep YAML (default: {DEFAULT_CONFIG.relative_to(CONFIG_ROOT.parent)})")
    parser.add_argument("--study-dir", help="the study folder (study.dir): trials/, study.db, summary, plots "
                        "(default: the config's, runs/sweeps/fast-demo for the demo)")
    parser.add_argument("--storage", help="study.storage: an Optuna RDB URL or journal:PATH "
                        "(default: STUDY_DIR/study.db)")
    parser.add_argument("--workers", type=int, help="study.workers: local worker processes (default: the config's, 1)")
    parser.add_argument("--trials", type=int, help="study.n_trials: finished trials to reach (default: the config's, 50)")
    parser.add_argument("--data", help="a MELD folder for every trial (adds data_root=DATA to base_overrides)")
    parser.add_argument("--checkpoint", help="a CLARA checkpoint for every trial (adds model.checkpoint=CKPT)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. pruner.type=hyperband final.seeds=5")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_sweep_config(args.config, args.overrides)
        flags = {"dir": args.study_dir, "storage": args.storage, "workers": args.workers, "n_trials": args.trials}
        flags = {key: value for key, value in flags.items() if value is not None}
        for flag, value in (("--data", args.data), ("--checkpoint", args.checkpoint)):
            if value and not Path(value).exists():  # before any trial is recorded against it
                raise SweepError(f"{flag} {value}: no such file or folder")
        fixed = tuple(override(key, value) for key, value in (("data_root", args.data),
                                                               ("model.checkpoint", args.checkpoint)) if value)
        config = dataclasses.replace(config, base_overrides=config.base_overrides + fixed,
                                     study=dataclasses.replace(config.study, **flags))
        result = run_sweep(config)
    except (SweepError, ConfigError, MeldDataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept in the study; run the same command again to go on",
              file=sys.stderr)
        return 130
    _print_result(result, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

