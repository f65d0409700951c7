"""Every walkthrough notebook runs top to bottom in SMOKE mode, and the committed notebooks carry no outputs.

New notebooks are picked up by the glob. All of them share one cache folder ($MELD_CLARA_CACHE) for the
session, so the demo dataset and its features are built once, by the first notebook that needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600  # per cell: the first notebook of a session also builds the demo


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A "python3" kernelspec for this very interpreter, so the notebooks import the kit the tests see,
    whether or not (and wherever) the environment has a kernelspec installed."""
    prefix = tmp_path_factory.mktemp("kernel")
    install(prefix=str(prefix))
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])


@pytest.fixture(scope="session")
def notebook_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook-cache")


def execute(path: Path, kernel_specs: KernelSpecManager, **env: str) -> nbformat.NotebookNode:
    """Run the notebook in a fresh kernel (working directory: the repository) with ``env`` added."""
    notebook = nbformat.read(path, as_version=4)
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = NotebookClient(notebook, km=manager, timeout=TIMEOUT_S, resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute(env={**os.environ, "MELD_CLARA_SMOKE": "1", **env})  # raises CellExecutionError on a cell's error
    return notebook


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, kernel_specs, notebook_cache):
    execute(path, kernel_specs, MELD_CLARA_CACHE=str(notebook_cache))


def test_data_tour_falls_back_to_the_demo_without_meld(tmp_path, kernel_specs, notebook_cache):
    notebook = execute(REPO_ROOT / "notebooks" / "01_data_tour.ipynb", kernel_specs,
                       MELD_CLARA_CACHE=str(notebook_cache), MELD_CLARA_DATA=str(tmp_path / "no-meld-here"))
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert "statistics from the demo" in printed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    """Outputs (images, audio) would bloat the repository and make every diff noisy: clear them before committing."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {index} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_in_full_mode(path, kernel_specs, notebook_cache):
    """What a user runs: SMOKE off (``pytest -m slow tests/test_notebooks.py``)."""
    execute(path, kernel_specs, MELD_CLARA_CACHE=str(notebook_cache), MELD_CLARA_SMOKE="0")
