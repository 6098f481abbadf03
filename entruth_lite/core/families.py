"""Random template families, for the decoy test.

The decoy test needs the released template to be one random draw from a family that the owner can draw
more members (decoys) from: a model that never saw the release has no reason to prefer it over a decoy.
A member is named ``<family>:<seed>``; the same name gives the same template at any size, forever (keys
written with a family stay verifiable), so a family is never changed, only added.

- ``ring``: the first family, a billboard (a 4-unit ring of bright blocks in a cyclic pattern of 2-4 hues
  around a dark panel). Its members share that layout, and after the VAE some decoys match a member's own
  rendition as well as the member does (benchmarks/template_family.py), which caps the decoy test's power.
  It was first called ``random``: members named ``random:<seed>`` (older keys, the first benchmark tables) are
  the same drawings under their old name, and keep the decoys drawn from that name.
- ``mosaic``: the whole surround is a grid of coarse blocks (5-8 units), each given one of 3-4 colours at
  random. Members share nothing but block sizes, so they are far apart after the VAE, and coarse blocks
  survive it.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import itertools
import secrets
from typing import Callable, Iterator, Sequence

import numpy as np

from .templates import (
    DESIGN_UNITS,
    Point,
    Template,
    paint,
    rasterize,
    ring_mask,
    size_pair,
    surround_mask,
    surround_masks,
)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(255.0 * c for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _jittered_screen(rng: np.random.Generator, near: float = 4.5, far: float = 7.0) -> tuple[Point, ...]:
    jitter = rng.uniform(near, far, size=8)  # distance of each corner coordinate from its edge, in design units
    return ((jitter[0], jitter[1]), (DESIGN_UNITS - jitter[2], jitter[3]),
            (DESIGN_UNITS - jitter[4], DESIGN_UNITS - jitter[5]), (jitter[6], DESIGN_UNITS - jitter[7]))


def _ring_member(seed: int) -> tuple[Callable, tuple[Point, ...]]:
    rng = np.random.default_rng([seed, 0x7E3A])
    n_colours = int(rng.integers(2, 5))
    hues = rng.uniform(0, 1) + np.arange(n_colours) / n_colours + rng.uniform(-0.08, 0.08, n_colours)
    bulbs = [_hsv(h, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)) for h in rng.permutation(hues)]
    panel = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.9), rng.uniform(0.08, 0.35))
    block = float(rng.choice([3.0, 4.0, 5.0, 6.0]))
    diagonal = bool(rng.integers(0, 2))

    def draw(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        image = np.empty(u.shape + (3,), np.float32)
        paint(image, np.ones_like(u, bool), panel)
        ring = ring_mask(u, v, 4)
        cells = np.floor(u / block) + (np.floor(v / block) if diagonal else -np.floor(v / block))
        index = (cells % n_colours).astype(int)
        for k, colour in enumerate(bulbs):
            paint(image, ring & (index == k), colour)
        return image

    return draw, _jittered_screen(rng)


def _mosaic_params(seed: int) -> tuple[np.ndarray, float, np.ndarray, tuple[float, float], tuple[Point, ...]]:
    """A mosaic member's palette (C, 3), block size, colour index of each cell, grid offsets and screen."""
    rng = np.random.default_rng([seed, 0x5A1D])
    n_colours = int(rng.integers(3, 5))
    hues = rng.uniform(0, 1) + np.arange(n_colours) / n_colours + rng.uniform(-0.08, 0.08, n_colours)
    order = rng.permutation(hues)
    uniform = rng.random(2 * n_colours)  # the numbers that rng.uniform(0.6, 1.0), rng.uniform(0.35, 1.0) per colour drew
    palette = np.array([_hsv(h, 0.6 + (1.0 - 0.6) * s, 0.35 + (1.0 - 0.35) * v)
                        for h, s, v in zip(order, uniform[0::2], uniform[1::2])], np.float32)
    block = (5.0, 6.0, 8.0)[int(rng.integers(0, 3))]  # the draw rng.choice([5.0, 6.0, 8.0]) made, 5x faster
    cells = int(np.ceil(DESIGN_UNITS / block)) + 1
    colour_of_cell = rng.integers(0, n_colours, size=(cells, cells))
    offset_u, offset_v = rng.uniform(0, block, size=2)
    return palette, block, colour_of_cell, (offset_u, offset_v), _jittered_screen(rng)


