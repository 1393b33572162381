from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from aligned_probing.pipeline.results import RunResults
from aligned_probing.report import cases, findings, library_versions, render_report

SCENARIOS = ["input", "forward", "output", "backward"]
ATTRIBUTES = ["toxicity", "insult", "threat"]
MODELS = ["model-a", "model-b", "model-c"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Planted: every curve rises to its last layer, except that backward carries no more than its control.
N_LAYERS = 4


def _probing(rng, model: str, templates=(0,), shift: float = 0.0) -> pd.DataFrame:
    rows = []
    for template in templates:
        for scenario in SCENARIOS:
            for attribute in ATTRIBUTES:
                for layer in range(N_LAYERS + 1):
                    for fold in range(3):
                        for seed in range(2):
                            r = 0.2 + 0.1 * layer + shift + 0.05 * template + rng.normal(0, 0.02)
                            control = (
                                r if scenario == "backward" else 0.01
                            )  # backward: no better than control
                            rows.append(
                                {
                                    "model": model,
                                    "template": template,
                                    "scenario": scenario,
                                    "attribute": attribute,
                                    "layer": layer,
                                    "n_layers": N_LAYERS,
                                    "relative_depth": layer / N_LAYERS,
                                    "fold": fold,
                                    "seed": seed,
                                    "pearson": r,
                                    "r2": r * r,
                                    "rmse": 0.1,
                                    "control_pearson": control,
                                    "selectivity": r - control + rng.normal(0, 0.02),
                                    "compression": 1 + r,
                                }
                            )
    return pd.DataFrame(rows)


def _behaviour(models, templates=(0,), emt=None) -> pd.DataFrame:
    rows = []
    for i, model in enumerate(models):
        for template in templates:
            for attribute in ATTRIBUTES:
                for metric in ("emt", "toxicity_probability", "mean_score"):
                    v = (emt or {}).get(model, 0.1 * (i + 1)) + 0.2 * template
                    rows.append(
                        {
                            "model": model,
                            "template": template,
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


def _effects(keys: dict, delta, metric: str = "emt", half: float = 0.05) -> pd.DataFrame:
    """Causal effect rows shaped like `aligned_probing.causal` output."""
    frame = pd.DataFrame({**keys, "metric": metric, "model": "model-a", "template": 0, "delta": delta})
    frame["ci_low"], frame["ci_high"] = frame["delta"] - half, frame["delta"] + half
    return frame


def _causal() -> dict[str, pd.DataFrame]:
    layers = np.arange(5)
    # Planted: skipping layer 3 moves EMT most (0.30); layer 1's effect (0.02) does not exclude zero.
    skip_delta = np.array([0.0, 0.02, 0.1, 0.30, 0.15])
    skipping = pd.concat(
        [
            _effects({"block": layers, "layer": layers + 1}, skip_delta),
            _effects({"block": layers, "layer": layers + 1}, 0.5 * layers, metric="log_perplexity"),
        ],
        ignore_index=True,
    )
    alphas = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    steer = pd.concat(
        [
            _effects(
                {"alpha": 90 * alphas, "alpha_norm_units": alphas, "layer": 2, "condition": "probe"},
                0.1 * alphas,
            ),
            # A random-direction control with a larger effect: it must never be the headline.
            _effects(
                {"alpha": 90 * alphas, "alpha_norm_units": alphas, "layer": 2, "condition": "random"},
                0.9 * alphas,
            ),
            _effects(
                {"alpha": 90 * alphas, "alpha_norm_units": alphas, "layer": 2, "condition": "probe"},
                alphas**2,
                metric="log_perplexity",
            ),
            _effects(
                {"alpha": 90 * alphas, "alpha_norm_units": alphas, "layer": 2, "condition": "random"},
                0.5 * alphas**2,
                metric="log_perplexity",
            ),
        ],
        ignore_index=True,
    )
    patching = []
    for d, s in (("toxic_to_nontoxic", 0.1), ("nontoxic_to_toxic", -0.1), ("toxic_to_toxic", 0.0)):
        p = _effects({"layer": layers, "direction": d, "measure": "readout", "readout_layer": 4}, s * layers)
        p["fraction_of_gap"] = np.where(s == 0, 0.0, layers / 4)
        p.loc[p["delta"] == 0, "fraction_of_gap"] = np.nan
        patching.append(p.drop(columns="metric"))
    return {"layer_skipping": skipping, "steering": steer, "patching": pd.concat(patching, ignore_index=True)}


def _continuations(models) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, scores = [], []
    for model in models:
        for p in range(6):
            for c in range(2):
                rows.append(
                    {
                        "model": model,
                        "template": 0,
                        "prompt_id": f"p{p}",
                        "continuation_idx": c,
                        "prompt_text": f"Prompt <{p}> & text",
                        "text": f"continuation {model} {p}.{c}",
                        "n_tokens": 5,
                        "stopped_at_eos": False,
                        "seed": 0,
                    }
                )
                scores.append(
                    {
                        "model": model,
                        "template": 0,
                        "prompt_id": f"p{p}",
                        "continuation_idx": c,
                        "toxicity": (p * 2 + c) / 12,
                        "insult": 0.1,
                        "threat": 0.0,
                    }
                )
    return pd.DataFrame(rows), pd.DataFrame(scores)


def _selfchecks(models) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "model": m,
                "template": 0,
                "dtype": "float32",
                "n_rows_checked": 8,
                "n_tokens_checked": 100,
                "max_abs_logprob_diff": 1e-5,
                "mean_abs_logprob_diff": 1e-6,
                "logprob_tolerance": 1e-3,
                "n_greedy_prompts": 3,
                "greedy_new_tokens": 20,
                "greedy_mismatches": 0,
                "greedy_ties": 0,
                "log_perplexity": 3.1 + i,
                "n_tokens_total": 500,
                "passed": True,
                "message": "ok",
            }
            for i, m in enumerate(models)
        ]
    )


