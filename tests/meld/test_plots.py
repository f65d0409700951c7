"""meld.plots draws what it is given: bar heights, curve points and axes come from the inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from meld.plots import (
    plot_audio_grid, plot_before_after, plot_class_balance, plot_clip_lengths, plot_mel, plot_training_curves,
    plot_waveform, read_metrics,
)


def bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_class_balance_plots_shares_and_labels_counts():
    fig = plot_class_balance({"train": [6, 3, 1], "dev": [1, 1, 0]}, ["neutral", "joy", "fear"])
    ax = fig.axes[0]
    assert bar_heights(ax) == pytest.approx([60, 30, 10, 50, 50, 0])
    assert [label.get_text() for label in ax.texts] == ["6", "3", "1", "1", "1", "0"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (10)", "dev (2)"]
    with pytest.raises(ValueError, match="dev: 2 counts for 3 class names"):
        plot_class_balance({"dev": [1, 2]}, ["neutral", "joy", "fear"])


def test_clip_lengths_marks_the_cap_and_summarises_each_split():
    fig = plot_clip_lengths({"train": [1.0, 2.0, 3.0, 40.0], "dev": [1.5]}, cap=30)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["train: median 2.5 s, max 40.0 s", "dev: median 1.5 s, max 1.5 s", "cap 30 s"]
    assert ax.get_yscale() == "log"


def test_waveform_and_mel_take_tensors_and_use_seconds():
    fig = plot_waveform(torch.ones(48_000), title="one second")
    assert fig.axes[0].get_xlim() == pytest.approx((0, 1))
    fig = plot_mel(torch.zeros(80, 188))  # 188 frames of hop 512 at 48 kHz: 2.005 s
    image = fig.axes[0].images[0]
    assert image.get_extent() == pytest.approx((0, 188 * 512 / 48_000, 0, 80))
    assert image.get_clim() == (-1.0, 1.0)


def test_audio_grid_has_a_wave_and_a_mel_per_clip():
    clips = {name: (np.zeros(4800), np.zeros((80, 10))) for name in ("clean", "reverb", "clipped")}
    fig = plot_audio_grid(clips)
    titled = [ax for ax in fig.axes if ax.get_title()]  # colorbars have no title
    assert [ax.get_title() for ax in titled] == ["clean", "clean", "reverb", "reverb", "clipped", "clipped"]
    png = io.BytesIO()
    fig.savefig(png, format="png")  # renders without pyplot or a display
    assert png.getvalue().startswith(b"\x89PNG")


def test_training_curves_follow_metrics_jsonl(tmp_path):
    records = [
        {"step": 0, "eval/a2t_R@1": 0.1, "eval/t2a_R@1": 0.2},
        {"step": 5, "train/loss": 3.0, "train/lr": 1e-3},
        {"step": 10, "train/loss": 2.0, "train/lr": 1e-4},
        {"step": 10, "eval/a2t_R@1": 0.5, "eval/t2a_R@1": 0.4},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    assert read_metrics(path) == records
    left, right = plot_training_curves(path).axes
    (loss,) = left.get_lines()
    assert list(loss.get_xdata()) == [5, 10] and list(loss.get_ydata()) == [3.0, 2.0]
    curves = {line.get_label(): list(line.get_ydata()) for line in right.get_lines()}
    assert curves == {"a2t_R@1": [0.1, 0.5], "t2a_R@1": [0.2, 0.4]}


def test_before_after_strips_the_eval_prefix_and_ignores_the_step():
    fig = plot_before_after({"step": 0, "eval/R@1": 0.1}, {"step": 9, "eval/R@1": 0.6}, {"R@1": 0.02})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["R@1"]
    assert bar_heights(ax) == pytest.approx([0.1, 0.6])
    assert ax.collections[0].get_offsets()[0][1] == pytest.approx(0.02)
