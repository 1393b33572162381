"""The probe stage's fitted probes: one `RidgeProbe` per (layer, scenario, attribute), fitted on all prompts.

The probing table reports cross-validated fold models; a notebook that steers, or the causal stage
that patches and steers, needs one probe per layer fitted on every row. The probe stage writes them
next to its table, as `probing.persistence.save_probe` writes them (safetensors weights plus a JSON
config with the fingerprint: model, hook, layer, pooling, d_model), under

    PROBE_STAGE_DIR/probes/{scenario}--{attribute}--layer-{LLL}/probe.safetensors, probe.json

The rows are those of the scenario's design in `probing.scenarios.build_designs` (input
scenarios: one row per prompt, its input encoding; output scenarios: continuation 0 of each
prompt), the targets those of the probing table, and the ridge grid the stage's `probing.alphas`.
Directories are local paths or fsspec URLs; remote probes go through a local scratch directory,
because `save_probe`/`load_probe` read and write files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from aligned_probing.pipeline import fs as _fs

if TYPE_CHECKING:
    from aligned_probing.encoding.store import ActivationStore
    from aligned_probing.pipeline.config import ProbingConfig
    from aligned_probing.probing import RidgeProbe

PROBES_DIR = "probes"
_FILES = ("probe.safetensors", "probe.json")


def probe_name(scenario: str, attribute: str, layer: int) -> str:
    """Directory name of one probe under `probes/`."""
    return f"{scenario}--{attribute}--layer-{layer:03d}"


def fit_final_probes(
    store: ActivationStore,
    targets: pd.DataFrame,
    probing: ProbingConfig,
    layers: list[int],
    *,
    show_progress: bool = False,
) -> dict[tuple[int, str, str], RidgeProbe]:
    """One probe per (layer, scenario, attribute) on every row of the scenario's design.

    Args:
        store: The (model, template) activation store.
        targets: The probe stage's targets (`probe_targets`), one row per continuation.
        probing: The probing section: scenarios, attributes (None: all the targets have), pooling, alphas.
        layers: Residual layers to fit.
        show_progress: Show a tqdm bar ("probe final fits") with one step per (layer, position design).

    Returns:
        Fitted 1-target probes by (layer, scenario, attribute).
    """
    from tqdm.auto import tqdm

    from aligned_probing.probing import RidgeProbe
    from aligned_probing.probing.scenarios import build_designs, check_targets, infer_attributes

    attributes = list(probing.attributes or infer_attributes(targets))
    checked = check_targets(targets, probing.scenarios, attributes)
    designs = build_designs(store.index, checked, scenarios=probing.scenarios, attributes=attributes)
    out: dict[tuple[int, str, str], RidgeProbe] = {}
    total = len(layers) * len(designs)
    with tqdm(total=total, desc="probe final fits", unit="layer", disable=not show_progress) as bar:
        for layer in layers:
            for design in designs:
                X = store.layer(layer, design.position, probing.pooling)[design.rows]  # (n_rows, d_model)
                for j, (scenario, attribute) in enumerate(design.columns):
                    y = pd.Series(design.targets[:, j], name=attribute)
                    out[(layer, scenario, attribute)] = RidgeProbe(alphas=probing.alphas).fit(X, y)
                bar.update()
    return out


def save_final_probes(
    probes: dict[tuple[int, str, str], RidgeProbe],
    store: ActivationStore,
    pooling: str,
    out_dir: _fs.Resolved,
    storage_options: _fs.StorageOptions = None,
) -> list[str]:
    """Save each probe (with its fingerprint) under `out_dir/probes/`; returns the directory names."""
    from aligned_probing.models import resid_hook_name
    from aligned_probing.probing import ProbeFingerprint, save_probe

    revision = store.manifest.get("revision")
    names = []
    with tempfile.TemporaryDirectory(prefix="aligned-probing-probes-") as scratch:
        for (layer, scenario, attribute), probe in probes.items():
            name = probe_name(scenario, attribute, layer)
            fingerprint = ProbeFingerprint(
                model_name=store.model_name,
                revision=str(revision) if revision is not None else None,
                hook_name=resid_hook_name(layer),
                layer=layer,
                pooling=pooling,
                d_model=store.d_model,
            )
            local = save_probe(probe, Path(scratch) / name, fingerprint)
            for file in _FILES:  # atomic per file; the block's table, written after, marks completion
                target = _fs.child(out_dir, PROBES_DIR, name, file)
                _fs.write_bytes_atomic(target, (local / file).read_bytes(), storage_options)
            names.append(name)
    return names


def list_probes(stage_dir: _fs.Resolved, storage_options: _fs.StorageOptions = None) -> pd.DataFrame:
    """The probes a probe stage saved: `scenario`, `attribute`, `layer`, `location` (one row each)."""
    rows = []
    for location in _fs.glob(_fs.child(stage_dir, PROBES_DIR), "*--*--layer-*", storage_options):
        scenario, attribute, layer = _fs.name(location).split("--")
        rows.append(
            {"scenario": scenario, "attribute": attribute, "layer": int(layer.removeprefix("layer-")),
             "location": location}
        )
    columns = ["scenario", "attribute", "layer", "location"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["scenario", "attribute", "layer"], ignore_index=True)


def read_probe(location: _fs.Location, storage_options: _fs.StorageOptions = None) -> RidgeProbe:
    """Load one saved probe (local directory or URL); its `fingerprint_` says what it was fitted on."""
    from aligned_probing.probing import load_probe

    if _fs.is_local(location):
        return load_probe(_fs.local_path(location))
    with tempfile.TemporaryDirectory(prefix="aligned-probing-probe-") as scratch:
        for file in _FILES:
            remote = _fs.child(_fs.resolve(location), file)
            (Path(scratch) / file).write_bytes(_fs.read_bytes(remote, storage_options))
        return load_probe(scratch)

