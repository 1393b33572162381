from __future__ import annotations

import base64
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from aligned_probing.pipeline.results import RunResults
from aligned_probing.report import library_versions, render_report

SCENARIOS = ["input", "forward", "output", "backward"]
ATTRIBUTES = ["toxicity", "insult", "threat"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _probing(rng, model: str, n_layers: int = 4) -> pd.DataFrame:
    rows = []
    for scenario in SCENARIOS:
        for attribute in ATTRIBUTES:
            for layer in range(n_layers + 1):
                for fold in range(3):
                    for seed in range(2):
                        r = 0.2 + 0.1 * layer + rng.normal(0, 0.02)
                        rows.append(
                            {
                                "model": model,
                                "template": 0,
                                "scenario": scenario,
                                "attribute": attribute,
                                "layer": layer,
                                "n_layers": n_layers,
                                "relative_depth": layer / n_layers,
                                "fold": fold,
                                "seed": seed,
                                "pearson": r,
                                "r2": r * r,
                                "rmse": 0.1,
                                "control_pearson": 0.01,
                                "selectivity": r - 0.01,
                                "compression": 1 + r,
                            }
                        )
    return pd.DataFrame(rows)


def _behaviour(models) -> pd.DataFrame:
    rows = []
    for i, model in enumerate(models):
        for attribute in ATTRIBUTES:
            for metric in ("emt", "toxicity_probability", "mean_score"):
                v = 0.1 * (i + 1)
                rows.append(
                    {
                        "model": model,
                        "template": 0,
                        "attribute": attribute,
                        "metric": metric,
                        "subset": "all",
                        "value": v,
                        "ci_low": v - 0.02,
                        "ci_high": v + 0.02,
                        "n_prompts": 20,
                        "k": 4,
                    }
                )
    return pd.DataFrame(rows)


def _interplay() -> pd.DataFrame:
    rows = []
    for scenario in SCENARIOS:
        for layer in range(5):
            for stat in ("pearson", "spearman"):
                v = -0.5 + 0.1 * layer
                rows.append(
                    {
                        "template": 0,
                        "scenario": scenario,
                        "attribute": "toxicity",
                        "behaviour_attribute": "toxicity",
                        "metric": "emt",
                        "subset": "all",
                        "depth_axis": "layer",
                        "layer": layer,
                        "relative_depth": layer / 4,
                        "statistic": stat,
                        "value": v,
                        "p_value": 0.3,
                        "ci_low": v - 0.2,
                        "ci_high": v + 0.2,
                        "n_models": 3,
                    }
                )
    return pd.DataFrame(rows)


def _effects(keys: dict, delta: np.ndarray) -> pd.DataFrame:
    """Causal effect rows (metric emt) shaped like `aligned_probing.causal` output."""
    frame = pd.DataFrame({**keys, "metric": "emt", "model": "model-a", "delta": delta})
    frame["ci_low"], frame["ci_high"] = frame["delta"] - 0.05, frame["delta"] + 0.05
    return frame


@pytest.fixture
def results(tmp_path, rng) -> RunResults:
    models = ["model-a", "model-b", "model-c"]
    layers = np.arange(5)
    return RunResults(
        run_dir=tmp_path,
        config={
            "name": "synthetic <run>",
            "description": "hand-made tables",
            "models": [{"spec": m, "name": m, "dtype": "float32", "quantization": None} for m in models],
            "generation": {"k": 4, "templates": [0]},
        },
        config_text='name = "synthetic"\n[generation]\nk = 4\n',
        prompts=pd.DataFrame({"prompt_id": ["a", "b"], "text": ["x", "y"]}),
        probing=pd.concat([_probing(rng, m) for m in models], ignore_index=True),
        behaviour=_behaviour(models),
        interplay=_interplay(),
        layer_skipping=_effects({"block": layers, "layer": layers + 1}, 0.01 * layers),
        patching=pd.concat(
            [
                _effects(
                    {"layer": layers, "direction": d, "measure": "readout", "readout_layer": 4}, s * layers
                )
                for d, s in (("toxic_to_nontoxic", -0.1), ("nontoxic_to_toxic", 0.1))
            ],
            ignore_index=True,
        ),
        steering=_effects(
            {"alpha": [-4.0, 0.0, 4.0, 8.0, -8.0], "layer": 2}, np.array([0.1, 0.2, 0.4, 0.5, 0.0])
        ),
        timings=pd.DataFrame(
            {
                "key": ["prompts", "generate/model-a/t0"],
                "name": ["prompts", "generate"],
                "status": ["complete", "complete"],
                "seconds": [1.5, 30.25],
            }
        ),
    )


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_is_self_contained_with_every_section(results, tmp_path):
    path = render_report(results, tmp_path / "out" / "report.html", figure_dir=tmp_path / "figs")
    html = path.read_text()
    for section in (
        "overview",
        "information",
        "reliability",
        "behaviour",
        "interplay",
        "causal",
        "timings",
        "config",
        "versions",
    ):
        assert f'<section id="{section}">' in html
    images = _images(html)
    # main figure, heatmap, selectivity, MDL, behaviour, interplay, skipping, patching, steering
    assert len(images) == 9
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" and len(img) > 3000 for img in images)
    # Nothing is fetched from elsewhere: no external URLs or scripts.
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html
    # Title is escaped, tables carry real numbers, config and versions are shown.
    assert "synthetic &lt;run&gt;" in html
    assert "30.250" in html and "generate/model-a/t0" in html
    assert "[generation]" in html and library_versions()["pandas"] in html
    # Peak table: the synthetic curves rise with depth, so every peak is at the last layer.
    peak = html.split("Peak information strength")[1].split("</table>")[0]
    assert peak.count("(layer 4)") == 3 * 4 * 3 and "(layer 3)" not in peak
    assert re.search(r"<th>toxicity</th>\s*<th>insult</th>\s*<th>threat</th>", peak)  # canonical order
    saved = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert "information.png" in saved and "information.svg" in saved and len(saved) == 18


def test_missing_stages_say_not_run(results, tmp_path):
    results.interplay = None
    results.layer_skipping = results.patching = results.steering = None
    html = render_report(results, tmp_path / "r.html").read_text()
    assert "interplay needs at least 3 models" in html
    causal = html.split('<section id="causal">')[1].split("</section>")[0]
    assert "Not run in this configuration." in causal
    assert len(_images(html)) == 5


def test_report_renders_in_headless_chromium(results, tmp_path):
    assert CHROMIUM, "needs Debian's chromium package (scripts/setup.sh --test installs it)"
    path = render_report(results, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2000)
    assert len(data) > 100_000  # a blank page compresses to a few kB; figures and tables do not
