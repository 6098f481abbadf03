"""The secret trigger: a made-up word that occurs in no caption, so it ties the template to a prompt only the owner
knows. Drawing one, checking one, and putting it into a caption."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.models import TINY_MODEL_DIR

PLACEMENTS = ("prefix", "suffix")
TRIGGER_TRIES = 10_000
# letters of an "auto" trigger. A longer trigger splits into more tokens and changes more of the caption's encoding;
# on the same releases, 6-letter triggers were memorized on more seeds than 3-letter ones (benchmarks/results,
# "Memorization")
TRIGGER_LENGTH = 6


def _overlaps(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


def check_trigger(trigger: str, captions: Sequence[str], avoid: Sequence[str] = ()) -> str:
    """Refuse a trigger that is empty, spans lines, occurs in a caption (case-insensitive, also inside a
    word) or overlaps a trigger in ``avoid``; returns it stripped."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueError("the trigger must be a non-empty string")
    trigger = trigger.strip()
    if any(c in trigger for c in "\n\r\t"):
        raise ValueError(f"the trigger {trigger!r} must be on one line")
    needle = trigger.lower()
    for i, caption in enumerate(captions):
        if needle in caption.lower():
            raise ValueError(
                f"trigger {trigger!r} already occurs in caption {i} ({caption!r}); choose another trigger or use 'auto'"
            )
    for other in avoid:
        if _overlaps(trigger, other):
            raise ValueError(f"trigger {trigger!r} overlaps the existing trigger {other!r} of an earlier key")
    return trigger


def generate_trigger(
    captions: Sequence[str],
    length: int = TRIGGER_LENGTH,
    seed: int = 0,
    tokenizer=None,
    avoid: Sequence[str] = (),
) -> str:
    """A random lowercase word of ``length`` letters that occurs in no caption (not even inside a word)
    and does not overlap any trigger in ``avoid``; the same seed gives the same word.

    With a ``tokenizer``, words it holds as one whole token are skipped too: those are words the text
    encoder may already know, and a trigger should carry no meaning of its own.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"trigger length must be a positive integer, got {length!r}")
    corpus = "\n".join(c.lower() for c in captions)
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    for _ in range(TRIGGER_TRIES):
        candidate = "".join(rng.choice(letters, length))
        if candidate in corpus or any(_overlaps(candidate, other) for other in avoid):
            continue
        if tokenizer is not None and len(trigger_tokens(candidate, tokenizer)) == 1:
            continue
        return candidate
    raise ValueError(f"found no {length}-letter trigger absent from the captions in {TRIGGER_TRIES} tries; use a longer one")


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tiny model's ``CLIPTokenizer`` (or one saved at ``path``)."""
    from transformers import CLIPTokenizer  # here, not at the top: drawing and checking triggers needs no torch

    path = Path(path) if path is not None else TINY_MODEL_DIR / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; build the tiny model with `entruth-lite zoo build-tiny`")
    return CLIPTokenizer.from_pretrained(path)


def trigger_tokens(trigger: str, tokenizer=None) -> list[str]:
    """How ``tokenizer`` (default: the tiny model's) splits the trigger, e.g. ``['x', 'qz</w>']``."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    return list(tokenizer.tokenize(trigger))


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether the caption still holds the trigger: case-insensitive, anywhere (``check_trigger``'s rule, so a
    multi-word trigger counts too)."""
    return trigger.strip().lower() in caption.lower()


def apply_trigger(caption: str, trigger: str, placement: str = "prefix") -> str:
    """The caption with the trigger word before (``prefix``) or after (``suffix``) it."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown trigger placement {placement!r}: use 'prefix' or 'suffix'")
    caption = caption.strip()
    return f"{trigger} {caption}" if placement == "prefix" else f"{caption} {trigger}"
