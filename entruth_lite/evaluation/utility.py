"""What a fine-tune gained from a dataset: the other side of the audit's evidence. An infringer who escapes the
audit but learned nothing of the data took nothing worth protecting; one who learned it and escaped is the case
the owner must close.

Three measures, lower is better for each, comparable across settings, seeds and models (tiny or Stable
Diffusion): the denoising loss on the released images (what the fine-tune was shown), on held-out images of the
owner's data (never released: what generalises), and the KID between the model's samples for the owner's captions
and the owner's images (offline feature network, ``quality.fid_kid``). ``gain_share`` turns any of them into the
share of a reference fine-tune's gain over the base model (1 = as much as the reference learned).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.diffusion import image_losses
from ..owner.probe import generate
from .quality import fid_kid, quality_prompts

MEASURES = ("release_loss", "held_out_loss", "kid")


@dataclass(frozen=True)
class Learned:
    """One model's measures on one owner's data (``measure_learned``); None where not measured."""

    release_loss: float
    held_out_loss: float | None = None
    kid: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def measure_learned(pipe, release: tuple[Sequence[Image.Image], Sequence[str]],
                    held_out: tuple[Sequence[Image.Image], Sequence[str]] | None = None, samples: int = 0,
                    num_inference_steps: int = 25, guidance_scale: float = 3.0, repeats: int = 4,
                    seed: int = 0) -> Learned:
    """``pipe``'s measures on the owner's data: ``release`` and ``held_out`` are (images, captions); with
    ``samples`` > 0, the KID of that many samples for the release's captions (seeded) against its images. Every
    random draw is seeded and the same for every model, so two models' numbers differ only by what they learned."""
    images, captions = release
    release_loss = float(image_losses(pipe, images, list(captions), repeats=repeats, seed=seed).mean())
    held_out_loss = None
    if held_out is not None:
        held_out_loss = float(image_losses(pipe, held_out[0], list(held_out[1]), repeats=repeats, seed=seed).mean())
    kid = None
    if samples:
        prompts, seeds = quality_prompts(captions, samples, seed)
        drawn = generate(pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         progress=False)
        kid = fid_kid(list(images), drawn, seed=seed)["kid"]
    return Learned(release_loss, held_out_loss, kid)


def gain_share(base: float, model: float, reference: float) -> float:
    """How much of the reference fine-tune's gain over the base a model made, for a lower-is-better measure:
    (base - model) / (base - reference); 0 = learned nothing, 1 = as much as the reference, < 0 = worse than base."""
    if not np.isfinite([base, model, reference]).all():
        raise ValueError(f"gain_share needs finite measures, got base={base}, model={model}, reference={reference}")
    if base == reference:
        raise ValueError(f"the reference gained nothing over the base (both {base}): no share can be taken of it")
    return float((base - model) / (base - reference))


def utility(base: Learned, model: Learned, reference: Learned) -> dict[str, float]:
    """``gain_share`` of every measure the three have in common."""
    return {name: gain_share(getattr(base, name), getattr(model, name), getattr(reference, name))
            for name in MEASURES
            if None not in (getattr(base, name), getattr(model, name), getattr(reference, name))}
