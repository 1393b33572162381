"""Building blocks of the HTML report: sections, figures with reading guides, headline boxes, tables.

Numbers are formatted in one place (`fmt`, `fmt_ci`) so that the report and its tests agree on what
a printed value is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from aligned_probing.data import CANONICAL_ATTRIBUTES

#: Decimals of every number the report prints.
DECIMALS = 3


@dataclass
class Figure:
    """One embedded figure: `guide` is the one-sentence reading guide printed under it."""

    id: str
    title: str
    caption: str
    guide: str
    png: str
    wide: bool = False


@dataclass
class HeadlineRow:
    """One line of a model's headline box; `key` and `value` let a test find it and check it."""

    key: str
    label: str
    text: str
    value: str = ""
    note: str = ""


@dataclass
class Headline:
    """A model's headline box."""

    model: str
    rows: list[HeadlineRow] = field(default_factory=list)


@dataclass
class Section:
    """One report section: intro text, figures, tables, preformatted text, headline boxes."""

    id: str
    title: str
    intro: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[dict[str, str]] = field(default_factory=list)
    pre: str = ""
    empty: str = ""
    notes: list[str] = field(default_factory=list)
    headlines: list[Headline] = field(default_factory=list)


#: `add(fig_id, title, caption, fig, guide=..., wide=False) -> Figure`: renders and registers a figure.
AddFigure = Callable[..., Figure]


def fmt(value: Any, decimals: int = DECIMALS) -> str:
    """A number as the report prints it ("n/a" for missing values)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else f"{v:.{decimals}f}"


def fmt_ci(value: Any, low: Any, high: Any, decimals: int = DECIMALS) -> str:
    """`value [low, high]`, or the value alone when the interval is missing."""
    text = fmt(value, decimals)
    if fmt(low) == "n/a" or fmt(high) == "n/a":
        return f"{text} (no interval)"
    return f"{text} [{fmt(low, decimals)}, {fmt(high, decimals)}]"


def fmt_p(p: Any) -> str:
    """A p-value (`< 0.001` below that)."""
    try:
        v = float(p)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(v):
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def html_table(df: pd.DataFrame, title: str, table_id: str | None = None) -> dict[str, str]:
    """A table for the template (numbers with `DECIMALS` decimals; `table_id` becomes its HTML id)."""
    return {
        "title": title,
        "html": df.to_html(
            classes="data",
            index=False,
            float_format=lambda v: f"{v:.{DECIMALS}f}",
            na_rep="",
            border=0,
            table_id=table_id,
        ),
    }


def attribute_order(attributes: Iterable[Any]) -> list[str]:
    """Attributes in canonical order (toxicity first), unknown ones after."""
    present = list(dict.fromkeys(attributes))
    return [a for a in CANONICAL_ATTRIBUTES if a in present] + [
        a for a in present if a not in CANONICAL_ATTRIBUTES
    ]


def main_attribute(values: Iterable[Any]) -> str:
    """`toxicity` when present, else the first attribute in canonical order."""
    order = attribute_order(values)
    return "toxicity" if "toxicity" in order else order[0]
