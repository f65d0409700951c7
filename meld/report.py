"""A run directory's results: metrics.json, predictions.csv, the confusion-matrix PNG, report.md, TensorBoard.

Fine-tuning, zero-shot and sweeps all write through these functions, so every run reads alike:
macro-F1 first, then weighted-F1, accuracy and balanced accuracy, the per-class table, the
confusion matrix, and what trivial predictors score on the same split beside the model's numbers.
Files are written atomically, so an interrupted run never leaves a half-written result.

A ``metrics`` document maps split names to ``classification_metrics`` dicts:
``{"dev": {...}, "test": {...}}``. Other entries (a ``mean_std`` summary, retrieval scores) may sit
beside them; they are kept in metrics.json but are not splits.

matplotlib is imported only where a figure is drawn: it is an optional (dev) dependency, and a run
without it should fail at the figure, not at import. Figures use the Agg canvas directly, never
pyplot, so nothing tries to open a display.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from clara.io_utils import atomic_path, atomic_write_text
from meld.metrics import SCALARS, reference_metrics

SPLIT_KEYS = (*SCALARS, "per_class", "confusion_matrix")
_LABELS = {"macro_f1": "macro-F1", "weighted_f1": "weighted-F1", "accuracy": "accuracy",
           "balanced_accuracy": "balanced accuracy"}


def _is_split(value: object) -> bool:
    return isinstance(value, Mapping) and all(key in value for key in SPLIT_KEYS)


def _splits(metrics: Mapping) -> list[str]:
    return [name for name, value in metrics.items() if _is_split(value)]


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _json_default(value: object) -> object:
    """numpy scalars and arrays, which the metrics' callers often hold, as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_metrics_json(path: str | Path, metrics: Mapping) -> Path:
    """Write ``{"dev": {...}, "test": {...}, ...}``; "dev" and "test", where given, must be complete splits.

    NaN or infinity is refused: the metrics never produce them, so one means a bug upstream.
    """
    for name in ("dev", "test"):
        if name in metrics and not _is_split(metrics[name]):
            missing = [key for key in SPLIT_KEYS if key not in metrics[name]]
            raise ValueError(f"metrics[{name!r}] lacks {', '.join(missing)}")
    if not _splits(metrics):
        raise ValueError("metrics has no split (a dict with " + ", ".join(SPLIT_KEYS) + ")")
    text = json.dumps(metrics, indent=2, allow_nan=False, default=_json_default)
    atomic_write_text(path, text + "\n")
    return Path(path)


