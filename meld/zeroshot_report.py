"""What ``meld.zeroshot`` writes: metrics.json, report.md, predictions.csv, confusion PNGs, TensorBoard.

The headline (metrics.json's ``dev`` / ``test``, predictions.csv, the confusion matrices) is the
ensemble of every template with the chosen calibration; report.md and metrics.json's ``zeroshot``
entry hold every template alone and the ensemble, raw and calibrated both ways, side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clara.io_utils import atomic_directory
from meld.calibration import CALIBRATIONS
from meld.captions import CaptionConfig
from meld.metrics import SCALARS
from meld.prompts import PromptSet
from meld.report import (
    coverage_lines, coverage_summary, format_table, log_confusion_figure, log_hparams, log_pr_curves, row_coverage,
    save_confusion_png, write_metrics_json, write_predictions_csv, write_report_md,
)

ENSEMBLE = "ensemble"
_CALIBRATION_NAMES = {"none": "raw", "prior": "prior", "content_free": "content-free"}
_SHORT = {"macro_f1": "mF1", "weighted_f1": "wF1", "accuracy": "acc", "balanced_accuracy": "bAcc"}


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def template_rows(prompts: PromptSet, results: Mapping, split: str) -> tuple[list[str], list[list[str]]]:
    """One row per classifier (each template, then the ensemble); mF1, wF1 and accuracy, each raw | prior | cf."""
    header = ["prompts"] + [f"{_SHORT[m]} {_CALIBRATION_NAMES[c]}" for m in SCALARS[:3] for c in CALIBRATIONS]
    names = {f"T{i + 1}": f"T{i + 1}: {t}" for i, t in enumerate(prompts.templates)}
    names[ENSEMBLE] = f"{ENSEMBLE} of {len(prompts.templates)}"
    rows = [[name, *(_pct(results[key][c][split][m]) for m in SCALARS[:3] for c in CALIBRATIONS)]
            for key, name in names.items()]
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row) for row in [header, *rows])


def retrieval_rows(recall: Mapping) -> tuple[list[str], list[list[str]]]:
    header = ["split", "clips", "captions", *(f"{d} R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10))]
    rows = []
    for split, r in recall.items():
        keys = [f"{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)]
        cells = [f"{r['recall'][key]:.3f} ({r['chance'][key]:.3f})" for key in keys]
        rows.append([split, str(r["clips"]), str(r["captions"]), *cells])
    return header, rows


def prior_rows(results: Mapping, labels: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    priors = results[ENSEMBLE]["priors"]
    return (["estimate", *labels],
            [[_CALIBRATION_NAMES[k], *(f"{v[label]:.3f}" for label in labels)] for k, v in priors.items()])


def clip_counts(splits: Mapping) -> dict[str, dict]:
    """``meld.report.row_coverage`` of the scored splits: clips scored, CSV rows, rows left out (key -> why)."""
    return row_coverage({split: (len(audio.keys), audio.left_out) for split, audio in splits.items()})


def _sections(prompts: PromptSet, captions: CaptionConfig, splits, results, recall, run_info) -> dict[str, str]:
    calibration = _CALIBRATION_NAMES[run_info["calibration"]]
    # First: a score over fewer rows than the CSV's is not a score on the official split.
    sections = {"Clips scored": coverage_lines(clip_counts(splits))}
    for split in splits:
        header, rows = template_rows(prompts, results, split)
        sections[f"Each template alone and the ensemble ({split}, percent)"] = (
            f"{_markdown(header, rows)}\n\nClass names per class: "
            + "; ".join(f"{label}: {', '.join(prompts.names(label))}" for label in prompts.labels)
            + f". The headline above is the ensemble, {calibration}.")
    header, rows = prior_rows(results, prompts.labels)
    sections["Calibration (no labels used)"] = (
        "raw: argmax of the logits. prior: the logits minus the log of the classifier's mean predicted "
        f"distribution over {run_info['train_clips_unlabelled']} unlabelled train clips. content-free: minus the log "
        "of its mean prediction for silence (0.5 to 4 s). The ensemble's estimates:\n\n" + _markdown(header, rows))
    header, rows = retrieval_rows(recall)
    sections["Audio-text retrieval (chance in brackets)"] = (
        f"{_markdown(header, rows)}\n\nCaptions from utterance, emotion and speaker ({len(captions.templates)} "
        f"templates, `{run_info['captions']}`); a caption shared by several clips is one text, and any of its "
        "clips counts as a hit.")
    sections["Run"] = "\n".join(f"- {key}: `{value}`" for key, value in run_info.items())
    return sections


def write_outputs(out: Path, prompts: PromptSet, captions: CaptionConfig, splits: Mapping, results: Mapping,
                  probabilities: Mapping, recall: Mapping, run_info: Mapping) -> dict:
    """Write every output to ``out``, print the summary, and return the metrics document."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    labels, calibration = prompts.labels, run_info["calibration"]
    headline = "test" if "test" in splits else next(iter(splits))
    metrics: dict = {split: results[ENSEMBLE][calibration][split] for split in splits}
    metrics["zeroshot"] = {
        "templates": {f"T{i + 1}": t for i, t in enumerate(prompts.templates)},
        "scores": {name: {c: {split: {m: r[c][split][m] for m in SCALARS} for split in splits} for c in CALIBRATIONS}
                   for name, r in results.items()},
        "priors": {name: r["priors"] for name, r in results.items()},
    }
    metrics["rows"] = clip_counts(splits)
    metrics["retrieval"] = dict(recall)
    metrics["run"] = dict(run_info)
    write_metrics_json(out / "metrics.json", metrics)  # first: it marks the folder as a zero-shot run's

    probs = {split: probabilities[ENSEMBLE][calibration][split] for split in splits}
    write_predictions_csv(out / "predictions.csv", [k for s in splits for k in splits[s].keys],
                          np.concatenate([splits[s].gold for s in splits]),
                          np.concatenate([probs[s].argmax(axis=1) for s in splits]),
                          np.concatenate([probs[s] for s in splits]), labels)
    for split in splits:
        save_confusion_png(out / f"confusion_{split}.png", metrics[split]["confusion_matrix"], labels,
                           f"zero-shot {prompts.target}, {split} ({_CALIBRATION_NAMES[calibration]})")
    for split in {"dev", "test"} - set(splits):  # an earlier run's, on a split this one did not score
        (out / f"confusion_{split}.png").unlink(missing_ok=True)
    write_report_md(out / "report.md", f"Zero-shot CLARA on MELD ({prompts.target})", metrics, labels, split=headline,
                    confusion_png=f"confusion_{headline}.png",
                    extra_sections=_sections(prompts, captions, splits, results, recall, run_info))

    # A rerun into its own folder replaces the TensorBoard logs as a whole (they describe one
    # evaluation; added beside the old ones, every scalar would show twice at step 0).
    with atomic_directory(out / "tensorboard") as staging, SummaryWriter(str(staging)) as writer:
        for name, r in results.items():
            for c in CALIBRATIONS:
                for split in splits:
                    for m in SCALARS:
                        writer.add_scalar(f"zeroshot/{split}/{c}/{name}/{m}", r[c][split][m], 0)
        for split in splits:
            log_confusion_figure(writer, f"confusion/{split}", metrics[split]["confusion_matrix"], labels, 0)
            log_pr_curves(writer, f"pr/{split}", splits[split].gold, probs[split], labels, 0)
            for key, value in recall[split]["recall"].items():
                writer.add_scalar(f"retrieval/{split}/{key}", value, 0)
        log_hparams(writer, {k: v for k, v in run_info.items() if k != "seconds"},
                    {split: {m: metrics[split][m] for m in SCALARS} for split in splits})

    header, rows = template_rows(prompts, results, headline)
    r_header, r_rows = retrieval_rows(recall)
    print(f"\nzero-shot {prompts.target}: ensemble of {len(prompts.templates)} templates, "
          f"{_CALIBRATION_NAMES[calibration]}\n{format_table(metrics, labels, headline)}\n\n"
          f"clips scored: {coverage_summary(metrics['rows'])} (report.md names any left out)\n\n"
          f"each template alone and the ensemble ({headline}, percent):\n{_text(header, rows)}\n\n"
          f"audio-text retrieval (chance in brackets):\n{_text(r_header, r_rows)}\n\n"
          f"outputs in {out}: metrics.json report.md predictions.csv "
          f"{' '.join(f'confusion_{split}.png' for split in splits)} tensorboard/ ({run_info['seconds']} s)")
    return metrics
