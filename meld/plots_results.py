"""Pictures of results, for the zero-shot, fine-tuning and sweep notebooks: scores side by side.

Like ``meld.plots``, every function returns a matplotlib ``Figure`` made without pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure


def plot_grouped_bars(values: Mapping[str, Mapping[str, float]], *, title: str = "", ylabel: str = "",
                      reference: Mapping[str, float] | None = None, percent: bool = True) -> Figure:
    """Grouped bars: one group per category, one bar (and colour) per series, the value on top.

    ``values`` maps a series (a run, a calibration) to its value per category (a class, a template);
    categories are ordered as first met, and a series lacking a category has no bar there. Scores in
    [0, 1] are drawn in percent unless ``percent`` is False. ``reference`` (series-independent, e.g. a
    chance level per category) is marked with a black tick over each group.
    """
    if not values:
        raise ValueError("nothing to plot: values is empty")
    categories = list(dict.fromkeys(category for row in values.values() for category in row))
    if not categories:  # every series empty: no group to draw (and no tick label to size the axis by)
        raise ValueError(f"nothing to plot: series {', '.join(map(repr, values))} hold no values")
    scale = 100.0 if percent else 1.0
    fig = Figure(figsize=(max(6.0, 0.9 * len(categories) * max(1, len(values)) ** 0.5 + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(values)
    x = np.arange(len(categories))
    for i, (series, row) in enumerate(values.items()):
        present = [j for j, category in enumerate(categories) if category in row]
        heights = [scale * float(row[categories[j]]) for j in present]
        bars = ax.bar(x[present] + (i - (len(values) - 1) / 2) * width, heights, width, label=series)
        ax.bar_label(bars, fmt="%.0f" if percent else "%.2f", fontsize=7, padding=1)
    if reference:
        for j, category in enumerate(categories):
            if category in reference:
                ax.hlines(scale * float(reference[category]), j - 0.4, j + 0.4, colors="black", linewidth=1.5)
    ax.set_xticks(x, categories, rotation=20 if max(len(c) for c in categories) > 10 else 0, ha="right"
                  if max(len(c) for c in categories) > 10 else "center")
    ax.set_ylabel(ylabel or ("%" if percent else ""))
    ax.set_title(title)
    if len(values) > 1:
        ax.legend(fontsize=8)
    return fig
