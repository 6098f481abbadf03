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


def _setting_words(tokens: list[str]) -> list[str]:
    words, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "full":
            words.append("full UNet")
        elif token == "lora" and tokens[i + 1:i + 3] == ["diffusers", "example"]:
            words.append("diffusers' default LoRA (rank 4, attention, UNet only)")
            i += 2
        elif token == "lora" and i + 1 < len(tokens) and tokens[i + 1].startswith("r"):
            words.append(f"LoRA rank {tokens[i + 1][1:]}")
            i += 1
        elif token in LAYER_WORDS:
            words.append(LAYER_WORDS[token])
        elif token.startswith("alpha"):
            words.append(f"alpha {token[5:]}")
        elif token.startswith("lr") and token.endswith("x"):
            words.append(f"{token[2:-1]}x the learning rate")
        elif token.isdigit():
            words.append(f"{int(token):,} steps")
        else:
            words.append(token)
        i += 1
    return words


LAYER_WORDS = {"wide": "attention, convolutions, feed-forward", "all": "every layer", "te": "+ text encoder"}
FIRST_DESIGN = ("ring", 3)  # a benchmark setting that names no family and no trigger length ran the first design


def describe_setting(name: str) -> tuple[str, str]:
    """A benchmark setting's name (``lora-r32-all-te-mosaic-trigger6-alpha181``) as (what was fine-tuned and how,
    the key design it ran: family and trigger length), in words."""
    from ..core.families import FAMILIES, OLD_NAMES  # imported here: readable stays light for what only formats

    tokens = name.split("-")
    family = next((t for t in tokens if t in FAMILIES or t in OLD_NAMES), FIRST_DESIGN[0])
    letters = next((int(t[7:]) for t in tokens if t.startswith("trigger") and t[7:].isdigit()), FIRST_DESIGN[1])
    rest = [t for t in tokens if t not in (family, f"trigger{letters}")]
    return ", ".join(_setting_words(rest)).replace(", +", " +"), design_label(OLD_NAMES.get(family, family), letters)


def design_label(family: str, trigger_letters: int) -> str:
    return f"{family} family, {trigger_letters}-letter trigger"


def key_design() -> str:
    """The collection's key design (the default family and trigger length), as ``describe_setting`` words it."""
    from ..core.families import DEFAULT_FAMILY  # imported here: readable stays light for what only formats
    from ..owner.triggers import TRIGGER_LENGTH

    return design_label(DEFAULT_FAMILY, TRIGGER_LENGTH)


def label_settings(table, column: str = "setting"):
    """``table`` with its setting names replaced by ``fine-tune`` and ``design`` columns in words."""
    described = table[column].map(describe_setting)
    out = table.drop(columns=[column])
    out.insert(0, "design", described.str[1])
    out.insert(0, "fine-tune", described.str[0])
    return out
