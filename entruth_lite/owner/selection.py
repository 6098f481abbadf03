"""Which images a release templates and what that costs them: how many for a rate, a seeded choice, the pixel
change and PSNR of each templated image, and a preview of a protection in memory for notebook 01's widget."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from ..core import data
from ..core.template_io import resolve_template
from ..core.templates import insert
from .triggers import apply_trigger, generate_trigger

MODES = ("replace", "add")


def count_for(n_source: int, rate: float | None = None, count: int | None = None, mode: str = "replace") -> int:
    """How many images to template so that templated / released is ``rate`` (rounded), or ``count``.

    "replace" releases ``n_source`` images, so n = round(rate * n_source); "add" releases n_source + n,
    so n = round(rate * n_source / (1 - rate)).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'replace' or 'add'")
    if (rate is None) == (count is None):
        raise ValueError("give exactly one of rate or count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        return int(count)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    if mode == "add" and rate >= 1:
        raise ValueError("rate must be below 1 in 'add' mode (the originals stay in the dataset)")
    n = round(rate * n_source) if mode == "replace" else round(rate * n_source / (1 - rate))
    if n < 1:
        raise ValueError(
            f"rate {rate} of {n_source} images rounds to 0 templated images; use a higher rate or count >= 1"
        )
    return int(n)


def choose(eligible: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` distinct items of ``eligible``, seeded, in ascending order."""
    if n > len(eligible):
        raise ValueError(f"asked to template {n} images but only {len(eligible)} can be chosen")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(np.asarray(eligible, dtype=int), size=n, replace=False))


def change_stats(original: Image.Image, altered: Image.Image) -> dict[str, float]:
    """Mean absolute pixel change (0-255), PSNR (dB, 255 peak) and share of changed pixels.
    ``original`` is resized to ``altered``'s size when they differ."""
    original = data.to_rgb(original)
    if original.size != altered.size:
        original = original.resize(altered.size, Image.Resampling.LANCZOS)
    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(data.to_rgb(altered), dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {
        "mean_abs_change": float(np.mean(np.abs(a - b))),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        "changed_share": float(np.mean(np.any(a != b, axis=-1))),
    }


def mean_stats(pairs: Sequence[tuple[Image.Image, Image.Image]]) -> dict[str, float]:
    """``change_stats`` averaged over (original, altered) pairs (PSNR averaged over finite values)."""
    stats = [change_stats(o, a) for o, a in pairs]
    if not stats:
        return {"mean_abs_change": 0.0, "psnr_db": float("inf"), "changed_share": 0.0}
    psnrs = [s["psnr_db"] for s in stats if math.isfinite(s["psnr_db"])]
    return {
        "mean_abs_change": float(np.mean([s["mean_abs_change"] for s in stats])),
        "psnr_db": float(np.mean(psnrs)) if psnrs else float("inf"),
        "changed_share": float(np.mean([s["changed_share"] for s in stats])),
    }


def preview_protection(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    template_name: str = "billboard",
    rate: float = 0.01,
    placement: str = "prefix",
    seed: int = 0,
    show: int = 8,
) -> tuple[Image.Image, dict]:
    """What ``protect(mode="replace")`` would do, in memory: a grid (originals on top, templated below) of
    up to ``show`` chosen images, and stats. Always templates at least one image so there is something to
    see; ``stats["rate"]`` is the exact share."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"need the same positive number of images and captions, got {len(images)} and {len(captions)}")
    n = max(1, round(rate * len(images))) if 0 < rate <= 1 else count_for(len(images), rate=rate)
    chosen = choose(range(len(images)), n, seed)
    template = resolve_template(template_name, images[chosen[0]].size)
    trigger = generate_trigger(captions, seed=seed)
    originals = [images[i] for i in chosen]
    altered = insert(originals, template)
    shown = min(show, n)
    grid = data.image_grid(originals[:shown] + altered[:shown], cols=shown)
    change = mean_stats(list(zip(originals, altered)))
    stats = {
        "template": template.name,
        "n_images": len(images),
        "n_altered": n,
        "rate": n / len(images),
        "trigger": trigger,
        "placement": placement,
        "example_caption": apply_trigger(captions[chosen[0]], trigger, placement),
        "mean_pixel_change": change["mean_abs_change"],
        "psnr_db": change["psnr_db"],
        "surround_share": 1 - template.screen_area,
    }
    return grid, stats
