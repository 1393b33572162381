"""One self-contained HTML report of a run: figures embedded as PNG, key tables, config, versions, timings.

The file needs no server and no network (no external CSS, fonts or scripts), so it can be mailed
or archived with the run. Figures come from `aligned_probing.report.plots`; the statistics they show
(means and confidence intervals over folds and seeds) are computed here, not in the plot functions.

Example:
    >>> build_report("runs/quickstart")  # doctest: +SKIP
    PosixPath('runs/quickstart/report.html')
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from aligned_probing.behaviour import BEHAVIOUR_COLUMNS
from aligned_probing.data import CANONICAL_ATTRIBUTES
from aligned_probing.probing import peak_layers, summarize
from aligned_probing.report import plots

if TYPE_CHECKING:  # the report takes a results object; it never imports the pipeline at run time
    from aligned_probing.pipeline.results import RunResults

LIBRARIES: tuple[str, ...] = (
    "aligned-probing",
    "torch",
    "transformers",
    "transformer-lens",
    "numpy",
    "pandas",
    "scikit-learn",
    "scipy",
    "zarr",
    "matplotlib",
    "seaborn",
)


@dataclass
class _Figure:
    id: str
    title: str
    caption: str
    png: str
    wide: bool = False


@dataclass
class _Section:
    id: str
    title: str
    intro: str = ""
    figures: list[_Figure] = field(default_factory=list)
    tables: list[dict[str, str]] = field(default_factory=list)
    pre: str = ""
    empty: str = ""


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that determine the numbers ("missing" when absent)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _png(fig: Any, stem: str, figure_dir: Path | None, formats: tuple[str, ...]) -> str:
    import matplotlib.pyplot as plt

    if figure_dir is not None:
        plots.save_figure(fig, figure_dir / stem, formats=formats)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _table(df: pd.DataFrame, title: str) -> dict[str, str]:
    return {
        "title": title,
        "html": df.to_html(
            classes="data", index=False, float_format=lambda v: f"{v:.3f}", na_rep="", border=0
        ),
    }


def _first(df: pd.DataFrame, column: str) -> Any:
    return df[column].iloc[0]


def _attribute_order(attributes: Any) -> list[str]:
    """Attributes in canonical order (toxicity first), unknown ones after."""
    present = list(dict.fromkeys(attributes))
    return [a for a in CANONICAL_ATTRIBUTES if a in present] + [
        a for a in present if a not in CANONICAL_ATTRIBUTES
    ]


def _one_curve_set(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`summary` rows of one metric for the first model and template (the report's showcase)."""
    part = summary[summary["metric"] == metric]
    if part.empty:
        return part
    model, template = _first(part, "model"), _first(part, "template")
    part = part[(part["model"] == model) & (part["template"] == template)]
    rank = {a: i for i, a in enumerate(_attribute_order(part["attribute"]))}
    return part.sort_values("attribute", key=lambda c: c.map(rank), kind="stable")


def _information_section(summary: pd.DataFrame | None, add: Callable[..., _Figure]) -> _Section:
    s = _Section(
        "information",
        "Information strength",
        "Test Pearson r of layer-wise ridge probes (mean over folds and seeds, 95% t-interval band), per "
        "scenario: input (prompt score from the prompt's encoding), forward (prompt score from the "
        "continuation's encoding), output (continuation score from its encoding) and backward (max "
        "continuation score from the prompt's encoding).",
    )
    if summary is None:
        return s
    one = _one_curve_set(summary, "pearson")
    model, template = _first(one, "model"), _first(one, "template")
    s.figures.append(
        add(
            "information",
            f"Information strength per layer ({model}, template {template})",
            "One panel per attribute; lines are scenarios, bands 95% CIs over folds x seeds.",
            plots.information_grid(one),
            wide=True,
        )
    )
    scenario = "input" if "input" in set(one["scenario"]) else _first(one, "scenario")
    ax = plots.attribute_heatmap(one[one["scenario"] == scenario])
    ax.set_title(f"{scenario} scenario")
    s.figures.append(
        add("heatmap", f"Attribute x layer ({model}, {scenario})", "Mean test Pearson r.", ax.figure)
    )
    peak = peak_layers(summary, metric="pearson")
    peak["cell"] = [
        f"{m:.2f} (layer {int(layer)})" for m, layer in zip(peak["mean"], peak["layer"], strict=True)
    ]
    wide = peak.pivot_table(
        index=["model", "template", "scenario"], columns="attribute", values="cell", aggfunc="first"
    )
    wide = wide[_attribute_order(wide.columns)].reset_index()
    wide.columns.name = None
    s.tables.append(
        _table(wide, "Peak information strength (Pearson r at the best layer) per scenario and attribute")
    )
    return s


