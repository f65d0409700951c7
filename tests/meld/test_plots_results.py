"""meld.plots_results draws what it is given: bar heights and labels come from the inputs."""

from __future__ import annotations

import pytest

from meld.plots_results import plot_grouped_bars


def test_grouped_bars_heights_order_and_legend():
    fig = plot_grouped_bars({"raw": {"T1": 0.2, "T2": 0.5}, "prior": {"T1": 0.4, "ensemble": 0.6}},
                            title="mF1", reference={"T1": 0.1})
    ax = fig.axes[0]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["T1", "T2", "ensemble"]
    assert [patch.get_height() for patch in ax.patches] == pytest.approx([20, 50, 40, 60])
    assert [patch.get_x() + patch.get_width() / 2 for patch in ax.patches] == pytest.approx([-0.2, 0.8, 0.2, 2.2])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["raw", "prior"]
    assert len(ax.collections) == 1  # the reference tick
    assert ax.get_title() == "mF1"


def test_grouped_bars_raw_values_and_single_series():
    ax = plot_grouped_bars({"run": {"a": 1.5, "b": 2.0}}, percent=False).axes[0]
    assert [patch.get_height() for patch in ax.patches] == pytest.approx([1.5, 2.0])
    assert ax.get_legend() is None
    with pytest.raises(ValueError, match="empty"):
        plot_grouped_bars({})


def test_grouped_bars_of_empty_series_is_one_error_and_an_empty_series_beside_others_has_no_bars():
    with pytest.raises(ValueError, match=r"^nothing to plot: series 'run', 'prior' hold no values$"):
        plot_grouped_bars({"run": {}, "prior": {}})
    ax = plot_grouped_bars({"run": {}, "prior": {"a": 0.5}}).axes[0]
    assert [patch.get_height() for patch in ax.patches] == pytest.approx([50])
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["run", "prior"]
