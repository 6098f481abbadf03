"""The owner's plain images (the dataset minus what was templated) as negatives: what the detector's threshold
and the classifier are calibrated on, drawn through the suspect's VAE as a model would draw them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.data import crop_to_square, load_imagefolder
from ..core.models import default_resolution
from ..core.templates import vae_round_trip
from . import detect, verify

MAX_NEGATIVES = 512  # plain images an audit calibrates on, at most (a fixed seeded subsample)


def plain_images_of(key) -> list[Image.Image]:
    """The owner's unaltered images: the key's source dataset minus the files it templated, each resized and
    centre-cropped to the key's training resolution when it records one (photos of any size become what the model
    was trained on, the size its generations and the templated images have)."""
    if not key.source or not Path(key.source).is_dir():
        raise FileNotFoundError(f"the key's source dataset {key.source!r} is not available; pass negatives (plain images)")
    dataset = load_imagefolder(key.source)
    altered = set(key.files)
    plain = (dataset.image(i) for i, name in enumerate(dataset.file_names) if name not in altered)
    return [crop_to_square(image, key.resolution) if key.resolution else image for image in plain]


def plain_threshold(key, negatives: Sequence[Image.Image], fpr: float = 0.01) -> float:
    """The projection score that a share ``fpr`` of the plain images ``negatives`` reach (``audit_negatives``)."""
    return verify.calibrate_threshold(detect.template_scores(negatives, key.template), fpr)


def negatives_as_trained(negatives: Sequence[Image.Image], side: int, max_negatives: int) -> list[Image.Image]:
    """Up to ``max_negatives`` plain images (a fixed seeded subsample, kept in order), centre-cropped to ``side``
    px: the plain images as a suspect of that resolution saw them in training (a no-op crop when they already are)."""
    order = np.random.default_rng(0).permutation(len(negatives))[:max_negatives]
    return [crop_to_square(negatives[i], side) for i in sorted(order)]


def audit_plain_images(key, side: int, max_negatives: int = MAX_NEGATIVES,
                       plain: Sequence[Image.Image] | None = None) -> list[Image.Image]:
    """The plain images an audit calibrates on: ``plain`` (default: ``plain_images_of(key)``) as
    ``negatives_as_trained`` keeps them. One set for every test that needs plain images, in ``audit`` and in a
    notebook alike, so their p-values agree to the digit."""
    return negatives_as_trained(plain_images_of(key) if plain is None else plain, side, max_negatives)


def audit_negatives(key, vae, max_negatives: int = MAX_NEGATIVES, side: int | None = None) -> list[Image.Image]:
    """``audit_plain_images`` at ``side`` px (default: the model's own) as ``vae`` (a pipeline) draws them: the
    projection detector's negatives in an audit."""
    return vae_round_trip(vae, audit_plain_images(key, side or default_resolution(vae), max_negatives))
