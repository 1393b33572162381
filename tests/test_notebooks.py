"""Every notebook in notebooks/ runs top to bottom on a tiny config, and is committed without outputs.

Notebooks read `ALIGNED_PROBING_NOTEBOOK_CONFIG` (default: configs/quickstart.toml) and
`ALIGNED_PROBING_FINETUNE_CONFIG` (default: configs/finetune_quick.toml); here they point at a one-model
copy of tests/data/tiny.toml and a tiny fine-tuning config next to a tiny random model, so CI runs them
in minutes.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tests._tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    expected = {"01_quickstart.ipynb", "02_causal.ipynb", "03_probe_finetuning.ipynb"}
    assert {p.name for p in NOTEBOOKS} >= expected


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
    # Fine-tuning on the same tiny model with the real embedded scorer: these seeds give both classes
    # in the probe-training and held-out halves (the run fails loudly on a single class).
    (root / "finetune.toml").write_text(TINY_FINETUNE.format(model=root / "tiny-a", out=root / "finetune"))
    return path


TINY_FINETUNE = """
output_dir = "{out}"
scorer = "embedded"
[model]
spec = "{model}"
[data]
n_train = 16
n_eval = 12
[generation]
k = 3
max_new_tokens = 8
batch_size = 48
[probes]
layer = 2
n_ensemble = 2
n_heldout = 2
[training]
arms = ["probe_dpo", "classifier_dpo", "probe_sft"]
max_steps = 2
per_device_batch_size = 4
gradient_accumulation_steps = 1
max_length = 48
checkpoint_every = 1
learning_rate = 1e-3
[evaluation]
n_benign = 4
ppl_max_length = 32
n_boot = 50
"""


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_draws(path, tiny_config, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("ALIGNED_PROBING_NOTEBOOK_CONFIG", str(tiny_config))
    monkeypatch.setenv("ALIGNED_PROBING_FINETUNE_CONFIG", str(tiny_config.parent / "finetune.toml"))
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