def write_predictions_csv(
    path: str | Path,
    keys: Sequence[str],
    gold: Sequence[int],
    pred: Sequence[int],
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> Path:
    """One row per example: key, gold and predicted class names, then ``p_<class>`` for every class."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(keys), len(class_names)) or not len(keys) == len(gold) == len(pred):
        raise ValueError(f"{len(keys)} keys, {len(gold)} gold, {len(pred)} predicted and probabilities of "
                         f"shape {probs.shape} do not match {len(class_names)} classes")
    out = io.StringIO()
    rows = csv.writer(out, lineterminator="\n")
    rows.writerow(["key", "gold", "predicted", *(f"p_{name}" for name in class_names)])
    for key, g, p, row in zip(keys, gold, pred, probs):
        rows.writerow([key, class_names[g], class_names[p], *(f"{value:.6f}" for value in row)])
    atomic_write_text(path, out.getvalue())
    return Path(path)


def confusion_matrix_figure(cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], title: str):
    """A matplotlib Figure: each gold row normalised to fractions (the colour), counts annotated."""
    from matplotlib.figure import Figure

    counts = np.asarray(cm, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = 1.5 + 0.75 * len(class_names)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of the gold class")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    for i in ticks:
        for j in ticks:
            colour = "white" if rates[i, j] > 0.5 else "black"  # readable on dark and light cells
            ax.text(j, i, f"{rates[i, j]:.2f}\n({counts[i, j]:g})", ha="center", va="center", color=colour,
                    fontsize=8)
    return fig


def save_confusion_png(path: str | Path, cm, class_names: Sequence[str], title: str) -> Path:
    fig = confusion_matrix_figure(cm, class_names, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def _headline_rows(metrics: Mapping, split: str, class_names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Columns (every split, then the trivial predictors on ``split``) and one row per scalar metric."""
    splits = _splits(metrics)
    support = [metrics[split]["per_class"][name]["support"] for name in class_names]
    references = {f"{name} ({split})": ref for name, ref in reference_metrics(support, class_names).items()}
    columns = {**{name: metrics[name] for name in splits}, **references}
    rows = [[_LABELS[key], *(_pct(col[key]) for col in columns.values())] for key in SCALARS]
    return list(columns), rows


def _per_class_rows(split_metrics: Mapping, class_names: Sequence[str]) -> list[list[str]]:
    rows = []
    for name in class_names:
        m = split_metrics["per_class"][name]
        absent = m["support"] == 0  # recall and F1 undefined: shown as a dash, excluded from macro-F1
        rows.append([name, _pct(m["precision"]), "–" if absent else _pct(m["recall"]),
                     "–" if absent else _pct(m["f1"]), str(m["support"])])
    return rows


def _class_notes(split_metrics: Mapping, class_names: Sequence[str]) -> list[str]:
    """Name the classes that weighted-F1 and accuracy hide."""
    per_class = split_metrics["per_class"]
    predicted = np.asarray(split_metrics["confusion_matrix"]).sum(axis=0)
    never = [name for i, name in enumerate(class_names) if predicted[i] == 0 and per_class[name]["support"] > 0]
    absent = [name for name in class_names if per_class[name]["support"] == 0]
    notes = []
    if never:
        notes.append(f"Never predicted (F1 0): {', '.join(never)}.")
    if absent:
        notes.append("Absent from the gold labels (excluded from macro-F1 and balanced accuracy): "
                     f"{', '.join(absent)}.")
    return notes


def _check_split(metrics: Mapping, split: str) -> Mapping:
    if not _is_split(metrics.get(split)):
        raise ValueError(f"metrics has no split {split!r}; it has {', '.join(_splits(metrics)) or 'none'}")
    return metrics[split]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Fixed-width columns for the terminal: the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in [header, *rows]]


def seed_cell(stat: Mapping, runs: int) -> str:
    """``mean ± std`` in percent, or the mean alone for one run: its sample std is undefined (mean_std stores 0)."""
    return _pct(stat["mean"]) if runs < 2 else f"{_pct(stat['mean'])} ± {_pct(stat['std'])}"


def spread_label(runs: int) -> str:
    """What the cells of ``seed_rows`` hold, for a caption."""
    return "one seed, so no standard deviation" if runs < 2 else f"mean ± sample std (ddof=1) over {runs} seeds"


