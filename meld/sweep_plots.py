"""Optuna's study plots for a sweep folder: optimisation history, parallel coordinates, parameter importances.

Interactive HTML through plotly where it is installed, PNG through matplotlib otherwise. A plot is a
convenience: one that cannot be drawn (too few finished trials, no plotting library) is reported by
name and reason, and the sweep goes on.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from clara.io_utils import atomic_path

PLOTS = {
    "history": "plot_optimization_history",
    "parallel_coordinates": "plot_parallel_coordinate",
    "importances": "plot_param_importances",
}


@dataclass(frozen=True)
class Plot:
    name: str
    file: str | None  # relative to the study folder; None when it was not drawn
    error: str = ""


def _draw(study: optuna.Study, function: str, path: Path, html: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend, and axis-limit notes
        if html:
            figure = getattr(optuna.visualization, function)(study)
            with atomic_path(path) as tmp:
                figure.write_html(str(tmp), include_plotlyjs="cdn")
            return
        import matplotlib.pyplot as plt

        axes = getattr(optuna.visualization.matplotlib, function)(study)
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        try:
            figure.set_size_inches(10, 6)
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        finally:
            plt.close(figure)


def write_plots(study: optuna.Study, study_dir: Path, log: Callable[[str], None] = print) -> list[Plot]:
    """Draw every plot into STUDY_DIR/plots/; returns what was drawn and why anything was not."""
    html = importlib.util.find_spec("plotly") is not None
    plots = []
    for name, function in PLOTS.items():
        relative = f"plots/{name}.{'html' if html else 'png'}"
        try:
            _draw(study, function, study_dir / relative, html)
        except Exception as err:  # noqa: BLE001 - a plot that fails (too few trials, a library) must not stop the sweep
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
            log(f"plot {name} not drawn: {reason}")
            plots.append(Plot(name, None, reason))
        else:
            plots.append(Plot(name, relative))
    return plots
