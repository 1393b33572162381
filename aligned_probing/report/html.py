"""One self-contained HTML report of a run: headline findings, figures with reading guides, tables.

The file needs no server and no network (no external CSS, fonts or scripts), so it can be mailed
or archived with the run. Figures come from `aligned_probing.report.plots`; the statistics they show
come from the run's tables (`findings` picks peaks and effects, `cases` links variants to their base),
never from the plot functions.

Example:
    >>> build_report("runs/quickstart")  # doctest: +SKIP
    PosixPath('runs/quickstart/report.html')
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from aligned_probing.probing import summarize
from aligned_probing.report import case_sections, cases, findings, plots, sections
from aligned_probing.report.layout import Figure, Section, html_table

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


#: Example continuations shown per model and template: the most toxic, the least toxic, random ones.
N_EXAMPLES = {"most toxic": 3, "least toxic": 2, "random": 3}


def example_continuations(
    conts: pd.DataFrame,
    scores: pd.DataFrame | None,
    seed: int = 0,
    counts: Mapping[str, int] = N_EXAMPLES,
) -> pd.DataFrame:
    """Per model and template: the most and least toxic continuations and seeded random ones.

    `counts` says how many of each kind; ranked by toxicity when scores exist. The report's "Example
    continuations" table and the reference exports (`scripts/export_reference.py`) both use it.
    """
    keys = ["model", "template", "prompt_id", "continuation_idx"]
    table = conts
    if scores is not None and "toxicity" in scores.columns:
        table = conts.merge(scores[[*keys, "toxicity"]], on=keys, how="left")
    rows = []
    for (model, template), group in table.groupby(["model", "template"], sort=False):
        picks: list[tuple[str, pd.DataFrame]] = []
        if "toxicity" in group.columns:
            ranked = group.sort_values("toxicity", ascending=False, kind="stable")
            picks += [
                ("most toxic", ranked.head(counts["most toxic"])),
                ("least toxic", ranked.tail(counts["least toxic"]).iloc[::-1]),
            ]
        picks.append(("random", group.sample(min(counts["random"], len(group)), random_state=seed)))
        for kind, sub in picks:
            for r in sub.itertuples(index=False):
                rows.append(
                    {
                        "model": model,
                        "template": template,
                        "example": kind,
                        "prompt_id": r.prompt_id,
                        "continuation_idx": r.continuation_idx,
                        "toxicity": round(float(getattr(r, "toxicity", float("nan"))), 3),
                        "prompt": r.prompt_text,
                        "continuation": r.text,
                    }
                )
    return pd.DataFrame(rows)


def _generation_section(r: RunResults) -> Section:
    """The text the numbers come from: self-check figures and example continuations per model."""
    section = Section(
        "generation",
        "Generated text",
        "Every number in this report is computed from these continuations. The self-check recomputes the "
        "log-probabilities of sampled tokens without the KV cache (they must agree with those recorded while "
        "sampling) and compares cached with uncached greedy decoding; log-perplexity is the mean negative "
        "log-likelihood per generated token under the model itself "
        "(lower = more fluent; fluent SmolLM2 samples "
        "are about 3 nats, token salad above 6).",
        empty="No continuations were generated in this run.",
    )
    if r.selfchecks is not None:
        cols = [
            "model",
            "template",
            "passed",
            "log_perplexity",
            "n_tokens_total",
            "max_abs_logprob_diff",
            "logprob_tolerance",
            "n_rows_checked",
            "greedy_mismatches",
            "greedy_ties",
            "n_greedy_prompts",
        ]
        checks = r.selfchecks[[c for c in cols if c in r.selfchecks.columns]].copy()
        for c in ("max_abs_logprob_diff", "logprob_tolerance"):
            if c in checks.columns:
                checks[c] = [f"{float(v):.1e}" for v in checks[c]]
        section.tables.append(html_table(checks, "Generation self-check", table_id="selfcheck"))
    if r.continuations is not None:
        section.tables.append(
            html_table(
                example_continuations(r.continuations, r.scores), "Example continuations", table_id="examples"
            )
        )
    return section


def _alerts(r: RunResults) -> list[str]:
    """Messages shown at the very top: failed self-checks that the config downgraded to warnings."""
    if r.selfchecks is None:
        return []
    return [str(m) for m in r.selfchecks.loc[~r.selfchecks["passed"].astype(bool), "message"]]


#: Probing metrics the report summarises when the probing table has them (MDL gains come with the statistics
#: issue's sweep; older tables have `compression` only).
REPORT_METRICS: tuple[str, ...] = (
    "pearson",
    "r2",
    "rmse",
    "control_pearson",
    "selectivity",
    "mdl_gain_control",
    "mdl_gain_baseline",
    "compression",
)


def _summary(probing: pd.DataFrame) -> pd.DataFrame:
    return summarize(probing, metrics=[m for m in REPORT_METRICS if m in probing.columns])


def _timings(timings: pd.DataFrame) -> pd.DataFrame:
    """The stage table, with the report stage shown as being written (it is, while this runs)."""
    if timings.empty or "name" not in timings.columns:
        return timings
    out = timings.copy()
    writing = (out["name"] == "report") & (out["status"] != "complete")
    out.loc[writing, "status"] = "this report (being written)"
    return out


def _overview(r: RunResults, boxes: list[Any]) -> Section:
    cfg = r.config
    models = pd.DataFrame(
        [
            {k: m.get(k) or "-" for k in ("name", "spec", "dtype", "quantization")}
            for m in cfg.get("models", [])
        ]
    )
    overview = Section(
        "overview",
        "Overview",
        "Headline per model. Peaks are picked over layers (their intervals are optimistic; a family-wise "
        "adjusted p is shown where the tables carry one); behaviour "
        "intervals are bootstrap 95% CIs over prompts.",
        tables=[html_table(models, "Models")],
        headlines=boxes,
    )
    if r.prompts is not None:
        data = {
            "prompts": len(r.prompts),
            "continuations per prompt": cfg["generation"]["k"],
            "templates": str(cfg["generation"]["templates"]),
        }
        overview.tables.append(html_table(pd.DataFrame([data]), "Data"))
    return overview


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

    def add(fig_id: str, title: str, caption: str, fig: Any, *, guide: str, wide: bool = False) -> Figure:
        return Figure(fig_id, title, caption, guide, _png(fig, fig_id, fdir, formats), wide)

    r = results
    summary = _summary(r.probing) if r.probing is not None else None
    peaks = (
        findings.peak_table(summary) if summary is not None and "pearson" in set(summary["metric"]) else None
    )
    effects = findings.causal_effects(r.layer_skipping, r.steering, r.patching)
    lineage = cases.model_lineage(r.config)
    measures = cases.model_measures(peaks, r.behaviour)
    case_parts = [s for s in [case_sections.template_section(measures, add)] if s is not None]
    case_parts += case_sections.variant_sections(lineage, measures, add)
    cfg = r.config
    timings = _timings(r.timings)
    all_sections = [
        _overview(r, sections.headlines(r, peaks, effects)),
        _generation_section(r),
        sections.information_section(summary, peaks, add),
        sections.reliability_section(summary, add),
        sections.behaviour_section(r, add),
        sections.interplay_section(r, add, n_models=len(lineage)),
        sections.causal_section(r, add, effects),
        *case_parts,
        Section(
            "timings",
            "Timings",
            "Compute time of each stage when it ran (cached stages keep theirs).",
            tables=[html_table(timings, "Stages")] if len(timings) else [],
        ),
        Section("config", "Configuration", pre=r.config_text or _json(cfg)),
        Section(
            "versions",
            "Library versions",
            tables=[
                html_table(
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
        run_dir=str(r.run_dir),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        version=library_versions()["aligned-probing"],
        sections=all_sections,
        alerts=_alerts(r),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _json(obj: Any) -> str:
    import json

    return html.unescape(json.dumps(obj, indent=2, default=str))
