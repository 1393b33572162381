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


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    code = python_blocks(README.read_text())[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
