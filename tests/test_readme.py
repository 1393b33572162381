"""Every Python snippet in the README runs as written (slow: the snippets load the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The contents of the README's ```python fenced blocks, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(python_blocks(README.read_text())) >= 1


RUN_DIR = "runs/quickstart"


def _tiny_run(root: Path) -> None:
    """A finished run at `root/runs/quickstart` (one tiny model through probing) for the results snippet."""
    import shutil

    from aligned_probing import pipeline
    from aligned_probing.pipeline.config import RunConfig
    from tests._tiny import build_tiny_model

    shutil.copy(README.parent / "tests" / "data" / "tiny.toml", root / "tiny.toml")
    build_tiny_model(root / "tiny-a", seed=0)
    overrides = [f'output.run_dir="{root / RUN_DIR}"', "causal.enabled=false"]
    cfg = RunConfig.from_toml(root / "tiny.toml", overrides=overrides)
    data = cfg.model_dump(mode="json")
    one_model = RunConfig.from_dict({**data, "models": data["models"][:1]})
    pipeline.run(one_model, stages=["probe"], progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    code = python_blocks(README.read_text())[index]
    if RUN_DIR in code:  # the results snippet starts from a run directory: a tiny one stands in
        _tiny_run(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
