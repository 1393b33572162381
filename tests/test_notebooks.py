"""Every notebook in notebooks/ runs top to bottom on a tiny config, and is committed without outputs.

Notebooks read `ALIGNED_PROBING_NOTEBOOK_CONFIG` (default: configs/quickstart.toml); here it points at a
one-model copy of tests/data/tiny.toml next to a tiny random model, so CI runs them in about a minute.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tests._tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_quickstart.ipynb", "02_causal.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb")
    build_tiny_model(root / "tiny-a", seed=0)
    text = (ROOT / "tests" / "data" / "tiny.toml").read_text()
    # One model (no interplay) keeps the run short; the notebooks need nothing more.
    text = text.replace('[[models]]\nspec = "./tiny-b"\n\n', "").replace(
        '[[models]]\nspec = "./tiny-c"\n\n', ""
    )
    text = text.replace('run_dir = "runs/tiny"', f'run_dir = "{root / "run"}"')
    path = root / "tiny.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_draws(path, tiny_config, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("ALIGNED_PROBING_NOTEBOOK_CONFIG", str(tiny_config))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(images) >= 3, f"{path.name} drew {len(images)} figures"
