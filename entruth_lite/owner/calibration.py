"""The owner's plain images (the dataset minus what was templated) as negatives: what the detector's threshold
and the classifier are calibrated on, drawn through the suspect's VAE as a model would draw them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.data import crop_to_square, load_imagefolder
from ..core.templates import vae_round_trip
from . import detect, verify


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


def owner_negatives(key, vae) -> list[Image.Image]:
    """The owner's plain images as a model draws them: ``plain_images_of(key)`` after a round trip through ``vae``
    (a pipeline or its autoencoder). What detector thresholds are calibrated on."""
    return vae_round_trip(vae, plain_images_of(key))


def plain_threshold(key, negatives: Sequence[Image.Image], fpr: float = 0.01) -> float:
    """The projection score that a share ``fpr`` of the plain images ``negatives`` reach (``owner_negatives``)."""
    return verify.calibrate_threshold(detect.template_scores(negatives, key.template), fpr)


def negatives_as_trained(negatives: Sequence[Image.Image], side: int, max_negatives: int) -> list[Image.Image]:
    """Up to ``max_negatives`` plain images (a fixed seeded subsample, kept in order), centre-cropped to ``side``
    px: the plain images as a suspect of that resolution saw them in training (a no-op crop when they already are)."""
    order = np.random.default_rng(0).permutation(len(negatives))[:max_negatives]
    return [crop_to_square(negatives[i], side) for i in sorted(order)]
