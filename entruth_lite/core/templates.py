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

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .data import images_to_tensor, load_rgb, tensor_to_images, to_rgb
from .models import vae_reconstruct
from .progress import tqdm

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
# Each design colours points (u, v) of a 32 x 32 unit square; ``rasterize`` evaluates it on a
# supersampled pixel grid of any size and box-averages, so the same design is crisp at 32 px and at 512 px.

MAGENTA, CYAN, YELLOW = (255, 0, 255), (0, 255, 255), (255, 255, 0)


def paint(image: np.ndarray, where: np.ndarray, colour: Sequence[float]) -> None:
    image[where] = np.asarray(colour, dtype=np.float32)


def ring_mask(u: np.ndarray, v: np.ndarray, width: float, x0=0.0, y0=0.0, x1=DESIGN_UNITS, y1=DESIGN_UNITS) -> np.ndarray:
    inside = (u >= x0) & (u < x1) & (v >= y0) & (v < y1)
    return inside & (np.minimum.reduce([u - x0, v - y0, x1 - u, y1 - v]) < width)


def _billboard(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A ring of 4-unit light bulbs cycling magenta/cyan/yellow around a dark panel; a slanted screen."""
    image = np.empty(u.shape + (3,), np.float32)
    paint(image, np.ones_like(u, bool), (25, 25, 40))
    ring = ring_mask(u, v, 4)
    index = ((np.floor(u / 4) + np.floor(v / 4)) % 3).astype(int)
    for k, colour in enumerate((MAGENTA, CYAN, YELLOW)):
        paint(image, ring & (index == k), colour)
    return image


def _frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A gilded picture frame: gold outer band, walnut inner band, crimson corner blocks with gold studs."""
    image = np.empty(u.shape + (3,), np.float32)
    paint(image, np.ones_like(u, bool), (85, 45, 12))  # walnut
    paint(image, ring_mask(u, v, 2), (240, 190, 30))  # gold band
    du, dv = np.minimum(u, DESIGN_UNITS - u), np.minimum(v, DESIGN_UNITS - v)
    paint(image, (du < 7) & (dv < 7), (200, 20, 60))  # crimson corner blocks
    paint(image, (du >= 2) & (du < 5) & (dv >= 2) & (dv < 5), (240, 190, 30))  # gold studs
    return image


def _window(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A blue-framed window in a brick wall, with slatted green shutters either side (not white: most
    foregrounds, the emoji included, sit on white, which would hide a white frame)."""
    image = np.empty(u.shape + (3,), np.float32)
    row = np.floor(v / 4)
    mortar = (v % 4 < 1) | ((u + 4 * (row % 2)) % 8 < 1)
    paint(image, np.ones_like(u, bool), (180, 60, 30))  # brick
    paint(image, mortar, (215, 210, 195))
    sides = ((u < 4) | (u >= 28)) & (v >= 2) & (v < 30)
    paint(image, sides, (20, 140, 60))  # shutters
    paint(image, sides & (v % 2 >= 1), (8, 80, 35))  # slats
    paint(image, (u >= 4) & (u < 28) & (v >= 2) & (v < 30), (25, 70, 170))  # window frame
    paint(image, (u >= 2) & (u < 30) & (v >= 28) & (v < 31), (25, 70, 170))  # sill
    return image


SMPTE_BARS = ((235, 235, 235), (235, 235, 16), (16, 235, 235), (16, 235, 16), (235, 16, 235), (235, 16, 16), (16, 16, 235))


def _tv(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A silver TV set: black bezel around the screen, a panel of SMPTE colour bars below it."""
    image = np.empty(u.shape + (3,), np.float32)
    paint(image, np.ones_like(u, bool), (165, 165, 178))  # silver body
    paint(image, (u >= 2) & (u < 30) & (v >= 2) & (v < 25), (10, 10, 10))  # bezel
    bars = (u >= 2) & (u < 30) & (v >= 26) & (v < 31)
    index = np.clip(np.floor((u - 2) / 4), 0, 6).astype(int)
    for k, colour in enumerate(SMPTE_BARS):
        paint(image, bars & (index == k), colour)
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


def list_templates() -> list[str]:
    """Names of the built-in templates."""
    return list(BUILTIN)


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(width) < MIN_SIZE or int(height) < MIN_SIZE:
        raise ValueError(f"template size {width}x{height} is too small: built-in designs need at least {MIN_SIZE} px")
    return int(width), int(height)


def rasterize(draw: Callable, width: int, height: int, supersample: int = 4) -> Image.Image:
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
    width, height = size_pair(size)
    design = BUILTIN[name]
    corners = [(x * width / DESIGN_UNITS, y * height / DESIGN_UNITS) for x, y in design.corners]
    return Template(name, rasterize(design.draw, width, height), corners)


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


def _edge_counts(a: np.ndarray, b: np.ndarray, x0: np.ndarray, rows: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """For edges (M,) and supersampled rows (R,): how many of the sorted centres ``xs`` satisfy ``_inside_mask``'s
    test ``a (y - y0) - b (x - x0) >= 0`` with b > 0 (a prefix of xs), shape (M, R). ``rows``: a (y - y0), (M, R).
    Exact: a division guesses the count, then the test itself is evaluated on a window of 4 centres around it."""
    n, ss = len(xs), 1.0 / (xs[1] - xs[0])
    guess = np.floor((rows / b[:, None] + x0[:, None] - xs[0]) * ss).astype(np.int64) + 1
    low = np.clip(guess - 2, 0, n)
    window = low[..., None] + np.arange(4)
    test = rows[..., None] - b[:, None, None] * (xs[np.minimum(window, n - 1)] - x0[:, None, None]) >= 0
    return low + (test & (window < n)).sum(axis=-1)


def surround_masks(corners: np.ndarray, width: int, height: int) -> np.ndarray:
    """``surround_mask`` of many screens at once: ``corners`` (B, 4, 2) clockwise, as a Template holds them; bool
    (B, H, W), equal pixel for pixel. A convex screen covers an interval of each supersampled row, so each edge
    gives one bound per row, instead of a test at every supersampled point."""
    corners = np.asarray(corners, np.float64)
    ss = _supersample_for((width, height))
    xs = (np.arange(width * ss, dtype=np.float64) + 0.5) / ss
    ys = (np.arange(height * ss, dtype=np.float64) + 0.5) / ss
    start = np.zeros((len(corners), len(ys)), np.int64)
    end = np.full((len(corners), len(ys)), len(xs), np.int64)
    for i in range(4):
        (x0, y0), (x1, y1) = corners[:, i].T, corners[:, (i + 1) % 4].T
        a, b = x1 - x0, y1 - y0
        rows = a[:, None] * (ys[None, :] - y0[:, None])  # the test: rows - b (x - x0) >= 0, as _inside_mask has it
        up, down, flat = b > 0, b < 0, b == 0
        end[up] = np.minimum(end[up], _edge_counts(a[up], b[up], x0[up], rows[up], xs))
        # b < 0: the test holds from some centre on; mirroring x turns it into a prefix count
        mirrored = _edge_counts(a[down], -b[down], -x0[down], rows[down], -xs[::-1])
        start[down] = np.maximum(start[down], len(xs) - mirrored)
        end[flat] = np.where(rows[flat] >= 0, end[flat], 0)
    columns = np.arange(width)
    covered = (columns >= start[..., None] // ss) & (columns <= (end[..., None] - 1) // ss) & (end > start)[..., None]
    return ~covered.reshape(len(corners), height, ss, width).any(axis=2)


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

    images = list(foreground)
    return [_insert_one(image, template, inside, ss) for image in tqdm(images, desc="insert", disable=len(images) < 200)]


# ----------------------------------------------------------------------------- display and VAE


def vae_round_trip(pipe_or_vae, images: Sequence[Image.Image], size: int | None = None,
                   batch_size: int | None = None) -> list[Image.Image]:
    """Encode and decode images with a pipeline's VAE (latent means): what survives the autoencoder is the
    most a model trained in latent space can learn of a template. Works on any device and dtype."""
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    return tensor_to_images(vae_reconstruct(vae, images_to_tensor(images, size=size), batch_size))