def seed_rows(seeds: Mapping, class_names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """``mean_std`` over whole run documents: one column per split, scalars then per-class F1.

    A class absent from a split's gold labels gets a dash, not F1 0: macro-F1 leaves it out too.
    """
    splits = [name for name, value in seeds.items() if isinstance(value, Mapping) and "macro_f1" in value]

    def cell(stat: Mapping) -> str:
        return seed_cell(stat, seeds["runs"])

    def f1_cell(split: str, name: str) -> str:
        stats = seeds[split]["per_class"][name]
        return "–" if stats["support"]["mean"] == 0 else cell(stats["f1"])

    rows = [[_LABELS[key], *(cell(seeds[s][key]) for s in splits)] for key in SCALARS]
    rows += [[f"F1 {name}", *(f1_cell(s, name) for s in splits)] for name in class_names]
    return splits, rows


def row_coverage(used: Mapping[str, tuple[int, Mapping[str, str]]]) -> dict[str, dict]:
    """Per split (name -> (rows used, {key left out: why})): the rows used, trained on or scored, the
    CSV's rows, and each row left out for lack of audio. A score over fewer rows than the CSV's is not
    one on the official split, so the reports say so and name the rows."""
    return {split: {"used": count, "csv_rows": count + len(left_out), "left_out": dict(left_out)}
            for split, (count, left_out) in used.items()}


def coverage_lines(coverage: Mapping, shown: int = 10) -> str:
    """``row_coverage`` as Markdown bullets, one per split, naming the first ``shown`` rows left out."""
    lines = []
    for split, c in coverage.items():
        line = f"- {split}: {c['used']} of {c['csv_rows']} CSV rows"
        if c["left_out"]:
            named = [f"{key} ({why})" for key, why in list(c["left_out"].items())[:shown]]
            more = len(c["left_out"]) - len(named)
            line += ("; left out for lack of audio: " + "; ".join(named)
                     + (f"; and {more} more (metrics.json's rows lists them all)" if more else ""))
        lines.append(line)
    return "\n".join(lines)


def coverage_summary(coverage: Mapping) -> str:
    """One terminal line: ``dev 9 of 10, test 9 of 10 CSV rows``."""
    return ", ".join(f"{split} {c['used']} of {c['csv_rows']}" for split, c in coverage.items()) + " CSV rows"


def render_report_md(
    title: str,
    metrics: Mapping,
    class_names: Sequence[str],
    *,
    split: str = "test",
    confusion_png: str | None = None,
    seeds: Mapping | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> str:
    """The Markdown of ``write_report_md``."""
    detail = _check_split(metrics, split)
    majority = max(class_names, key=lambda name: detail["per_class"][name]["support"])
    share = detail["per_class"][majority]["support"] / sum(detail["per_class"][n]["support"] for n in class_names)
    header, rows = _headline_rows(metrics, split, class_names)
    single = (f"weighted-F1 {_pct(detail['weighted_f1'])} · accuracy {_pct(detail['accuracy'])} · "
              f"balanced accuracy {_pct(detail['balanced_accuracy'])} (percent)")
    if seeds and split in seeds:
        # The run in the tables is one seed, picked on dev: its test score is one draw of several points'
        # spread, favoured by the pick, so the headline is the mean over every seed (as papers report it).
        stats, runs = seeds[split], seeds["runs"]
        headline = [
            f"**{split} macro-F1: {seed_cell(stats['macro_f1'], runs)}** · weighted-F1 "
            f"{seed_cell(stats['weighted_f1'], runs)} · accuracy {seed_cell(stats['accuracy'], runs)} "
            f"({spread_label(runs)}, percent)",
            "",
            f"The tables below are one of those runs, not the mean: {split} macro-F1 {_pct(detail['macro_f1'])} · "
            + single,
        ]
    else:
        headline = [f"**{split} macro-F1: {_pct(detail['macro_f1'])}** · " + single]
    lines = [
        f"# {title}",
        "",
        *headline,
        "",
        *_markdown_table(["metric", *header], rows),
        "",
        "How to read this: macro-F1 averages F1 over the classes present in the gold labels, weighing every "
        "class (each emotion, or each sentiment) equally, so a class the model never predicts pulls it down. "
        f"Weighted-F1 and accuracy follow the majority class ({majority}, {100 * share:.1f}% of {split}): "
        f"always predicting it already scores the 'always {majority}' column, and guessing uniformly scores "
        "the 'uniform chance' column.",
        "",
        f"## Per class ({split})",
        "",
        *_markdown_table(["class", "precision", "recall", "F1", "support"], _per_class_rows(detail, class_names)),
    ]
    notes = _class_notes(detail, class_names)
    if notes:
        lines += ["", *notes]
    cm_rows = [[name, *(f"{count:g}" for count in row)] for name, row in zip(class_names, detail["confusion_matrix"])]
    lines += ["", f"## Confusion matrix ({split})", "", "Rows are gold classes, columns predicted classes.", "",
              *_markdown_table(["gold \\ predicted", *class_names], cm_rows)]
    if confusion_png:
        lines += ["", f"![confusion matrix, {split}]({confusion_png})"]
    if seeds:
        seed_splits, rows_over_seeds = seed_rows(seeds, class_names)
        seed_heading = f"Mean ± std over {seeds['runs']} seeds" if seeds["runs"] > 1 else "Over one seed"
        lines += ["", f"## {seed_heading}", "", f"Percent, {spread_label(seeds['runs'])}.", "",
                  *_markdown_table(["metric", *seed_splits], rows_over_seeds)]
    for heading, body in (extra_sections or {}).items():
        lines += ["", f"## {heading}", "", body.rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_report_md(
    path: str | Path,
    title: str,
    metrics: Mapping,
    class_names: Sequence[str],
    *,
    split: str = "test",
    confusion_png: str | None = None,
    seeds: Mapping | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> Path:
    """report.md: the headline and reference table, per-class table and confusion matrix of ``split``.

    ``confusion_png``: the PNG's path relative to the report (linked, not embedded). ``seeds``: a
    ``mean_std`` of whole run documents (one per seed), shown as a mean ± std table. ``extra_sections``:
    heading -> Markdown body, appended in order (zero-shot's per-template table, retrieval recall).
    """
    text = render_report_md(title, metrics, class_names, split=split, confusion_png=confusion_png, seeds=seeds,
                            extra_sections=extra_sections)
    atomic_write_text(path, text)
    return Path(path)


def format_table(metrics: Mapping, class_names: Sequence[str], split: str = "test") -> str:
    """The report's headline and per-class tables as fixed-width text for the terminal (percent)."""
    detail = _check_split(metrics, split)
    header, rows = _headline_rows(metrics, split, class_names)
    per_class = _per_class_rows(detail, class_names)
    lines = [f"{split} macro-F1 {_pct(detail['macro_f1'])}", "",
             *_text_table(["metric", *header], rows), "",
             *_text_table([f"class ({split})", "precision", "recall", "F1", "support"], per_class)]
    return "\n".join([*lines, *_class_notes(detail, class_names)])


# TensorBoard: ``writer`` is the caller's torch.utils.tensorboard.SummaryWriter.


def _figure_rgb(fig) -> np.ndarray:
    """[H, W, 3] uint8 pixels of a figure, drawn on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_confusion_figure(writer, tag: str, cm, class_names: Sequence[str], step: int) -> None:
    image = _figure_rgb(confusion_matrix_figure(cm, class_names, tag))
    writer.add_image(tag, image, step, dataformats="HWC")


def log_pr_curves(
    writer, tag_prefix: str, gold: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str], step: int
) -> None:
    """One-vs-rest precision-recall curve per class, tagged ``<tag_prefix>/<class>``.

    Classes absent from ``gold`` are skipped: with no positives their curve is empty, as their F1 is
    excluded from macro-F1.
    """
    gold_arr = np.asarray(gold)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (gold_arr.size, len(class_names)):
        raise ValueError(f"probabilities of shape {probs.shape} do not fit {gold_arr.size} labels, "
                         f"{len(class_names)} classes")
    for index, name in enumerate(class_names):
        positives = gold_arr == index
        if positives.any():
            writer.add_pr_curve(f"{tag_prefix}/{name}", positives, probs[:, index], global_step=step)


def _flatten(tree: Mapping, sep: str, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def _hparam_value(value: object) -> int | float | str:
    """What the HParams dashboard can show: numbers as numbers, anything else (None, lists, paths) as text.

    Booleans become "True"/"False": torch would store them as 1.0/0.0.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) else str(value)


def log_hparams(writer, hparams: Mapping, metrics: Mapping) -> None:
    """The run's hyperparameters and final metrics for TensorBoard's HParams dashboard, in the writer's own run.

    Nested ``hparams`` flatten to dotted names (``optim.lr``). Every numeric leaf of ``metrics`` (lists
    such as the confusion matrix are skipped) is logged as a scalar tagged ``hparams/<path>`` (e.g.
    ``hparams/test/macro_f1``), apart from the training curves so the dashboard reads the final value.
    SummaryWriter.add_hparams would instead open a new run directory named by the clock, so the three
    hparams summaries are written to this writer's event file directly.
    """
    # Imported here, as matplotlib is: writing metrics.json alone should not load torch's TensorBoard code.
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    flat_hparams = {name: _hparam_value(value) for name, value in _flatten(hparams, ".").items()}
    flat_metrics = {f"hparams/{name}": float(value) for name, value in _flatten(metrics, "/").items()
                    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)}
    file_writer = writer._get_file_writer()  # what add_hparams itself writes to; reopens a closed writer
    for summary in hparams_summaries(flat_hparams, flat_metrics):
        file_writer.add_summary(summary)
    for tag, value in flat_metrics.items():
        writer.add_scalar(tag, value)


def log_embeddings(writer, embeddings, labels: Sequence[str], tag: str, step: int) -> None:
    """Embeddings [N, D] with one label each for the projector (writes projector_config.pbtxt)."""
    matrix = np.asarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(labels):
        raise ValueError(f"embeddings of shape {matrix.shape} do not fit {len(labels)} labels")
    writer.add_embedding(matrix, metadata=[str(label) for label in labels], tag=tag, global_step=step)
