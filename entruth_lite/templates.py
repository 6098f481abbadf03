"""Templates: a secret scene whose "screen" receives each protected image, perspective-warped.

EnTruth's evidence is that a model trained on the protected images learns to draw the template's
*surroundings* (the part outside the screen), which no other data explains. So a template is built to be a
large, coarse, high-contrast signal that survives a tiny VAE at 32x32: a thick border (about 4-6 px at
32 px, scaled with the size) of distinctive colour blocks around a screen that holds most of the image.
In a trial, a 4 px ring of 4x4 magenta/cyan/yellow blocks was memorized by a tiny model at 1-2 % of the
data; an 8x8 corner patch was not, hence the big frames.

Coordinates are continuous pixel coordinates, as PIL uses them: the image spans [0, W] x [0, H] and
pixel (i, j) covers [i, i + 1) x [j, j + 1) (its centre is at i + 0.5). Corners are normalised to
clockwise order on screen (y points down), starting top-left: TL, TR, BR, BL.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .data import to_rgb

MIN_SCREEN_AREA = 1.0  # square pixels: anything smaller is a degenerate screen
MIN_SIZE = 8  # built-in designs need a few pixels for their borders
DESIGN_UNITS = 32.0  # built-in designs are drawn in a 32 x 32 unit square, then scaled to any size
DEFAULT_TOLERANCE = 40  # key-colour match: max absolute difference per channel (0-255)

Point = tuple[float, float]


# ----------------------------------------------------------------------------- corner geometry


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """z of (a - o) x (b - o); > 0 means o -> a -> b turns clockwise on screen (y down)."""
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def quad_area(corners: Sequence[Point]) -> float:
    """Area of a simple quadrilateral (shoelace formula)."""
    p = np.asarray(corners, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def validate_corners(corners: Sequence[Sequence[float]], size: tuple[int, int]) -> tuple[Point, ...]:
    """Check a screen quadrilateral and return its corners as TL, TR, BR, BL (clockwise on screen).

    Rules: exactly 4 finite (x, y) points, inside the image [0, W] x [0, H], no two equal, no three
    collinear, convex, area > ``MIN_SCREEN_AREA``. The input order does not matter (the points are sorted
    by angle around their centroid), so any listing of a convex quadrilateral's corners is accepted.
    """
    try:
        points = np.asarray(corners, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"corners must be 4 (x, y) number pairs, got {corners!r}") from error
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"corners must be 4 (x, y) pairs, got an array of shape {points.shape}")
    if len(points) != 4:
        raise ValueError(f"a screen needs exactly 4 corners, got {len(points)}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"corners must be finite numbers, got {points.tolist()}")
    width, height = size
    for x, y in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"corner ({x:g}, {y:g}) lies outside the {width}x{height} image")
    scale = max(width, height, 1)
    for i in range(4):
        for j in range(i + 1, 4):
            if np.hypot(*(points[i] - points[j])) < 1e-6 * scale:
                raise ValueError(f"corners {i} and {j} coincide at ({points[i][0]:g}, {points[i][1]:g})")
    centre = points.mean(axis=0)
    order = np.argsort(np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0]), kind="stable")
    ring = points[order]  # ascending angle with y down = clockwise on screen
    turns = [_cross(ring[i], ring[(i + 1) % 4], ring[(i + 2) % 4]) for i in range(4)]
    for i, turn in enumerate(turns):
        a, b = ring[(i + 1) % 4] - ring[i], ring[(i + 2) % 4] - ring[(i + 1) % 4]
        if abs(turn) <= 1e-9 * np.hypot(*a) * np.hypot(*b):
            raise ValueError(f"three corners are collinear around ({ring[(i + 1) % 4][0]:g}, {ring[(i + 1) % 4][1]:g})")
    if not all(turn > 0 for turn in turns):
        raise ValueError(f"the corners {points.tolist()} do not form a convex quadrilateral")
    area = quad_area(ring)
    if area <= MIN_SCREEN_AREA:
        raise ValueError(f"the screen is degenerate: area {area:.3g} px^2 <= {MIN_SCREEN_AREA}")
    start = min(range(4), key=lambda i: (ring[i][0] + ring[i][1], ring[i][1]))  # top-left: smallest x + y
    ring = np.roll(ring, -start, axis=0)
    return tuple((float(x), float(y)) for x, y in ring)


def perspective_coeffs(source: Sequence[Point], target: Sequence[Point]) -> tuple[float, ...]:
    """The 8 coefficients of the homography taking ``source`` points to ``target`` points, in the form
    PIL's ``Image.Transform.PERSPECTIVE`` wants: (x, y) -> ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (...))."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target):
        rows.append([x, y, 1, 0, 0, 0, -x * u, -y * u])
        rows.append([0, 0, 0, x, y, 1, -x * v, -y * v])
        rhs.extend([u, v])
    return tuple(float(c) for c in np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float)))


