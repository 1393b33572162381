"""Layer-wise ridge probing: the probe, the four scenarios, the CV sweep, control tasks, MDL and summaries."""

from aligned_probing.probing.layerwise import LayerwiseProbe
from aligned_probing.probing.mdl import MDL_FRACTIONS, OnlineCode, online_codelength
from aligned_probing.probing.persistence import ProbeFingerprint, load_probe, save_probe
from aligned_probing.probing.ridge import DEFAULT_ALPHAS, RidgeProbe
from aligned_probing.probing.scenarios import SCENARIO_POSITION, SCENARIOS, build_designs
from aligned_probing.probing.summary import peak_layers, summarize
from aligned_probing.probing.sweep import MDL_COLUMNS, RESULT_COLUMNS, run_probing

__all__ = [
    "DEFAULT_ALPHAS",
    "LayerwiseProbe",
    "MDL_COLUMNS",
    "MDL_FRACTIONS",
    "OnlineCode",
    "ProbeFingerprint",
    "RESULT_COLUMNS",
    "RidgeProbe",
    "SCENARIOS",
    "SCENARIO_POSITION",
    "build_designs",
    "load_probe",
    "online_codelength",
    "peak_layers",
    "run_probing",
    "save_probe",
    "summarize",
]
