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


SUBPACKAGES = ("models", "data", "scoring", "encoding", "probing", "causal", "training", "pipeline.plan")


def test_subpackages_do_not_widen_the_public_api():
    """One tier of public: every name a subpackage declares public is importable from `aligned_probing`."""
    import importlib

    aliases = {"run": "run_pipeline"}
    wider = {}
    for name in SUBPACKAGES:
        module = importlib.import_module(f"aligned_probing.{name}")
        extra = [n for n in module.__all__ if aliases.get(n, n) not in aligned_probing.__all__]
        if extra:
            wider[name] = extra
    assert wider == {}


def test_public_names_are_the_objects_of_their_modules():
    from aligned_probing import causal, generation_settings, report
    from aligned_probing.pipeline import plan

    assert aligned_probing.GenerationSettings is causal.GenerationSettings
    assert causal.GenerationSettings is generation_settings.GenerationSettings
    assert aligned_probing.run_pipeline is plan.run and aligned_probing.plots is report.plots