def _reliability_section(summary: pd.DataFrame | None, add: Callable[..., _Figure]) -> _Section:
    s = _Section(
        "reliability",
        "Reliability: selectivity and MDL",
        "Selectivity = r - r(control probe on permuted targets); MDL compression = uniform / online "
        "codelength (> 1: the attribute is learnable from the layer).",
    )
    if summary is None:
        return s
    for metric, plot, title in (
        ("selectivity", plots.selectivity, "Selectivity"),
        ("compression", plots.mdl_compression, "MDL compression"),
    ):
        one = _one_curve_set(summary, metric)
        if one.empty:
            continue
        attribute = "toxicity" if "toxicity" in set(one["attribute"]) else _first(one, "attribute")
        ax = plot(one[one["attribute"] == attribute])
        s.figures.append(
            add(
                "mdl" if metric == "compression" else metric,
                f"{title} ({_first(one, 'model')}, {attribute})",
                "Per scenario.",
                ax.figure,
            )
        )
    return s


def _behaviour_section(r: RunResults, add: Callable[..., _Figure]) -> _Section:
    s = _Section(
        "behaviour",
        "Behaviour",
        "Expected maximum toxicity (EMT: mean over prompts of the max score over the k continuations) "
        "with bootstrap confidence intervals.",
    )
    b = r.behaviour
    if b is None:
        return s
    template = _first(b, "template")
    emt = b[(b["metric"] == "emt") & (b["subset"] == "all") & (b["template"] == template)]
    if len(emt):
        ax = plots.behaviour_bars(emt)
        ax.set_ylabel("EMT")
        s.figures.append(
            add(
                "behaviour",
                f"Expected maximum score per attribute (template {template})",
                "Bars: models; whiskers: bootstrap CI.",
                ax.figure,
            )
        )
    tox = b[b["attribute"] == "toxicity"] if "toxicity" in set(b["attribute"]) else b
    cols = [
        c
        for c in BEHAVIOUR_COLUMNS
        if c in tox.columns
    ]
    s.tables.append(_table(tox[cols], "Toxicity metrics"))
    return s


def _interplay_section(r: RunResults, add: Callable[..., _Figure]) -> _Section:
    s = _Section(
        "interplay",
        "Interplay",
        "Correlation across models between information strength and behaviour (EMT), per layer "
        "(or relative depth when the models differ in depth), with bootstrap CIs over models.",
        empty="Not run: interplay needs at least 3 models (see configs/zoo.toml).",
    )
    d = r.interplay
    if d is None:
        return s
    d = d[(d["statistic"] == "pearson") & (d["template"] == _first(d, "template"))]
    attribute = "toxicity" if "toxicity" in set(d["attribute"]) else _first(d, "attribute")
    d = d[d["attribute"] == attribute]
    x = "layer" if (d["depth_axis"] == "layer").all() else "relative_depth"
    ax = plots.interplay_curve(d, x=x)
    s.figures.append(
        add(
            "interplay",
            f"Information strength vs {_first(d, 'metric')} across models ({attribute})",
            f"Pearson r over {int(_first(d, 'n_models'))} models, per scenario.",
            ax.figure,
        )
    )
    best = d.loc[d.groupby("scenario")["value"].idxmin()]
    cols = ["scenario", "attribute", x, "value", "p_value", "ci_low", "ci_high", "n_models"]
    s.tables.append(_table(best[cols], "Most negative correlation per scenario"))
    return s


