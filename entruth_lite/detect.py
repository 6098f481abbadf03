"""Detecting the template in generated images.

Template matching, training-free: compare an image's *surround* (the pixels outside the template's screen)
with the template's surround. The main score is a projection,

    score = <a - mean(a), t - mean(t)> / ||t - mean(t)||^2      (per colour channel, over the surround)

which is 1 when the surround is the template's, 0 when it is unrelated or flat, and stays near 0 on flat
regions where normalised cross-correlation (also given) can be large by chance.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .data import to_rgb
from .templates import Template, surround_mask


def _surround_pixels(images: Sequence[Image.Image], template: Template) -> tuple[np.ndarray, np.ndarray]:
    """(images' surround pixels (N, M, 3), template's (M, 3)), images resized to the template's size."""
    mask = surround_mask(template)
    if not mask.any():
        raise ValueError(f"template {template.name!r} has no surround pixels to compare")
    arrays = []
    for image in images:
        image = to_rgb(image)
        if image.size != template.size:
            image = image.resize(template.size, Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, np.float32)[mask])
    return np.stack(arrays), np.asarray(template.scene, np.float32)[mask]


def _centred(x: np.ndarray, axis: int) -> np.ndarray:
    return x - x.mean(axis=axis, keepdims=True)


def template_scores(images: Sequence[Image.Image], template: Template, method: str = "projection") -> np.ndarray:
    """One score per image, higher = more template-like: ``"projection"`` (default) or ``"ncc"``."""
    if len(images) == 0:
        return np.zeros(0, np.float32)
    pixels, scene = _surround_pixels(images, template)
    a, t = _centred(pixels, axis=1), _centred(scene, axis=0)
    dot = (a * t[None]).sum(axis=(1, 2))
    if method == "projection":
        return dot / float((t * t).sum())
    if method == "ncc":
        return dot / (np.sqrt((a * a).sum(axis=(1, 2))) * np.sqrt(float((t * t).sum())) + 1e-8)
    raise ValueError(f"unknown method {method!r}: use 'projection' or 'ncc'")
