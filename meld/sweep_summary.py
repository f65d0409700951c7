"""A sweep's tables: summary.csv (one row per trial) and summary.md (best trial, final seeds, plots, trials).

Trial values are the objective on dev as the fine-tune computed it; test numbers appear only for the
final re-runs of the best config (mean ± std over seeds), which is the one time test is scored.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from clara.io_utils import atomic_write_text
from meld.report import seed_rows, spread_label
from meld.sweep_config import SweepConfig
from meld.sweep_worker import FAIL_REASON


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def trial_rows(trials: Sequence[FrozenTrial], config: SweepConfig) -> tuple[list[str], list[list[str]]]:
    """The trial table: number, state, value, seconds, epochs reported, each searched key, run folder, and
    why a failed trial failed."""
    keys = [param.key for param in config.space]
    header = ["trial", "state", f"dev {config.objective.metric}", "seconds", "epochs", *keys, "run_dir", "fail_reason"]
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        seconds = f"{trial.duration.total_seconds():.1f}" if trial.duration else ""
        epochs = str(len(trial.intermediate_values)) if trial.intermediate_values else ""
        rows.append([str(trial.number), trial.state.name.lower(), _cell(trial.value), seconds, epochs,
                     *(_cell(trial.params.get(key)) for key in keys), trial.user_attrs.get("run_dir", ""),
                     trial.user_attrs.get(FAIL_REASON, "")])
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # A failure reason may span lines; a table row may not.
    return lines + ["| " + " | ".join(" ".join(cell.split("\n")).replace("|", "\\|") for cell in row) + " |"
                    for row in rows]


def _final_lines(final: Mapping) -> list[str]:
    stats = final["mean_std"]
    splits, rows = seed_rows(stats, list(stats["test"]["per_class"]))
    return [f"## The best config over {len(final['seeds'])} seeds",
            "",
            f"Trial {final['trial']}'s config re-run with seeds {', '.join(map(str, final['seeds']))} "
            f"(runs in `{final['dir']}/`); test is scored here only, once per seed. Percent, "
            f"{spread_label(stats['runs'])}.",
            "",
            *_markdown_table(["metric", *splits], rows)]


def render_summary_md(study: optuna.Study, config: SweepConfig, result: Mapping) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state for t in trials)
    metric = config.objective.metric
    lines = [f"# Sweep `{study.study_name}`", "",
             f"Objective: dev {metric} ({config.objective.direction}). Pruner: {config.pruner.type}. "
             f"Sampler: {config.sampler.type} (seed {config.sampler.seed}). Trials: "
             + ", ".join(f"{counts[state]} {state.name.lower()}" for state in TrialState if counts[state]) + ".", ""]
    best = result.get("best")
    if best is None:
        lines += ["No trial completed, so there is no best config.", ""]
    else:
        lines += [f"**Best: trial {best['number']}, dev {metric} {best['value']:.4f}** "
                  f"(run `trials/trial-{best['number']:04d}/`; ready-to-run config `best_config.yaml`).", "",
                  *_markdown_table(["parameter", "value"], [[k, _cell(v)] for k, v in best["params"].items()]), ""]
    if result.get("final"):
        lines += [*_final_lines(result["final"]), ""]
    plots = result.get("plots", [])
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines.append(f"- [{plot.name}]({plot.file})" if plot.file else f"- {plot.name}: not drawn ({plot.error})")
        lines.append("")
    header, rows = trial_rows(trials, config)
    lines += ["## Trials", "", *_markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def write_summary(study: optuna.Study, config: SweepConfig, study_dir: Path, result: Mapping) -> None:
    """summary.csv, summary.md and, after the final runs, final.json (the seeds' mean ± std)."""
    header, rows = trial_rows(study.get_trials(deepcopy=False), config)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(study_dir / "summary.csv", buffer.getvalue())
    atomic_write_text(study_dir / "summary.md", render_summary_md(study, config, result))
    if result.get("final"):
        atomic_write_text(study_dir / "final.json", json.dumps(result["final"], indent=2) + "\n")