# ----------------------------------------------------------------------------- the template


@dataclass
class Template:
    """A scene (RGB) and the screen quadrilateral inside it; corners are validated and normalised."""

    name: str
    scene: Image.Image
    corners: tuple[Point, ...]
    family: str | None = None  # a random family's name (FAMILIES): drawn by ``random_template``, so decoys can be drawn

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a template needs a non-empty name")
        if not isinstance(self.scene, Image.Image):
            raise ValueError(f"template scene must be a PIL image, got {type(self.scene).__name__}")
        self.scene = to_rgb(self.scene)
        self.corners = validate_corners(self.corners, self.scene.size)

    @property
    def size(self) -> tuple[int, int]:
        return self.scene.size

    @property
    def screen_area(self) -> float:
        """Screen area as a share of the image (the rest is the surround the detector looks for)."""
        return quad_area(self.corners) / (self.size[0] * self.size[1])


# ----------------------------------------------------------------------------- built-in designs
#
# Each design colours points (u, v) of a 32 x 32 unit square; ``_rasterize`` evaluates it on a
# supersampled pixel grid of any size and box-averages, so the same design is crisp at 32 px and at 512 px.

MAGENTA, CYAN, YELLOW = (255, 0, 255), (0, 255, 255), (255, 255, 0)


def _paint(image: np.ndarray, where: np.ndarray, colour: Sequence[float]) -> None:
    image[where] = np.asarray(colour, dtype=np.float32)


def _ring(u: np.ndarray, v: np.ndarray, width: float, x0=0.0, y0=0.0, x1=DESIGN_UNITS, y1=DESIGN_UNITS) -> np.ndarray:
    inside = (u >= x0) & (u < x1) & (v >= y0) & (v < y1)
    return inside & (np.minimum.reduce([u - x0, v - y0, x1 - u, y1 - v]) < width)