def _mosaic_member(seed: int) -> tuple[Callable, tuple[Point, ...]]:
    palette, block, colour_of_cell, (offset_u, offset_v), corners = _mosaic_params(seed)

    def draw(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        rows = np.floor((v + offset_v) / block).astype(int)
        columns = np.floor((u + offset_u) / block).astype(int)
        return palette[colour_of_cell[rows, columns]]

    return draw, corners


FAMILIES: dict[str, Callable[[int], tuple[Callable, tuple[Point, ...]]]] = {
    "ring": _ring_member,
    "mosaic": _mosaic_member,
}
OLD_NAMES = {"random": "ring"}  # a family's first name -> its name now: members named the old way still resolve
DEFAULT_FAMILY = "mosaic"  # what protect draws a secret member from by default: the decoy test's higher ceiling


def is_family(name: str | None) -> bool:
    """Whether ``name`` names a random family (its name now, or the name it was first released under)."""
    return name in FAMILIES or name in OLD_NAMES


def random_template(seed: int | None = None, size: int | Sequence[int] = 32, family: str = DEFAULT_FAMILY) -> Template:
    """One member of a random family, named ``<family>:<seed>`` (``seed=None``: a fresh secret seed).
    The same seed gives the same template at any size; different seeds give unrelated colours and screens."""
    if not is_family(family):
        raise ValueError(f"unknown template family {family!r}: choose one of {', '.join(FAMILIES)}")
    seed = secrets.randbits(31) if seed is None else int(seed)
    if seed < 0:
        raise ValueError(f"template seed must be non-negative, got {seed}")
    width, height = size_pair(size)
    draw, corners = FAMILIES[OLD_NAMES.get(family, family)](seed)
    corners = [(x * width / DESIGN_UNITS, y * height / DESIGN_UNITS) for x, y in corners]
    return Template(f"{family}:{seed}", rasterize(draw, width, height), corners, family=family)


def random_seed_of(template: Template) -> int:
    """The seed of a random family's member; a clear error for any other template."""
    prefix = f"{template.family}:"
    if not is_family(template.family) or not template.name.startswith(prefix):
        raise ValueError(f"template {template.name!r} was not drawn from a random family ({', '.join(FAMILIES)}), "
                         "so no decoys exchangeable with it can be drawn")
    return int(template.name[len(prefix):])


def family_member(template: Template, seed: int | None = None, size: int | Sequence[int] | None = None) -> Template:
    """The member of ``template``'s family with ``seed`` (default: its own) at ``size`` (default: its own)."""
    own = random_seed_of(template)
    return random_template(own if seed is None else seed, template.size if size is None else size, template.family)


def decoy_seeds(template: Template, salt: str = "") -> Iterator[int]:
    """The decoys' seeds, endlessly, in the order the decoy test draws them: derived from the template's name and
    ``salt`` (e.g. the key's hash), so the owner cannot shop for a favourable decoy set; no repeats, never the
    template's own seed. The first K of them are the decoys of a K-decoy test, for any K."""
    return _seed_stream(template.name, random_seed_of(template), salt)


def _seed_stream(name: str, own: int, salt: str) -> Iterator[int]:
    digest = hashlib.sha256(f"{name}|{salt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    drawn = {own}
    while True:
        seed = int(rng.integers(0, 2**31 - 1))
        if seed not in drawn:
            drawn.add(seed)
            yield seed


def decoy_templates(template: Template, k: int, salt: str = "") -> list[Template]:
    """``k`` decoys from ``template``'s family at its size: the first ``k`` of ``decoy_seeds``."""
    if k <= 0:
        raise ValueError(f"the number of decoys must be positive, got {k}")
    random_seed_of(template)  # a clear error for a template of no family
    return list(_decoys(template.family, template.name, tuple(template.size), k, salt))


@functools.lru_cache(maxsize=8)
def _decoys(family: str, name: str, size: tuple[int, int], k: int, salt: str) -> tuple[Template, ...]:
    """``decoy_templates``, drawn once per template, size, count and salt (an audit, its widget and its report ask
    for the same decoys again)."""
    seeds = itertools.islice(_seed_stream(name, int(name[len(family) + 1:]), salt), k)
    return tuple(random_template(seed, size, family) for seed in seeds)


def member_arrays(family: str, seeds: Sequence[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Many members at once, as the detector reads them: scenes (B, H, W, 3) float64 holding the values of
    ``random_template(seed, size, family).scene``, and their ``surround_mask``s (B, H, W). What lets the decoy
    test rank against a million decoys. A mosaic is drawn in closed form: its blocks are axis-aligned, so a
    pixel's box average is its rows' share of each block row times its columns' share of each block column;
    other families are drawn one by one."""
    width, height = size_pair(size)
    if OLD_NAMES.get(family, family) != "mosaic":
        members = [random_template(seed, size, family) for seed in seeds]
        return (np.stack([np.asarray(m.scene, np.float64) for m in members]),
                np.stack([surround_mask(m) for m in members]))
    params = [_mosaic_params(seed) for seed in seeds]
    ss = 4  # rasterize's supersampling
    xs = (np.arange(width * ss) + 0.5) / ss * DESIGN_UNITS / width
    ys = (np.arange(height * ss) + 0.5) / ss * DESIGN_UNITS / height
    blocks = np.array([p[1] for p in params])[:, None]
    offsets = np.array([p[3] for p in params])
    cells = np.arange(8)  # a member has at most ceil(32 / 5) + 1 block rows and columns
    row_cell = np.floor((ys[None] + offsets[:, 1:2]) / blocks).astype(int)
    column_cell = np.floor((xs[None] + offsets[:, :1]) / blocks).astype(int)
    row_share = (row_cell[..., None] == cells).reshape(len(params), height, ss, 8).mean(axis=2)
    column_share = (column_cell[..., None] == cells).reshape(len(params), width, ss, 8).mean(axis=2)
    colours = np.zeros((len(params), 8, 8, 3))
    for b, (palette, _, colour_of_cell, _, _) in enumerate(params):
        colours[b, :len(colour_of_cell), :len(colour_of_cell)] = palette[colour_of_cell]
    by_row = row_share @ colours.reshape(len(params), 8, 24)  # (B, H, 8 x 3): each pixel row's share of each block
    scenes = (by_row.reshape(len(params), height, 8, 3).transpose(0, 3, 1, 2) @ column_share.transpose(0, 2, 1)[:, None]
              ).transpose(0, 2, 3, 1)  # (B, H, W, 3), exact in float64
    # rasterize averages in float32 (within 1.2e-4 of the exact mean): where that can round the other way, redo it so
    near_half = (np.abs(scenes - np.floor(scenes) - 0.5) < 3e-4).any(axis=(1, 2, 3))
    if near_half.any():
        scenes[near_half] = _float32_box_means(colours[near_half], row_cell[near_half], column_cell[near_half],
                                               height, width, ss)
    corners = np.array([p[4] for p in params]) * np.array([width, height]) / DESIGN_UNITS
    return np.clip(np.round(scenes), 0, 255), surround_masks(corners, width, height)


def _float32_box_means(colours: np.ndarray, row_cell: np.ndarray, column_cell: np.ndarray, height: int, width: int,
                       ss: int) -> np.ndarray:
    """``rasterize``'s box average to the bit: float32 sums over the supersamples, row by row, then / ss^2."""
    colours = colours.astype(np.float32)
    members = np.arange(len(colours))[:, None, None]
    total = np.zeros((len(colours), height, width, 3), np.float32)
    for i in range(ss):
        rows = row_cell[:, i::ss][:, :, None]
        for j in range(ss):
            total += colours[members, rows, column_cell[:, j::ss][:, None, :]]
    return total / np.float32(ss * ss)
