"""Read a run directory back into tidy tables (what the report and the notebooks start from).

`load_results(run_dir)` gives the tables, the continuations, the activation store of each
(model, template) (opened lazily) and the probes the probe stage fitted on all prompts:

    >>> res = load_results("runs/quickstart")  # doctest: +SKIP
    >>> res.probing.groupby(["scenario", "layer"])["pearson"].mean()  # doctest: +SKIP
    >>> res.stores["smollm2-135m", 0].layer(6)  # doctest: +SKIP
    >>> res.probe(layer=6, scenario="input", attribute="toxicity").direction()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from aligned_probing.pipeline import fs as _fs
from aligned_probing.pipeline.registry import STAGES
from aligned_probing.pipeline.runner import read_stage, stage_dir, stage_hashes

if TYPE_CHECKING:
    from aligned_probing.encoding.store import ActivationStore
    from aligned_probing.probing import RidgeProbe

# Output tables of each stage kind (inside its stage directory), from the stage registry.
OUTPUTS: dict[str, tuple[str, ...]] = {spec.name: spec.outputs for spec in STAGES if spec.outputs}


class StoreHandles(Mapping[tuple[str, int], "ActivationStore"]):
    """The activation store of each (model, template), opened on first access (then kept)."""

    def __init__(
        self, locations: dict[tuple[str, int], _fs.Resolved], storage_options: _fs.StorageOptions = None
    ) -> None:
        self.locations = dict(locations)
        self._options = dict(storage_options or {})
        self._open: dict[tuple[str, int], ActivationStore] = {}

    def __getitem__(self, key: tuple[str, int]) -> ActivationStore:
        if key not in self.locations:
            raise KeyError(
                f"no activation store for {key!r}; (model, template) keys: {sorted(self.locations)}"
            )
        if key not in self._open:
            from aligned_probing.encoding.store import ActivationStore

            self._open[key] = ActivationStore.open(self.locations[key], storage_options=self._options)
        return self._open[key]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.locations)

    def __len__(self) -> int:
        return len(self.locations)

    def __repr__(self) -> str:
        return f"StoreHandles({sorted(self.locations)})"


@dataclass
class RunResults:
    """The tables of one run, concatenated over models and templates (None when a stage has not run).

    Attributes:
        run_dir: The run directory (a `Path`, or a URL string on object storage).
        config: The run's config as a dict (`RunConfig.model_dump`).
        config_text: The TOML text the run was started from ("" when unknown).
        prompts: Prompt table with `prompt_{attribute}` scores.
        scores: Continuation scores: `model`, `template`, `prompt_id`, `continuation_idx`, attributes.
        probing: Probing results (docs/architecture.md).
        behaviour: Behaviour metrics.
        interplay: Interplay correlations.
        layer_skipping: Layer-skipping effects.
        patching: Patching effects.
        steering: Steering effects.
        timings: One row per stage: `key`, `name`, `status`, `seconds` (compute time when it ran).
        continuations: Every generated continuation (docs/architecture.md), all models and templates.
        selfchecks: One row per generate stage: the generation self-check's measurements
            (`aligned_probing.generation_checks.GenerationCheck`), with `model` and `template`.
        stores: The activation store of each (model, template), opened lazily.
        probes: One row per probe the probe stages fitted on all prompts: `model`, `template`,
            `scenario`, `attribute`, `layer`, `location` (load one with `probe(...)`).
        storage_options: fsspec options of a URL `run_dir`.
    """

    run_dir: _fs.Resolved
    config: dict[str, Any]
    config_text: str = ""
    prompts: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    probing: pd.DataFrame | None = None
    behaviour: pd.DataFrame | None = None
    interplay: pd.DataFrame | None = None
    layer_skipping: pd.DataFrame | None = None
    patching: pd.DataFrame | None = None
    steering: pd.DataFrame | None = None
    timings: pd.DataFrame = field(default_factory=pd.DataFrame)
    continuations: pd.DataFrame | None = None
    selfchecks: pd.DataFrame | None = None
    stores: StoreHandles = field(default_factory=lambda: StoreHandles({}))
    probes: pd.DataFrame | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def probe(
        self,
        *,
        layer: int,
        scenario: str = "input",
        attribute: str = "toxicity",
        model: str | None = None,
        template: int | None = None,
    ) -> RidgeProbe:
        """The probe fitted on all prompts at `layer` for (`scenario`, `attribute`), as the stage saved it.

        Args:
            layer: Residual layer (0 = embeddings).
            scenario: Probing scenario.
            attribute: Scored attribute.
            model: Display name; None when the run has one model.
            template: Prompt template; None when the run has one.

        Returns:
            A fitted `RidgeProbe` (1 target) with its `fingerprint_`.

        Raises:
            LookupError: No such probe, or `model`/`template` is needed to choose one (the message
                lists them).
        """
        from aligned_probing.pipeline.probes import read_probe

        if self.probes is None:
            raise LookupError(f"no probe stage of {self.run_dir} has completed: run the `probe` stage first.")
        table = rows = self.probes
        for column, value in (("model", model), ("template", template)):
            if value is not None:
                rows = rows[rows[column] == value]
            elif rows[column].nunique() > 1:
                values = sorted(rows[column].unique().tolist())
                raise LookupError(f"{column} must be one of {values}: this run has several.")
        rows = rows[
            (rows["layer"] == layer) & (rows["scenario"] == scenario) & (rows["attribute"] == attribute)
        ]
        if len(rows) != 1:
            have = table[["model", "template", "scenario", "attribute"]].drop_duplicates()
            layers = sorted(table["layer"].unique().tolist())
            raise LookupError(
                f"no saved probe for layer={layer}, scenario={scenario!r}, attribute={attribute!r}, "
                f"model={model!r}, template={template!r}; the run has layers {layers} of:\n"
                f"{have.to_string(index=False)}"
            )
        return read_probe(rows["location"].iloc[0], self.storage_options)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else None


def load_results(run_dir: _fs.Location, storage_options: _fs.StorageOptions = None) -> RunResults:
    """Load every completed stage output of a run directory.

    The stages are found from the run's `config.json` and their content hashes, so a stage whose
    settings changed since it ran is not mixed in.

    Args:
        run_dir: A directory written by `aligned_probing.pipeline.run`, or its fsspec URL.
        storage_options: fsspec options of a URL `run_dir` (`endpoint_url`, ...).

    Returns:
        The tables; a stage that has not completed contributes None.
    """
    from aligned_probing.pipeline import CONFIG_FILE, CONFIG_TOML, build_plan, load_config

    run_dir = _fs.resolve(run_dir)
    config = load_config(run_dir, storage_options)
    plan = build_plan(config)
    hashes = stage_hashes(plan)
    tables: dict[str, list[pd.DataFrame]] = {}
    timing_rows = []
    by_key = {stage.key: stage for stage in plan}
    stores: dict[tuple[str, int], _fs.Resolved] = {}
    for stage in plan:
        out = stage_dir(run_dir, stage.key, hashes[stage.key])
        record = read_stage(out, storage_options)
        timing_rows.append(
            {
                "key": stage.key,
                "name": stage.name,
                "status": "complete" if record else "missing",
                "seconds": record.get("seconds") if record else None,
            }
        )
        if stage.name == "generate":
            _read_generation(stage, out, tables, storage_options)
        if record is None:
            continue
        if stage.name == "encode":
            stores[(stage.settings.model.name, stage.settings.template)] = _fs.child(out, "store")
        if stage.name == "probe":
            _list_probes(stage, by_key, out, tables, storage_options)
        for filename in OUTPUTS.get(stage.name, ()):
            location = _fs.child(out, filename)
            if _fs.exists(location, storage_options):
                tables.setdefault(filename.removesuffix(".parquet"), []).append(
                    _fs.read_parquet(location, storage_options)
                )
    toml_path = _fs.child(run_dir, CONFIG_TOML)
    config_text = _fs.read_text(toml_path, storage_options) if _fs.exists(toml_path, storage_options) else ""
    return RunResults(
        run_dir=run_dir,
        config=json.loads(_fs.read_text(_fs.child(run_dir, CONFIG_FILE), storage_options)),
        config_text=config_text,
        prompts=_concat(tables.get("prompts", [])),
        scores=_concat(tables.get("scores", [])),
        probing=_concat(tables.get("probing", [])),
        behaviour=_concat(tables.get("behaviour", [])),
        interplay=_concat(tables.get("interplay", [])),
        layer_skipping=_concat(tables.get("layer_skipping", [])),
        patching=_concat(tables.get("patching", [])),
        steering=_concat(tables.get("steering", [])),
        timings=pd.DataFrame(timing_rows),
        continuations=_concat(tables.get("continuations", [])),
        selfchecks=_concat(tables.get("selfchecks", [])),
        stores=StoreHandles(stores, storage_options),
        probes=_concat(tables.get("probes", [])),
        storage_options=dict(storage_options or {}),
    )


def _list_probes(
    stage: Any, by_key: dict[str, Any], out: _fs.Resolved, tables: dict[str, list[pd.DataFrame]],
    storage_options: _fs.StorageOptions,
) -> None:
    """The saved probes of a complete probe stage, labelled with the model and template it read."""
    from aligned_probing.pipeline.probes import list_probes

    encode = next(by_key[d] for d in stage.deps if by_key[d].name == "encode")
    listed = list_probes(out, storage_options)
    listed.insert(0, "template", encode.settings.template)
    listed.insert(0, "model", encode.settings.model.name)
    tables.setdefault("probes", []).append(listed)


def _read_generation(
    stage: Any, out: _fs.Resolved, tables: dict[str, list[pd.DataFrame]], storage_options: _fs.StorageOptions
) -> None:
    """Continuations and the self-check record of a generate stage (also of one that stopped on it)."""
    from aligned_probing.pipeline.stages import read_continuations, read_selfcheck

    check = read_selfcheck(out, storage_options)
    if check is not None:
        row = {"template": stage.settings.template, **{k: v for k, v in check.items() if k != "details"}}
        tables.setdefault("selfchecks", []).append(pd.DataFrame([row]))
    conts = read_continuations(out, storage_options)
    if len(conts):
        tables.setdefault("continuations", []).append(conts)


def build_report(
    run_dir: str | Path,
    *,
    out_path: str | Path | None = None,
    figure_dir: str | Path | None = None,
    storage_options: _fs.StorageOptions = None,
) -> _fs.Resolved:
    """Load a run directory and write its report (default `RUN_DIR/report.html`, figures in RUN_DIR/figures).

    Args:
        run_dir: A directory written by `aligned_probing.pipeline.run`, or its fsspec URL.
        out_path: HTML path or URL; default `run_dir/report.html`.
        figure_dir: Where to save the figures as PNG and SVG (path or URL); default `run_dir/figures`.
        storage_options: fsspec options of the URLs (`endpoint_url`, ...).

    Returns:
        The HTML location: a `Path`, or the URL string when it is on object storage.
    """
    from aligned_probing.report.html import render_report

    root = _fs.resolve(run_dir)
    results = load_results(root, storage_options)
    formats = tuple(results.config.get("output", {}).get("figure_formats", ("png", "svg")))
    html_at = _fs.resolve(out_path) if out_path is not None else _fs.child(root, "report.html")
    figures_at = _fs.resolve(figure_dir) if figure_dir is not None else _fs.child(root, "figures")
    if isinstance(html_at, Path) and isinstance(figures_at, Path):
        return render_report(results, html_at, figure_dir=figures_at, formats=formats)
    # matplotlib and the HTML writer need local files: render into a scratch directory, then upload.
    with tempfile.TemporaryDirectory(prefix="aligned-probing-report-") as scratch:
        local = Path(scratch)
        render_report(results, local / "report.html", figure_dir=local / "figures", formats=formats)
        _fs.write_bytes_atomic(html_at, (local / "report.html").read_bytes(), storage_options)
        if (local / "figures").is_dir():
            _fs.upload_tree(local / "figures", figures_at, storage_options)
    return html_at
