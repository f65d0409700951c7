"""Pictures of the data and of training runs, for the walkthrough notebooks and for anyone's own reports.

Every function returns a matplotlib ``Figure`` made without pyplot: nothing depends on pyplot's global
"current figure" or on an interactive backend, so the same calls work in a notebook (which shows the
returned figure), in a script (``fig.savefig("x.png")``) and in tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from clara.audio_frontend import HOP_LENGTH, SAMPLE_RATE


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given axes and their figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def plot_class_balance(counts: Mapping[str, Sequence[int]], names: Sequence[str], *, title: str = "Class balance") -> Figure:
    """Grouped bars: per class, each split's share of its own rows (in %), with the count on top.

    ``counts`` maps a split to its count per class, in the order of ``names``. Shares, not counts, are
    plotted so that a small split's skew can be compared with a large one's.
    """
    for split, row in counts.items():
        if len(row) != len(names):
            raise ValueError(f"{split}: {len(row)} counts for {len(names)} class names")
    fig, ax = _axes(None, (max(6.0, 1.1 * len(names)), 3.5))
    width = 0.8 / max(1, len(counts))
    x = np.arange(len(names))
    for i, (split, row) in enumerate(counts.items()):
        total = max(1, sum(row))
        bars = ax.bar(x + (i - (len(counts) - 1) / 2) * width, [100 * c / total for c in row], width,
                      label=f"{split} ({sum(row)})")
        ax.bar_label(bars, labels=[str(c) for c in row], fontsize=7, padding=1)
    ax.set_xticks(x, names)
    ax.set_ylabel("% of the split")
    ax.set_title(title)
    ax.legend()
    return fig


def plot_clip_lengths(seconds: Mapping[str, Sequence[float]], *, cap: float | None = None, bins: int = 40,
                      title: str = "Clip lengths") -> Figure:
    """Histograms of clip durations per split on a log count axis (the long tail stays visible).

    ``cap``: a length to mark, e.g. prepare's ``max_seconds``; the legend gives each split's median and maximum.
    """
    fig, ax = _axes(None, (7.0, 3.5))
    everything = np.concatenate([np.asarray(values, dtype=float) for values in seconds.values()] or [np.zeros(1)])
    edges = np.linspace(min(0.0, everything.min()), max(everything.max(), cap or 0.0), bins + 1)
    for split, values in seconds.items():
        values = np.asarray(values, dtype=float)
        label = f"{split}: median {np.median(values):.1f} s, max {values.max():.1f} s" if values.size else split
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=label)
    if cap is not None:
        ax.axvline(cap, color="black", linestyle="--", linewidth=1, label=f"cap {cap:g} s")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("clips")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_waveform(wave, sample_rate: int = SAMPLE_RATE, *, ax: Axes | None = None, title: str = "") -> Figure:
    """A mono waveform ``[N]`` (tensor or array) against time in seconds."""
    fig, ax = _axes(ax, (7.0, 2.0))
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    ax.plot(np.arange(wave.size) / sample_rate, wave, linewidth=0.5)
    ax.set_xlim(0, max(wave.size, 1) / sample_rate)
    ax.set_xlabel("seconds")
    ax.set_title(title)
    return fig


def plot_mel(mel, *, sample_rate: int = SAMPLE_RATE, hop_length: int = HOP_LENGTH, ax: Axes | None = None,
             title: str = "") -> Figure:
    """A normalised log-mel ``[n_mels, T]`` (clara's LogMel: -1 is 80 dB below the clip's peak, 0 is 40 dB below)."""
    fig, ax = _axes(ax, (7.0, 2.5))
    mel = np.asarray(mel, dtype=np.float32)
    image = ax.imshow(mel, origin="lower", aspect="auto", vmin=-1.0, vmax=1.0, cmap="magma", interpolation="nearest",
                      extent=(0.0, mel.shape[-1] * hop_length / sample_rate, 0, mel.shape[0]))
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel bin")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, pad=0.01)
    return fig


def plot_audio_grid(clips: Mapping[str, tuple[object, object]], *, sample_rate: int = SAMPLE_RATE) -> Figure:
    """One row per named clip: its waveform ``[N]`` on the left, its log-mel ``[n_mels, T]`` on the right."""
    fig = Figure(figsize=(11.0, 2.0 * len(clips)), layout="constrained")
    axes = fig.subplots(len(clips), 2, squeeze=False, width_ratios=(1, 1.3))
    for (name, (wave, mel)), (left, right) in zip(clips.items(), axes):
        plot_waveform(wave, sample_rate, ax=left, title=name)
        plot_mel(mel, sample_rate=sample_rate, ax=right, title=name)
    return fig


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (one JSON object per line: ``step`` and ``train/...`` or ``eval/...``)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_training_curves(metrics_jsonl_path: str | Path, *, train_keys: Sequence[str] = ("loss",)) -> Figure:
    """The training loss (and any other ``train_keys``) and every held-out metric against the step."""
    records = read_metrics(metrics_jsonl_path)
    eval_keys = list(dict.fromkeys(key for record in records for key in record if key.startswith("eval/")))
    fig = Figure(figsize=(11.0, 3.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for key in train_keys:
        points = [(r["step"], r[f"train/{key}"]) for r in records if f"train/{key}" in r]
        if points:
            left.plot(*zip(*points), marker=".", label=key)
    left.set(xlabel="step", title="training")
    left.legend()
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        right.plot(*zip(*points), marker="o", label=key.removeprefix("eval/"))
    right.set(xlabel="step", title="held-out")
    if eval_keys:
        right.legend(fontsize=8, ncol=2)
    return fig


def plot_before_after(before: Mapping[str, float], after: Mapping[str, float],
                      reference: Mapping[str, float] | None = None, *, reference_label: str = "chance",
                      title: str = "Before and after training") -> Figure:
    """Bars of each metric of ``after`` before and after, with ``reference`` (e.g. chance) as a tick mark.

    Keys may carry the ``eval/`` prefix of the training logs; ``step`` entries are ignored.
    """
    def clean(values: Mapping[str, float]) -> dict[str, float]:
        return {key.removeprefix("eval/"): float(v) for key, v in values.items() if key != "step"}

    before, after = clean(before), clean(after)
    names = list(after)
    fig, ax = _axes(None, (max(6.0, 1.0 * len(names)), 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [before.get(n, np.nan) for n in names], 0.4, label="before")
    ax.bar(x + 0.2, [after[n] for n in names], 0.4, label="after")
    if reference is not None:
        reference = clean(reference)
        ax.scatter(x, [reference.get(n, np.nan) for n in names], marker="_", s=600, color="black", zorder=3,
                   label=reference_label)
    ax.set_xticks(x, names)
    ax.set_title(title)
    ax.legend()
    return fig
