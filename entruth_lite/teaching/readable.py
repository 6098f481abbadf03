"""Numbers for people: what a notebook prints or shows, formatted by what each number is.

A key's name says what its value holds, so one rule formats it everywhere: p-values in scientific notation,
rates and shares as percentages, decibels with their unit, counts with thousands separators, other numbers to
three significant digits. Notebooks print ``facts(...)`` instead of a raw dict and show ``styled(table)`` instead
of a bare DataFrame; ``notebooks.unreadable_outputs`` checks that no raw number reaches the student.
"""

from __future__ import annotations

import numbers
from typing import Mapping

P_NAMES = ("p", "p_value", "p value", "decoy p", "binomial p")
SHARE_WORDS = ("rate", "share", "tpr", "fpr", "kept_fraction", "over_threshold", "images_kept")


def is_p_value(name: str) -> bool:
    name = name.lower()
    return name in P_NAMES or name.endswith("_p") or name.endswith(" p") or name.startswith("p_")


def is_share(name: str) -> bool:
    name = name.lower()
    return "learning_rate" not in name and any(word in name for word in SHARE_WORDS)  # a learning rate is no share


def number(name: str, value) -> str:
    """``value`` as a person reads it, by what ``name`` says it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value)
    if value != value:  # NaN: not measured
        return "-"
    if is_p_value(name):
        return f"{value:.1e}"
    if is_share(name):
        return f"{value:.1%}" if abs(value) >= 0.001 or value == 0 else f"{value:.2g}"
    if name.lower().endswith("_db"):
        return f"{value:.1f} dB"
    return f"{value:.3g}"


def facts(mapping: Mapping, separator: str = "\n") -> str:
    """``name: value`` lines, each value formatted by ``number`` (underscores in names read as spaces)."""
    return separator.join(f"{key.replace('_', ' ')}: {number(key, value)}" for key, value in mapping.items())


def formats_for(columns) -> dict:
    """A pandas ``Styler.format`` mapping for a table's columns, by the same rule as ``number``."""
    return {column: (lambda value, name=str(column): number(name, value)) for column in columns}


def styled(table, caption: str | None = None):
    """A DataFrame as a notebook shows it: every number formatted by ``number``, no row index, and a caption
    (say which runs it reads)."""
    style = table.style.format(formats_for(table.columns)).hide(axis="index")
    return style.set_caption(caption) if caption else style