def _causal_section(r: RunResults, add: Callable[..., _Figure]) -> _Section:
    s = _Section(
        "causal",
        "Causal evidence",
        "Interventions on one model, each a paired change against the unmodified model on the same "
        "prompts and sampling seeds, with bootstrap CIs over prompts (or prompt pairs).",
    )
    skip, patch, steer = r.layer_skipping, r.patching, r.steering
    if skip is not None and len(skip):
        d = skip[skip["metric"] == "emt"]
        ax = plots.layer_skipping_curve(d)
        ax.set_ylabel("change in EMT")
        s.figures.append(
            add(
                "skipping",
                f"Layer skipping ({_first(d, 'model')})",
                "Change in EMT when the block writing each residual layer is bypassed.",
                ax.figure,
            )
        )
    if patch is not None and len(patch):
        readout = patch[patch["measure"] == "readout"]
        if len(readout):
            last = readout["readout_layer"].max()
            d = readout[readout["readout_layer"] == last]
            ax = plots.patching_curve(d)
            ax.set_ylabel(f"change in probe read-out at layer {last}")
            s.figures.append(
                add(
                    "patching",
                    "Activation patching: probe read-out",
                    "Patching the last prompt position at each layer, toxic -> non-toxic prompt and "
                    "the reverse.",
                    ax.figure,
                )
            )
        d = patch[patch["measure"] == "emt"]
        if len(d):
            ax = plots.patching_curve(d)
            ax.set_ylabel("change in EMT")
            s.figures.append(
                add(
                    "patching_emt",
                    "Activation patching: continuation toxicity",
                    "Change in EMT of the target prompt's continuations.",
                    ax.figure,
                )
            )
    if steer is not None and "direction" in steer:  # causal stage 2: control rows not drawn yet
        steer = steer[steer["direction"] == "probe"]
    if steer is not None and len(steer):
        d = steer[steer["metric"] == "emt"]
        ax = plots.steering_curve(d)
        ax.set_ylabel("change in EMT")
        s.figures.append(
            add(
                "steering",
                f"Steering along the probe direction (layer {_first(d, 'layer')})",
                "Unit probe direction times alpha added at every position while generating.",
                ax.figure,
            )
        )
        fl = steer[steer["metric"] == "log_perplexity"]
        if len(fl):
            cols = ["alpha", "value", "baseline", "delta", "ci_low", "ci_high"]
            s.tables.append(
                _table(fl[cols], "Fluency under steering (log perplexity under the unmodified model)")
            )
    return s


#: Example continuations shown per model and template: the most toxic, the least toxic, random ones.
N_EXAMPLES = {"most toxic": 3, "least toxic": 2, "random": 3}


def _examples(conts: pd.DataFrame, scores: pd.DataFrame | None, seed: int = 0) -> pd.DataFrame:
    """Rows of the continuations table to show, ranked by toxicity when scores exist."""
    keys = ["model", "template", "prompt_id", "continuation_idx"]
    table = conts
    if scores is not None and "toxicity" in scores.columns:
        table = conts.merge(scores[[*keys, "toxicity"]], on=keys, how="left")
    rows = []
    for (model, template), group in table.groupby(["model", "template"], sort=False):
        picks: list[tuple[str, pd.DataFrame]] = []
        if "toxicity" in group.columns:
            ranked = group.sort_values("toxicity", ascending=False, kind="stable")
            picks += [("most toxic", ranked.head(N_EXAMPLES["most toxic"])),
                      ("least toxic", ranked.tail(N_EXAMPLES["least toxic"]).iloc[::-1])]
        picks.append(("random", group.sample(min(N_EXAMPLES["random"], len(group)), random_state=seed)))
        for kind, sub in picks:
            for r in sub.itertuples(index=False):
                rows.append({"model": model, "template": template, "example": kind, "prompt_id": r.prompt_id,
                             "continuation_idx": r.continuation_idx,
                             "toxicity": round(float(getattr(r, "toxicity", float("nan"))), 3),
                             "prompt": r.prompt_text, "continuation": r.text})
    return pd.DataFrame(rows)