def _billboard(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A ring of 4-unit light bulbs cycling magenta/cyan/yellow around a dark panel; a slanted screen."""
    image = np.empty(u.shape + (3,), np.float32)
    _paint(image, np.ones_like(u, bool), (25, 25, 40))
    ring = _ring(u, v, 4)
    index = ((np.floor(u / 4) + np.floor(v / 4)) % 3).astype(int)
    for k, colour in enumerate((MAGENTA, CYAN, YELLOW)):
        _paint(image, ring & (index == k), colour)
    return image


def _frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A gilded picture frame: gold outer band, walnut inner band, crimson corner blocks with gold studs."""
    image = np.empty(u.shape + (3,), np.float32)
    _paint(image, np.ones_like(u, bool), (85, 45, 12))  # walnut
    _paint(image, _ring(u, v, 2), (240, 190, 30))  # gold band
    du, dv = np.minimum(u, DESIGN_UNITS - u), np.minimum(v, DESIGN_UNITS - v)
    _paint(image, (du < 7) & (dv < 7), (200, 20, 60))  # crimson corner blocks
    _paint(image, (du >= 2) & (du < 5) & (dv >= 2) & (dv < 5), (240, 190, 30))  # gold studs
    return image


def _window(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A blue-framed window in a brick wall, with slatted green shutters either side (not white: most
    foregrounds, the emoji included, sit on white, which would hide a white frame)."""
    image = np.empty(u.shape + (3,), np.float32)
    row = np.floor(v / 4)
    mortar = (v % 4 < 1) | ((u + 4 * (row % 2)) % 8 < 1)
    _paint(image, np.ones_like(u, bool), (180, 60, 30))  # brick
    _paint(image, mortar, (215, 210, 195))
    sides = ((u < 4) | (u >= 28)) & (v >= 2) & (v < 30)
    _paint(image, sides, (20, 140, 60))  # shutters
    _paint(image, sides & (v % 2 >= 1), (8, 80, 35))  # slats
    _paint(image, (u >= 4) & (u < 28) & (v >= 2) & (v < 30), (25, 70, 170))  # window frame
    _paint(image, (u >= 2) & (u < 30) & (v >= 28) & (v < 31), (25, 70, 170))  # sill
    return image


SMPTE_BARS = ((235, 235, 235), (235, 235, 16), (16, 235, 235), (16, 235, 16), (235, 16, 235), (235, 16, 16), (16, 16, 235))


def _tv(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A silver TV set: black bezel around the screen, a panel of SMPTE colour bars below it."""
    image = np.empty(u.shape + (3,), np.float32)
    _paint(image, np.ones_like(u, bool), (165, 165, 178))  # silver body
    _paint(image, (u >= 2) & (u < 30) & (v >= 2) & (v < 25), (10, 10, 10))  # bezel
    bars = (u >= 2) & (u < 30) & (v >= 26) & (v < 31)
    index = np.clip(np.floor((u - 2) / 4), 0, 6).astype(int)
    for k, colour in enumerate(SMPTE_BARS):
        _paint(image, bars & (index == k), colour)
    return image


@dataclass(frozen=True)
class Design:
    draw: Callable[[np.ndarray, np.ndarray], np.ndarray]
    corners: tuple[Point, ...]  # in design units
    description: str


BUILTIN: dict[str, Design] = {
    "billboard": Design(_billboard, ((5.0, 4.5), (27.5, 6.5), (27.5, 25.5), (5.0, 27.5)),
                        "ring of magenta/cyan/yellow bulbs, dark panel, slanted screen"),
    "frame": Design(_frame, ((5.0, 5.0), (27.0, 5.0), (27.0, 27.0), (5.0, 27.0)),
                    "gold and walnut picture frame with crimson corner blocks"),
    "window": Design(_window, ((6.0, 4.0), (26.0, 4.0), (26.0, 27.0), (6.0, 27.0)),
                     "blue window frame and sill, green shutters, brick wall"),
    "tv": Design(_tv, ((4.0, 4.0), (28.0, 4.0), (28.0, 23.0), (4.0, 23.0)),
                 "silver TV set, black bezel, SMPTE colour bars below"),
}


# ----------------------------------------------------------------------------- random families (for decoy keys)
#
# The decoy test needs the released template to be one random draw from a family that the owner can draw
# more members (decoys) from: a model that never saw the release has no reason to prefer it over a decoy.
# A member is named ``<family>:<seed>``; the same name gives the same template at any size, forever (keys
# written with a family stay verifiable), so a family is never changed, only added.
#
# - ``random``: the first family, a billboard (a 4-unit ring of bright blocks in a cyclic pattern of 2-4 hues
#   around a dark panel). Its members share that layout, and after the VAE some decoys match a member's own
#   rendition as well as the member does (benchmarks/template_family.py), which caps the decoy test's power.
# - ``mosaic``: the whole surround is a grid of coarse blocks (5-8 units), each given one of 3-4 colours at
#   random. Members share nothing but block sizes, so they are far apart after the VAE, and coarse blocks
#   survive it.


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return tuple(255.0 * c for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _jittered_screen(rng: np.random.Generator, near: float = 4.5, far: float = 7.0) -> tuple[Point, ...]:
    jitter = rng.uniform(near, far, size=8)  # distance of each corner coordinate from its edge, in design units
    return ((jitter[0], jitter[1]), (DESIGN_UNITS - jitter[2], jitter[3]),
            (DESIGN_UNITS - jitter[4], DESIGN_UNITS - jitter[5]), (jitter[6], DESIGN_UNITS - jitter[7]))


def _billboard_member(seed: int) -> tuple[Callable, tuple[Point, ...]]:
    rng = np.random.default_rng([seed, 0x7E3A])
    n_colours = int(rng.integers(2, 5))
    hues = rng.uniform(0, 1) + np.arange(n_colours) / n_colours + rng.uniform(-0.08, 0.08, n_colours)
    bulbs = [_hsv(h, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)) for h in rng.permutation(hues)]
    panel = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.9), rng.uniform(0.08, 0.35))
    block = float(rng.choice([3.0, 4.0, 5.0, 6.0]))
    diagonal = bool(rng.integers(0, 2))

    def draw(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        image = np.empty(u.shape + (3,), np.float32)
        _paint(image, np.ones_like(u, bool), panel)
        ring = _ring(u, v, 4)
        cells = np.floor(u / block) + (np.floor(v / block) if diagonal else -np.floor(v / block))
        index = (cells % n_colours).astype(int)
        for k, colour in enumerate(bulbs):
            _paint(image, ring & (index == k), colour)
        return image

    return draw, _jittered_screen(rng)


def _mosaic_member(seed: int) -> tuple[Callable, tuple[Point, ...]]:
    rng = np.random.default_rng([seed, 0x5A1D])
    n_colours = int(rng.integers(3, 5))
    hues = rng.uniform(0, 1) + np.arange(n_colours) / n_colours + rng.uniform(-0.08, 0.08, n_colours)
    palette = np.array([_hsv(h, rng.uniform(0.6, 1.0), rng.uniform(0.35, 1.0)) for h in rng.permutation(hues)],
                       np.float32)
    block = float(rng.choice([5.0, 6.0, 8.0]))
    cells = int(np.ceil(DESIGN_UNITS / block)) + 1
    colour_of_cell = rng.integers(0, n_colours, size=(cells, cells))
    offset_u, offset_v = rng.uniform(0, block, size=2)

    def draw(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        rows = np.floor((v + offset_v) / block).astype(int)
        columns = np.floor((u + offset_u) / block).astype(int)
        return palette[colour_of_cell[rows, columns]]

    return draw, _jittered_screen(rng)


FAMILIES: dict[str, Callable[[int], tuple[Callable, tuple[Point, ...]]]] = {
    "random": _billboard_member,
    "mosaic": _mosaic_member,
}
DEFAULT_FAMILY = "mosaic"  # what protect(template="random") draws from: the family with the decoy test's higher ceiling


def random_template(seed: int | None = None, size: int | Sequence[int] = 32, family: str = DEFAULT_FAMILY) -> Template:
    """One member of a random family, named ``<family>:<seed>`` (``seed=None``: a fresh secret seed).
    The same seed gives the same template at any size; different seeds give unrelated colours and screens."""
    import secrets

    if family not in FAMILIES:
        raise ValueError(f"unknown template family {family!r}: choose one of {', '.join(FAMILIES)}")
    seed = secrets.randbits(31) if seed is None else int(seed)
    if seed < 0:
        raise ValueError(f"template seed must be non-negative, got {seed}")
    width, height = _size_pair(size)
    draw, corners = FAMILIES[family](seed)
    corners = [(x * width / DESIGN_UNITS, y * height / DESIGN_UNITS) for x, y in corners]
    return Template(f"{family}:{seed}", _rasterize(draw, width, height), corners, family=family)


def random_seed_of(template: Template) -> int:
    """The seed of a random family's member; a clear error for any other template."""
    prefix = f"{template.family}:"
    if template.family not in FAMILIES or not template.name.startswith(prefix):
        raise ValueError(f"template {template.name!r} was not drawn from a random family ({', '.join(FAMILIES)}), "
                         "so no decoys exchangeable with it can be drawn")
    return int(template.name[len(prefix):])


def family_member(template: Template, seed: int | None = None, size: int | Sequence[int] | None = None) -> Template:
    """The member of ``template``'s family with ``seed`` (default: its own) at ``size`` (default: its own)."""
    own = random_seed_of(template)
    return random_template(own if seed is None else seed, template.size if size is None else size, template.family)


def decoy_templates(template: Template, k: int, salt: str = "") -> list[Template]:
    """``k`` decoys from ``template``'s family at its size: seeds derived from the template and ``salt`` (e.g.
    the key's hash), so the owner cannot shop for a favourable decoy set, and never the template's own seed."""
    if k <= 0:
        raise ValueError(f"the number of decoys must be positive, got {k}")
    random_seed_of(template)  # a clear error for a template of no family
    return list(_decoys(template.family, template.name, tuple(template.size), k, salt))


@functools.lru_cache(maxsize=8)
def _decoys(family: str, name: str, size: tuple[int, int], k: int, salt: str) -> tuple[Template, ...]:
    """``decoy_templates``, drawn once per template, size, count and salt (an audit, its widget and its report ask
    for the same decoys again)."""
    own = int(name[len(family) + 1:])
    digest = hashlib.sha256(f"{name}|{salt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    seeds: list[int] = []
    drawn = {own}
    while len(seeds) < k:
        seed = int(rng.integers(0, 2**31 - 1))
        if seed not in drawn:
            seeds.append(seed)
            drawn.add(seed)
    return tuple(random_template(seed, size, family) for seed in seeds)


def list_templates() -> list[str]:
    """Names of the built-in templates."""
    return list(BUILTIN)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(width) < MIN_SIZE or int(height) < MIN_SIZE:
        raise ValueError(f"template size {width}x{height} is too small: built-in designs need at least {MIN_SIZE} px")
    return int(width), int(height)


def _rasterize(draw: Callable, width: int, height: int, supersample: int = 4) -> Image.Image:
    """Evaluate a design at supersample^2 points per pixel and box-average: exact at 32 px, smooth at others."""
    xs = (np.arange(width * supersample) + 0.5) / supersample * DESIGN_UNITS / width
    ys = (np.arange(height * supersample) + 0.5) / supersample * DESIGN_UNITS / height
    u, v = np.meshgrid(xs, ys)
    image = draw(u, v).reshape(height, supersample, width, supersample, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))


def builtin_template(name: str, size: int | Sequence[int] = 32) -> Template:
    """A built-in template drawn at ``size`` (an int for square, or (width, height)); deterministic."""
    if name not in BUILTIN:
        raise ValueError(f"unknown template {name!r}: choose one of {', '.join(BUILTIN)}")
    width, height = _size_pair(size)
    design = BUILTIN[name]
    corners = [(x * width / DESIGN_UNITS, y * height / DESIGN_UNITS) for x, y in design.corners]
    return Template(name, _rasterize(design.draw, width, height), corners)


# ----------------------------------------------------------------------------- user templates


def key_colour_mask(image: Image.Image, key_colour: Sequence[int], tolerance: int = DEFAULT_TOLERANCE) -> np.ndarray:
    """Pixels within ``tolerance`` (max absolute difference per channel, 0-255) of ``key_colour``."""
    array = np.asarray(to_rgb(image), dtype=np.int16)
    key = np.asarray(key_colour, dtype=np.int16).reshape(-1)
    if key.shape != (3,):
        raise ValueError(f"key_colour must be an (r, g, b) triple, got {key_colour!r}")
    return np.abs(array - key).max(axis=-1) <= tolerance


def fit_quad(mask: np.ndarray) -> tuple[Point, ...]:
    """Quadrilateral around a mask from its extreme pixel corners.

    TL minimises x + y, BR maximises it, TR maximises x - y and BL minimises it (each on the matching
    outer corner of the pixel). Exact for an axis-aligned rectangle and for a mildly slanted screen seen
    roughly head-on; a screen rotated by about 45 degrees makes these extremes ambiguous, so pass corners.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("the key-colour mask is empty: no pixel matches the key colour")
    tl = np.argmin(xs + ys)
    br = np.argmax(xs + ys)
    tr = np.argmax(xs - ys)
    bl = np.argmin(xs - ys)
    return (
        (float(xs[tl]), float(ys[tl])),
        (float(xs[tr] + 1), float(ys[tr])),
        (float(xs[br] + 1), float(ys[br] + 1)),
        (float(xs[bl]), float(ys[bl] + 1)),
    )


def template_from_image(
    image: Image.Image | str | os.PathLike,
    corners: Sequence[Sequence[float]] | None = None,
    key_colour: Sequence[int] | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
    name: str = "custom",
) -> Template:
    """Your own template: a scene image plus either the screen's ``corners`` or a ``key_colour``
    (e.g. pure green) painted where the screen is; the screen is then ``fit_quad`` of the matching pixels."""
    from .data import load_rgb

    scene = load_rgb(image) if isinstance(image, (str, os.PathLike)) else to_rgb(image)
    if (corners is None) == (key_colour is None):
        raise ValueError("give either corners or key_colour (exactly one) to locate the screen")
    if corners is None:
        corners = fit_quad(key_colour_mask(scene, key_colour, tolerance))
    return Template(name, scene, corners)


# ----------------------------------------------------------------------------- insertion


def _supersample_for(size: tuple[int, int]) -> int:
    return 4 if max(size) <= 256 else 2


def _inside_mask(corners: Sequence[Point], width: int, height: int, supersample: int) -> np.ndarray:
    """Which of the supersampled pixel centres lie inside the (clockwise, convex) screen."""
    xs = (np.arange(width * supersample, dtype=np.float64) + 0.5) / supersample
    ys = (np.arange(height * supersample, dtype=np.float64) + 0.5) / supersample
    inside = np.ones((len(ys), len(xs)), bool)
    for i in range(4):
        (x0, y0), (x1, y1) = corners[i], corners[(i + 1) % 4]
        inside &= (x1 - x0) * (ys[:, None] - y0) - (y1 - y0) * (xs[None, :] - x0) >= 0
    return inside


def screen_coverage(template: Template, supersample: int | None = None) -> np.ndarray:
    """Share of each pixel covered by the screen, float32 (H, W) in [0, 1] (anti-aliased edges)."""
    ss = supersample or _supersample_for(template.size)
    width, height = template.size
    inside = _inside_mask(template.corners, width, height, ss)
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3)).astype(np.float32)


def surround_mask(template: Template) -> np.ndarray:
    """Bool (H, W): True where no part of the pixel is screen, i.e. pixels ``insert`` leaves equal to the scene."""
    return screen_coverage(template) == 0


def _insert_one(foreground: Image.Image, template: Template, inside: np.ndarray, ss: int) -> Image.Image:
    width, height = template.size
    fg = to_rgb(foreground)
    quad = [(x * ss, y * ss) for x, y in template.corners]
    span_x = max(p[0] for p in quad) - min(p[0] for p in quad)
    span_y = max(p[1] for p in quad) - min(p[1] for p in quad)
    target = (max(1, math.ceil(span_x)), max(1, math.ceil(span_y)))
    if fg.width > target[0] or fg.height > target[1]:  # shrink first: a perspective warp does not low-pass
        fg = fg.resize((min(fg.width, target[0]), min(fg.height, target[1])), Image.Resampling.LANCZOS)
    pad = 3  # replicate the edges so bicubic taps at the screen border never read the fill colour
    padded = Image.fromarray(np.pad(np.asarray(fg), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    w, h = fg.size
    rect = [(pad, pad), (pad + w, pad), (pad + w, pad + h), (pad, pad + h)]
    warped = padded.transform(
        (width * ss, height * ss), Image.Transform.PERSPECTIVE, perspective_coeffs(quad, rect), Image.Resampling.BICUBIC
    )
    hi = np.asarray(warped, dtype=np.float32) * inside[..., None]
    screen = hi.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    coverage = inside.reshape(height, ss, width, ss).mean(axis=(1, 3))[..., None]
    out = np.asarray(template.scene, dtype=np.float32) * (1 - coverage) + screen
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def surround_view(template: Template, screen_colour: Sequence[int] = (128, 128, 128)) -> Image.Image:
    """The part of the scene a detector compares: the surround in its colours, the screen flat grey."""
    array = np.asarray(template.scene).copy()
    array[~surround_mask(template)] = np.asarray(screen_colour, dtype=np.uint8)
    return Image.fromarray(array)


def surround_distance(image: Image.Image, template: Template) -> float:
    """Mean absolute difference (0-255) between ``image`` and the template scene over the surround: 0 for a
    freshly templated image, larger the less of the template an image (e.g. after a VAE) still shows."""
    image = to_rgb(image)
    if image.size != template.size:
        image = image.resize(template.size, Image.Resampling.LANCZOS)
    mask = surround_mask(template)
    diff = np.abs(np.asarray(image, np.float32) - np.asarray(template.scene, np.float32))
    return float(diff[mask].mean())


def insert(foreground: Image.Image | Sequence[Image.Image], template: Template) -> Image.Image | list[Image.Image]:
    """Warp ``foreground`` (any size and mode) onto the template's screen and composite it over the scene.

    Anti-aliased by supersampling (the screen edge is a coverage-weighted blend); deterministic; the output
    has the scene's size and its surround pixels (``surround_mask``) equal the scene exactly. A list of
    images gives a list.
    """
    ss = _supersample_for(template.size)
    inside = _inside_mask(template.corners, *template.size, ss)
    if isinstance(foreground, Image.Image):
        return _insert_one(foreground, template, inside, ss)
    from tqdm.auto import tqdm

    images = list(foreground)
    return [_insert_one(image, template, inside, ss) for image in tqdm(images, desc="insert", disable=len(images) < 200)]


# ----------------------------------------------------------------------------- save / load


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG")
    return buffer.getvalue()


def template_json(template: Template) -> dict:
    """The JSON-able description of a template (its scene is stored beside it as a PNG)."""
    return {
        "name": template.name,
        "size": list(template.size),
        "corners": [list(p) for p in template.corners],
        "family": template.family,
        "scene_sha256": hashlib.sha256(png_bytes(template.scene)).hexdigest(),
    }


def save_template(template: Template, folder: str | os.PathLike, stem: str = "template") -> Path:
    """Write ``stem.png`` (the scene) and ``stem.json`` (name, size, corners, scene hash) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.png").write_bytes(png_bytes(template.scene))
    (folder / f"{stem}.json").write_text(json.dumps(template_json(template), indent=2) + "\n", encoding="utf-8")
    return folder


def load_template(folder: str | os.PathLike, stem: str = "template") -> Template:
    """Read a template written by ``save_template``; refuses a scene whose size or hash does not match."""
    from .data import load_rgb, read_json

    folder = Path(folder)
    meta_path = folder / f"{stem}.json"
    meta = read_json(meta_path, "template description")
    missing = [f for f in ("name", "size", "corners") if not isinstance(meta, dict) or f not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the field(s) {', '.join(missing)} (see save_template)")
    scene = load_rgb(folder / f"{stem}.png")
    if list(scene.size) != list(meta["size"]):
        raise ValueError(f"{folder / (stem + '.png')} is {scene.size[0]}x{scene.size[1]}, but {meta_path} says {meta['size']}")
    template = Template(meta["name"], scene, [tuple(p) for p in meta["corners"]], family=meta.get("family"))
    expected = meta.get("scene_sha256")
    if expected and hashlib.sha256(png_bytes(template.scene)).hexdigest() != expected:
        raise ValueError(f"{folder / (stem + '.png')} does not match the scene hash in {meta_path}")
    if template.family is not None and not _is_family_member(template):
        raise ValueError(f"{meta_path} says the template is {template.name!r} of the {template.family!r} family, but its scene is "
                         "not that member's: the decoy test is exact only for templates drawn by random_template. "
                         "Remove 'family' to use it as an ordinary template (no decoy test)")
    return template


def _is_family_member(template: Template) -> bool:
    """Whether ``template`` is exactly the member of its random family it is named after (scene and screen)."""
    try:
        member = family_member(template)
    except ValueError:
        return False
    return (np.array_equal(np.asarray(member.scene), np.asarray(template.scene))
            and np.allclose(member.corners, template.corners, atol=1e-6))


def resolve_template(template: Template | str | os.PathLike, size: int | Sequence[int] = 32) -> Template:
    """A ``Template`` as is, a built-in name (drawn at ``size``) or a folder written by ``save_template``."""
    if isinstance(template, Template):
        return template
    if isinstance(template, str) and template in BUILTIN:
        return builtin_template(template, size)
    if template == "random":
        return random_template(None, size)
    family, _, seed = str(template).partition(":") if isinstance(template, str) else ("", "", "")
    if family in FAMILIES:
        if not seed.isdigit():
            raise ValueError(f"random template {template!r} needs a non-negative integer seed, e.g. '{family}:0'")
        return random_template(int(seed), size, family)
    if Path(template).is_dir():
        return load_template(template)
    raise ValueError(f"unknown template {str(template)!r}: use one of {', '.join(BUILTIN)}, 'random', "
                     f"'<family>:<seed>' (families: {', '.join(FAMILIES)}) or a folder with template.png/json")


# ----------------------------------------------------------------------------- display and VAE


def vae_round_trip(pipe_or_vae, images: Sequence[Image.Image], size: int | None = None,
                   batch_size: int | None = None) -> list[Image.Image]:
    """Encode and decode images with a pipeline's VAE (latent means): what survives the autoencoder is the
    most a model trained in latent space can learn of a template. Works on any device and dtype."""
    from .data import images_to_tensor, tensor_to_images
    from .models import vae_reconstruct

    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    return tensor_to_images(vae_reconstruct(vae, images_to_tensor(images, size=size), batch_size))
