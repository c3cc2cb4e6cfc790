"""Every notebook runs top to bottom in quick mode (PEELNB_QUICK=1) and is stored clean."""

from __future__ import annotations

import ast
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_how_peeling_works.ipynb", "03_low_bit_training.ipynb",
            "04_huggingface_checkpoints.ipynb"]
TEACHING = ["02_how_peeling_works.ipynb", "03_low_bit_training.ipynb"]
MAX_CELLS = 30
CELL_TIMEOUT_S = 300


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


def _code(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _kernel() -> KernelManager:
    """A kernel of this interpreter (the venv's ipykernel), whatever kernelspecs the machine has elsewhere."""
    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    return KernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=specs)


def test_the_notebooks_are_all_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_stored_notebook_carries_no_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(_code(nb)) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} carry outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_short_starts_with_parameters_and_ends_with_assertions(name):
    nb = _read(name)
    code = _code(nb)
    assert len(nb.cells) <= MAX_CELLS, f"{name} has {len(nb.cells)} cells; keep notebooks thin, logic in the package"
    assert 'os.environ.get("PEELNB_QUICK")' in code[0].source, f"{name}: the first code cell must read PEELNB_QUICK"
    asserts = [node for node in ast.walk(ast.parse(code[-1].source)) if isinstance(node, ast.Assert)]
    assert len(asserts) >= 2, f"{name}: end with a few assertions of what the notebook claims"
    assert all(len(cell.source.splitlines()) <= 15 for cell in code), f"{name}: keep code cells to a few lines"
    if name in TEACHING:
        headings = [cell.source for cell in nb.cells if cell.cell_type == "markdown"]
        assert any("## Summary" in h for h in headings) and any("## Exercises" in h for h in headings)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes_in_quick_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PEELNB_QUICK", "1")
    # one thread: the quick models are tiny, and two threads on a busy 2-core machine run them ~10x slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    kernel = _kernel()
    client = NotebookClient(nb, km=kernel, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on any error
    finally:
        if kernel.has_kernel:
            kernel.shutdown_kernel(now=True)
    elapsed = time.perf_counter() - started
    counts = [cell.execution_count for cell in _code(nb)]
    assert all(counts), f"{name}: cells not executed: {counts}"
    print(f"{name}: {elapsed:.1f} s")