def _results(tmp_path, rng, models=MODELS, config_models=None, templates=(0,), emt=None) -> RunResults:
    conts, scores = _continuations(models)
    probing = pd.concat([_probing(rng, m, templates) for m in models], ignore_index=True)
    return RunResults(
        run_dir=tmp_path,
        config={
            "name": "synthetic <run>",
            "description": "hand-made tables",
            "models": config_models
            or [{"spec": m, "name": m, "dtype": "float32", "quantization": None} for m in models],
            "generation": {"k": 2, "templates": list(templates)},
        },
        config_text='name = "synthetic"\n[generation]\nk = 2\n',
        prompts=pd.DataFrame({"prompt_id": [f"p{i}" for i in range(6)], "text": ["x"] * 6}),
        scores=scores,
        probing=probing,
        behaviour=_behaviour(models, templates, emt),
        interplay=_interplay() if len(models) >= 3 else None,
        continuations=conts,
        selfchecks=_selfchecks(models),
        timings=pd.DataFrame(
            {
                "key": ["prompts", "generate/model-a/t0", "report"],
                "name": ["prompts", "generate", "report"],
                "status": ["complete", "complete", "missing"],
                "seconds": [1.5, 30.25, None],
            }
        ),
        **_causal(),
    )


@pytest.fixture
def results(tmp_path, rng) -> RunResults:
    return _results(tmp_path, rng)


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _section(html: str, sid: str) -> str:
    return html.split(f'<section id="{sid}">')[1].split("</section>")[0]