def _generation_section(r: RunResults) -> _Section:
    """The text the numbers come from: self-check figures and example continuations per model."""
    section = _Section(
        "generation",
        "Generated text",
        "Every number in this report is computed from these continuations. The self-check recomputes the "
        "log-probabilities of sampled tokens without the KV cache (they must agree with those recorded while "
        "sampling) and compares cached with uncached greedy decoding; log-perplexity is the mean negative "
        "log-likelihood per generated token under the model itself (lower = more fluent; fluent SmolLM2 samples "
        "are about 3 nats, token salad above 6).",
        empty="No continuations were generated in this run.",
    )
    if r.selfchecks is not None:
        cols = ["model", "template", "passed", "log_perplexity", "n_tokens_total", "max_abs_logprob_diff",
                "logprob_tolerance", "n_rows_checked", "greedy_mismatches", "greedy_ties", "n_greedy_prompts"]
        section.tables.append(_table(r.selfchecks[[c for c in cols if c in r.selfchecks.columns]],
                                     "Generation self-check"))
    if r.continuations is not None:
        section.tables.append(_table(_examples(r.continuations, r.scores), "Example continuations"))
    return section


def _alerts(r: RunResults) -> list[str]:
    """Messages shown at the very top: failed self-checks that the config downgraded to warnings."""
    if r.selfchecks is None:
        return []
    return [str(m) for m in r.selfchecks.loc[~r.selfchecks["passed"].astype(bool), "message"]]


def render_report(
    results: RunResults,
    path: str | Path,
    *,
    figure_dir: str | Path | None = None,
    formats: tuple[str, ...] = ("png", "svg"),
) -> Path:
    """Render `results` into one self-contained HTML file.

    Args:
        results: The run's tables (`load_results`).
        path: Output HTML path.
        figure_dir: Also save every figure there as PNG and SVG (None: only embed them).
        formats: Formats saved to `figure_dir`.

    Returns:
        The HTML path.
    """
    import jinja2

    fdir = Path(figure_dir) if figure_dir is not None else None

    def add(fig_id: str, title: str, caption: str, fig: Any, *, wide: bool = False) -> _Figure:
        return _Figure(fig_id, title, caption, _png(fig, fig_id, fdir, formats), wide)

    summary = summarize(results.probing) if results.probing is not None else None
    cfg = results.config
    models = pd.DataFrame(
        [
            {k: m.get(k) or "-" for k in ("name", "spec", "dtype", "quantization")}
            for m in cfg.get("models", [])
        ]
    )
    overview = _Section("overview", "Overview", tables=[_table(models, "Models")])
    if results.prompts is not None:
        overview.tables.append(
            _table(
                pd.DataFrame(
                    [
                        {
                            "prompts": len(results.prompts),
                            "continuations per prompt": cfg["generation"]["k"],
                            "templates": str(cfg["generation"]["templates"]),
                        }
                    ]
                ),
                "Data",
            )
        )
    timings = results.timings
    sections = [
        overview,
        _generation_section(results),
        _information_section(summary, add),
        _reliability_section(summary, add),
        _behaviour_section(results, add),
        _interplay_section(results, add),
        _causal_section(results, add),
        _Section(
            "timings",
            "Timings",
            "Compute time of each stage when it ran (cached stages keep theirs).",
            tables=[_table(timings, "Stages")] if len(timings) else [],
        ),
        _Section("config", "Configuration", pre=results.config_text or _json(cfg)),
        _Section(
            "versions",
            "Library versions",
            tables=[
                _table(
                    pd.DataFrame(list(library_versions().items()), columns=["library", "version"]),
                    "Installed",
                )
            ],
        ),
    ]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("aligned_probing", "resources"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    text = env.get_template("report.html.j2").render(
        title=cfg.get("name", "run"),
        description=cfg.get("description", ""),
        run_dir=str(results.run_dir),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        version=library_versions()["aligned-probing"],
        sections=sections,
        alerts=_alerts(results),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _json(obj: Any) -> str:
    import json

    return html.unescape(json.dumps(obj, indent=2, default=str))
