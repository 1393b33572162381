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


def test_one_alpha_grid_and_one_scenario_list():
    import typing

    from aligned_probing.pipeline import config
    from aligned_probing.probing import DEFAULT_ALPHAS, SCENARIOS

    probing = config.ProbingConfig()
    assert probing.alphas == list(DEFAULT_ALPHAS) and len(DEFAULT_ALPHAS) == 17
    assert tuple(probing.scenarios) == SCENARIOS == typing.get_args(config.Scenario)
    assert not hasattr(config, "SCENARIOS")  # defined once, in aligned_probing.probing
