"""The public API declared in aligned_probing.__all__ resolves, lazily."""

import subprocess
import sys

import aligned_probing


def test_every_public_name_resolves():
    missing = [name for name in aligned_probing.__all__ if not hasattr(aligned_probing, name)]
    assert missing == []


def test_import_is_lazy():
    # Importing the package must not pull torch in (CLI start-up and notebooks stay fast).
    code = "import sys, aligned_probing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