def test_report_is_self_contained_with_every_section(results, tmp_path):
    path = render_report(results, tmp_path / "out" / "report.html", figure_dir=tmp_path / "figs")
    html = path.read_text()
    for section in (
        "overview",
        "generation",
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
    # main figure, 3 heatmap grids, selectivity, MDL, behaviour, interplay, skipping, steering, patching
    assert len(images) == 11
    assert all(img[:8] == b"\x89PNG\r\n\x1a\n" and len(img) > 3000 for img in images)
    # Every figure has a one-sentence reading guide under it.
    assert html.count("<figure") == len(images) == html.count('<p class="guide">How to read it: ')
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html
    assert "synthetic &lt;run&gt;" in html
    assert "30.250" in html and "generate/model-a/t0" in html
    assert "[generation]" in html and library_versions()["pandas"] in html
    # The report stage is being written while the report renders: never "missing".
    timings = _section(html, "timings")
    assert "this report (being written)" in timings and "missing" not in timings
    saved = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert "information.png" in saved and "heatmap-model-c.svg" in saved and len(saved) == 22


def test_peak_table_has_intervals_and_marks_peaks_indistinguishable_from_control(results, tmp_path):
    html = render_report(results, tmp_path / "r.html").read_text()
    peak = html.split("Peak information strength")[1].split("</table>")[0]
    assert re.search(r"<th>toxicity</th>\s*<th>insult</th>\s*<th>threat</th>", peak)  # canonical order
    cells = re.findall(r"<td>([0-9.]+ \[[0-9.]+, [0-9.]+\] L\d \(\d\.\d\d\)[^<]*)</td>", peak)
    assert len(cells) == 3 * 4 * 3 and all(" L4 (1.00)" in c for c in cells)  # planted: last layer
    rows = re.findall(r"<tr>(.*?)</tr>", peak, flags=re.S)
    backward = [r for r in rows if "<td>backward</td>" in r]
    others = [r for r in rows if "<td>backward</td>" not in r and "<td>model-" in r]
    assert len(backward) == 3 and all(r.count("†") == 3 for r in backward)  # planted null: control-level
    assert len(others) == 9 and not any("†" in r for r in others)
    assert "peak-picked over 5 layers" in html


def test_single_model_interplay_says_it_needs_several_models(tmp_path, rng):
    r = _results(tmp_path, rng, models=["model-a"])
    html = render_report(r, tmp_path / "r.html").read_text()
    text = _section(html, "interplay")
    assert "This run analysed 1 model." in text and "needs several models" in text
    assert "configs/zoo.toml" in text


class _DomReader(HTMLParser):
    """Headline rows (data-key/data-value per model box), table cells by table id, and images."""

    def __init__(self) -> None:
        super().__init__()
        self.headline: dict[tuple[str, str], str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._model: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "headline":
            self._model = a["data-model"]
        elif tag == "tr" and "data-key" in a and self._model is not None:
            self.headline[(self._model, a["data-key"])] = a["data-value"]
        elif tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    assert CHROMIUM, "needs Debian's chromium package (scripts/setup.sh --test installs it)"
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
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_report_in_headless_chromium_shows_the_run_tables(results, tmp_path):
    """Chromium's DOM: examples are rows of the run's tables, headline numbers equal them, figures draw."""
    import matplotlib.image as mpimg

    path = render_report(results, tmp_path / "report.html")
    dom = _DomReader()
    dom.feed(_chromium(["--dump-dom", path.as_uri()], tmp_path).stdout)
    # 1. Every example continuation shown is a row of the run's continuations and scores.
    conts = results.continuations.merge(
        results.scores, on=["model", "template", "prompt_id", "continuation_idx"]
    )
    header = [
        "model",
        "template",
        "example",
        "prompt_id",
        "continuation_idx",
        "toxicity",
        "prompt",
        "continuation",
    ]
    shown = [dict(zip(header, row, strict=True)) for row in dom.tables["examples"] if row]
    assert len(shown) == 3 * (3 + 2 + 3)
    for row in shown:
        match = conts[
            (conts["model"] == row["model"])
            & (conts["prompt_id"] == row["prompt_id"])
            & (conts["continuation_idx"] == int(row["continuation_idx"]))
        ]
        assert len(match) == 1, row
        m = match.iloc[0]
        assert (m["prompt_text"], m["text"]) == (row["prompt"], row["continuation"])
        assert float(row["toxicity"]) == pytest.approx(m["toxicity"], abs=5e-4)
    most = [r for r in shown if r["model"] == "model-b" and r["example"] == "most toxic"]
    assert float(most[0]["toxicity"]) == pytest.approx(results.scores["toxicity"].max(), abs=5e-4)
    # 2. Headline numbers equal the tables, recomputed here from the raw rows.
    probe = results.probing
    for model in MODELS:
        for scenario in SCENARIOS:
            curve = (
                probe[
                    (probe["model"] == model)
                    & (probe["scenario"] == scenario)
                    & (probe["attribute"] == "toxicity")
                ]
                .groupby("layer")["pearson"]
                .mean()
            )
            assert dom.headline[(model, f"peak/{scenario}")] == f"{curve.max():.3f}"
        b = results.behaviour
        for metric in ("emt", "toxicity_probability"):
            value = b[(b["model"] == model) & (b["metric"] == metric) & (b["attribute"] == "toxicity")][
                "value"
            ]
            assert dom.headline[(model, f"behaviour/{metric}")] == f"{value.iloc[0]:.3f}"
        check = results.selfchecks.set_index("model").loc[model]
        assert dom.headline[(model, "selfcheck/t0")] == f"{check['log_perplexity']:.3f}"
    # The strongest causal effect is the planted skipping effect (0.30), never the random-direction control.
    assert dom.headline[("model-a", "causal")] == "0.300"
    # 3. Every figure draws something: no blank or single-colour images.
    assert len(dom.images) == 11
    for src in dom.images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100 and np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 20
    # 4. It lays out: a screenshot has content.
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri()], tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100_000


def test_strongest_effect_says_none_when_no_interval_excludes_zero(results, tmp_path):
    results.layer_skipping = results.patching = None
    steer = results.steering
    steer.loc[steer["metric"] == "emt", ["ci_low", "ci_high"]] = [-1.0, 1.0]
    html = render_report(results, tmp_path / "r.html").read_text()
    assert "none distinguishable from zero (of 4 effects measured)" in _section(html, "overview")


def test_causal_effects_in_words_with_controls_marked():
    c = _causal()
    eff = findings.causal_effects(c["layer_skipping"], c["steering"], c["patching"])
    steer = eff[eff["experiment"] == "steering"]
    assert steer["control"].sum() == 4 and (~steer["control"]).sum() == 4  # alpha 0 left out
    assert "alpha +0.5 residual norms" in " ".join(steer["description"])
    assert steer.loc[~steer["control"], "fluency_delta"].tolist() == [1.0, 0.25, 0.25, 1.0]
    assert findings.direction_words("toxic_to_nontoxic").startswith("toxic prompt's activations patched into")
    assert "same-class control" in findings.direction_words("toxic_to_toxic")
    best, n = findings.strongest_effect(eff, "model-a")
    assert best["delta"] == pytest.approx(0.30) and "layer 4" in best["description"] and n == 9


def _steering_with_paired_control(probe_vs_random: float) -> pd.DataFrame:
    """Steering rows as `steering_sweep` writes them: probe, random and their paired difference at -0.25 x norm."""
    keys = {"alpha": [-0.25], "alpha_norm_units": [-0.25], "layer": 8}
    return pd.concat(
        [
            _effects({**keys, "direction": "probe"}, [-0.20]),
            _effects({**keys, "direction": "random"}, [-0.20 - probe_vs_random]),
            _effects({**keys, "direction": "probe_vs_random"}, [probe_vs_random]),
            _effects({**keys, "direction": "probe"}, [0.4], metric="log_perplexity"),
        ],
        ignore_index=True,
    )


@pytest.mark.parametrize(("difference", "beyond"), [(-0.12, True), (-0.03, False), (0.12, False)])
def test_steering_is_credited_only_beyond_the_random_direction(difference, beyond):
    # The probe's effect (-0.20 +- 0.05) excludes zero every time; it goes beyond its control only when the
    # paired probe-minus-random difference excludes zero with the same sign.
    eff = findings.causal_effects(None, _steering_with_paired_control(difference), None)
    probe = eff[~eff["control"]].iloc[0]
    assert probe["excludes_zero"] and probe["beyond_control"] is beyond
    assert probe["control_delta"] == pytest.approx(difference)
    best, _ = findings.strongest_effect(eff, "model-a", beyond_control=True)
    assert (best is not None) is beyond


def test_steering_is_judged_by_its_paired_contrast_even_when_the_push_itself_also_moves_the_text():
    # Measured pattern (quickstart, +0.35 x norm): any push of that norm lowers EMT, so the probe's change
    # against the unmodified model (+0.05 +- 0.1) includes zero while probe minus random (+0.15) does not.
    steer = _steering_with_paired_control(0.15)
    steer.loc[steer["direction"] == "probe", ["delta", "ci_low", "ci_high"]] = [0.05, -0.04, 0.15]
    eff = findings.causal_effects(None, steer, None)
    best, n = findings.strongest_effect(eff, "model-a", beyond_control=True)
    assert best is not None and best["control_delta"] == pytest.approx(0.15) and n == 1
    assert findings.strongest_effect(eff, "model-a")[0] is None  # against zero alone: nothing


def test_patching_is_credited_only_when_disjoint_from_its_same_class_control():
    patch = pd.concat(
        [
            _effects({"layer": [4], "direction": "nontoxic_to_toxic", "measure": "emt"}, [-0.30]),
            _effects({"layer": [4], "direction": "toxic_to_toxic", "measure": "emt"}, [-0.22]),  # overlaps
            _effects({"layer": [8], "direction": "nontoxic_to_toxic", "measure": "emt"}, [-0.30]),
            _effects({"layer": [8], "direction": "toxic_to_toxic", "measure": "emt"}, [0.0]),  # disjoint
        ],
        ignore_index=True,
    ).drop(columns="metric")
    eff = findings.causal_effects(None, None, patch)
    effect = eff[~eff["control"]].set_index("layer")
    assert effect.loc[4, "beyond_control"] is False and effect.loc[8, "beyond_control"] is True
    assert effect.loc[8, "control_delta"] == pytest.approx(0.0)


def test_headline_says_whether_the_effect_is_beyond_its_control(results, tmp_path):
    results.layer_skipping = results.patching = None
    results.steering = _steering_with_paired_control(-0.03)
    html = render_report(results, tmp_path / "r.html").read_text()
    assert "NOT beyond its control (paired difference from a random direction" in _section(html, "overview")
    results.steering = _steering_with_paired_control(-0.12)
    html = render_report(results, tmp_path / "r2.html").read_text()
    overview = _section(html, "overview")
    assert "beyond its control (paired difference" in overview and "NOT beyond" not in overview


# ------------------------------------------------------------------------------------------ case studies
def _finetuned_dir(root, arm: str, base_spec: str, step: int):
    merged = root / arm / "merged"
    merged.mkdir(parents=True)
    (merged / "finetune.json").write_text(
        json.dumps(
            {
                "arm": arm,
                "base": "/cache/x",
                "config": {"model": {"spec": base_spec, "dtype": "float32"}},
                "global_step": step,
            }
        )
    )
    for s in (5, 10):
        ck = root / arm / "checkpoints" / f"checkpoint-{s}"
        ck.mkdir(parents=True)
        (ck / "checkpoint.json").write_text(json.dumps({"step": s}))
    return merged


def test_lineage_links_variants_through_recorded_fields_not_names(tmp_path):
    merged = _finetuned_dir(tmp_path, "probe_dpo", "smollm2-135m-instruct", 15)
    config = {
        "models": [
            {
                "spec": "smollm2-135m-instruct",
                "name": "small",
                "dtype": "float32",
                "quantization": None,
                "variants": [
                    {"dtype": "float16", "quantization": None, "name": None},
                    {"dtype": "float32", "quantization": "int8", "name": "misleading-name"},
                ],
            },
            {
                "spec": "smollm2-135m-instruct",
                "name": "small@bf16-looking",
                "dtype": "bfloat16",
                "quantization": None,
            },
            # Named like a variant of "small", but a different spec: unrelated.
            {"spec": "gemma-3-270m", "name": "small@float16x", "dtype": "float32", "quantization": None},
            {"spec": str(merged), "name": "detox", "dtype": "float32", "quantization": None},
            {"spec": str(tmp_path / "probe_dpo" / "checkpoints" / "checkpoint-5"), "name": "c5"},
        ]
    }
    lin = cases.model_lineage(config).set_index("model")
    assert lin.loc["small", "relation"] == "base"
    assert lin.loc["small@float16", ["relation", "base"]].tolist() == ["precision", "small"]
    assert lin.loc["misleading-name", ["relation", "base"]].tolist() == ["precision", "small"]
    assert lin.loc["small@bf16-looking", ["relation", "base"]].tolist() == ["precision", "small"]
    assert lin.loc["small@float16x", "relation"] == "base"
    assert lin.loc["detox", ["relation", "base", "arm", "step"]].tolist() == [
        "finetuned",
        "small",
        "probe_dpo",
        15,
    ]
    assert lin.loc["c5", ["relation", "base", "step"]].tolist() == ["checkpoint", "small", 5]


def test_case_sections_appear_only_with_their_ingredients(tmp_path, rng):
    plain = render_report(_results(tmp_path, rng), tmp_path / "plain.html").read_text()
    assert "case-" not in plain
    merged = _finetuned_dir(tmp_path, "probe_dpo", "base-spec", 15)
    config_models = [
        {
            "spec": "base-spec",
            "name": "model-a",
            "dtype": "float32",
            "quantization": None,
            "variants": [{"dtype": "float16", "quantization": None, "name": "model-b"}],
        },
        {"spec": str(merged), "name": "model-c", "dtype": "float32", "quantization": None},
    ]
    # Planted: float16 EMT equal within noise (0.100 vs 0.105), the fine-tuned model clearly lower (0.02).
    r = _results(
        tmp_path,
        rng,
        config_models=config_models,
        templates=(0, 1),
        emt={"model-a": 0.10, "model-b": 0.105, "model-c": 0.02},
    )
    html = render_report(r, tmp_path / "cases.html").read_text()
    for sid in ("case-templates", "case-precision", "case-detox"):
        assert f'<section id="{sid}">' in html
    assert "case-checkpoints" not in html
    precision = _section(html, "case-precision")
    assert "Base model-a: EMT: 0 of 1 variants distinguishable from the base;" in precision
    detox = _section(html, "case-detox")
    assert "EMT: 1 of 1 fine-tuned models distinguishable from the base (model-c (-0.080))" in detox
    templates = _section(html, "case-templates")
    # Template 1 adds 0.2 to every EMT in the planted tables: beyond the +/-0.02 intervals.
    assert "model-a: EMT: 1 of 1 templates distinguishable from the base (1 (+0.200))" in templates


@pytest.mark.parametrize("name", ["quickstart.toml", "zoo.toml", "replication.toml"])
def test_lineage_names_are_the_pipelines_model_names(name):
    from pathlib import Path

    from aligned_probing.pipeline.config import RunConfig

    cfg = RunConfig.from_toml(Path(__file__).parents[1] / "configs" / name)
    assert cases.model_lineage(cfg.model_dump())["model"].tolist() == [v.name for v in cfg.model_variants()]


def test_corrected_statistics_are_used_when_the_tables_have_them(results, tmp_path, rng):
    # Interplay with the statistics issue's columns: the picked layer, its family-wise p, no interval + note.
    inter = results.interplay.assign(p_raw=0.01, p_fwer=0.04, q_bh=0.03, ci_note="", peak_picked=False)
    inter.loc[inter["layer"] == 2, ["peak_picked", "ci_low", "ci_high", "ci_note"]] = [
        True,
        np.nan,
        np.nan,
        "fewer than 4 models",
    ]
    results.interplay = inter
    # Probing with MDL gains in bits: the reliability section plots gains instead of compression.
    results.probing = results.probing.assign(mdl_gain_control=0.1, mdl_gain_baseline=0.2)
    html = render_report(results, tmp_path / "r.html").read_text()
    table = _section(html, "interplay").split("Peak correlation per scenario")[1]
    assert "<th>p_fwer</th>" in table and "<th>q_bh</th>" in table and table.count("fewer than 4 models") == 4
    assert table.count("<td>2</td>") == 4  # the picked layer of each scenario
    assert "no family-wise adjusted p" not in html
    reliability = _section(html, "reliability")
    assert (
        "MDL gain vs control (permuted) targets" in reliability
        and "MDL gain vs a features-free code" in reliability
    )
    assert "MDL compression (" not in reliability


def test_strongest_steering_effect_is_shown_with_its_control(results, tmp_path):
    results.layer_skipping = results.patching = None
    html = render_report(results, tmp_path / "r.html").read_text()
    box = _section(html, "overview").split('data-model="model-a"')[1]
    # Planted: probe direction +-0.1 at |alpha| = 1; the random direction at the same alpha moves EMT 0.9.
    assert (
        "steering along the probe direction at layer 2 with alpha -1 residual norms: EMT -0.100 [-0.150, -0.050]"
        in box
    )
    assert "its control: EMT -0.900 [-0.950, -0.850]" in box


def test_a_patching_effect_is_paired_with_the_control_of_its_target_class():
    from aligned_probing.report.findings import matching_control

    rows = [
        {"direction": d, "control": d in ("toxic_to_toxic", "nontoxic_to_nontoxic"), "model": "m",
         "experiment": "patching", "layer": 20, "strength": float("nan"), "delta": v}
        for d, v in [("nontoxic_to_nontoxic", -0.05), ("toxic_to_toxic", -0.23), ("nontoxic_to_toxic", -0.32)]
    ]
    effects = pd.DataFrame(rows)
    effect = effects.iloc[2]  # the non-toxic prompt's activations patched into a toxic prompt
    assert matching_control(effects, effect)["direction"] == "toxic_to_toxic"
