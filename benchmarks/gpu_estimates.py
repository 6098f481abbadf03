"""Time and memory of the GPU presets: ESTIMATES from stated assumptions, until ``benchmarks.gpu_check`` measures
them on a GPU (issue #17). Nothing here was run on a GPU.

    python -m benchmarks.gpu_estimates [--out benchmarks/results/gpu_estimates.csv]

For each preset: how many images it shows the model (steps x batch x accumulation), the estimated wall time on its
card (and for the lab's two fine-tunes), the release the lab trains it on (``demo.LabSettings.for_preset``: the
whole emoji set, or the smaller one a preset is sized for, ``demo.GPU_LABS``), its templated images and the passes
over each image, against the passes
the ``tiny-cpu`` preset gives the owner's emoji (the setting that memorizes on the CPU: ``presets.exposures``), and
the largest release that would still get as many. Memory is SD 1.5's frozen weights in half precision (parameter
counts of ``sd_architecture``'s full build) plus a per-image activation footprint.

The per-image figures are ASSUMPTIONS, order-of-magnitude readings of public reports of diffusers / kohya LoRA runs
of SD 1.5 at 512 px, not measurements: replace them with ``gpu_check``'s step time and peak memory once a GPU run
exists (its table prints both). Below 512 px they are scaled by the pixel count: attention, which grows with the
square of the pixels, then costs less than assumed, and fixed per-step costs (the text encoder, kernel launches)
more.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entruth_lite.core import emoji
from entruth_lite.infringer import presets
from entruth_lite.owner import selection
from entruth_lite.teaching import demo

from .common import write_table

RESULTS = Path(__file__).resolve().parent / "results"

# ---- assumptions (estimates, not measured here) ------------------------------------------------------------
SECONDS_PER_IMAGE_512 = {"colab-t4": 1.0, "a100": 0.12}  # one 512 px training image, LoRA, the preset's precision
CARD = {"colab-t4": ("T4", 15.0), "a100": ("A100 40 GB", 40.0)}  # name, usable GiB
ACTIVATIONS_GIB_PER_IMAGE_512 = {True: 0.8, False: 3.0}  # with / without gradient checkpointing, half precision
OVERHEAD_GIB = 1.5  # CUDA context, allocator slack, LoRA weights and optimizer state
SD15_PARAMETERS = 859_520_964 + 83_653_863 + 123_060_480  # UNet + VAE + text encoder (sd_architecture, full)
MARGIN = 0.75  # a preset "fits" when the estimate is at most this share of the card
LAB_FINE_TUNES = 2  # the lab trains a protected and a clean model (teaching.demo.finetuned), one after the other


def estimate(name: str, tiny_exposures: float, n_owner: int) -> dict:
    config, lab = presets.preset(name), demo.LAB.for_preset(name)
    release = lab.release_images or n_owner
    images = config.steps * config.batch_size * config.gradient_accumulation_steps
    pixels = (config.resolution / 512) ** 2
    minutes = images * SECONDS_PER_IMAGE_512[name] * pixels / 60
    weights = SD15_PARAMETERS * 2 / 2**30
    memory = weights + OVERHEAD_GIB + config.batch_size * ACTIVATIONS_GIB_PER_IMAGE_512[config.gradient_checkpointing] * pixels
    card, card_gib = CARD[name]
    return dict(preset=name, card=card, resolution=config.resolution, steps=config.steps, batch=config.batch_size,
                accumulation=config.gradient_accumulation_steps, images_shown=images,
                est_minutes=round(minutes), est_lab_minutes=round(LAB_FINE_TUNES * minutes), lab_release=release,
                lab_rate=lab.rate,
                templated=selection.count_for(release, rate=lab.rate),
                passes=round(presets.exposures(config, release), 1),
                max_release_at_tiny_exposures=int(images // tiny_exposures),
                est_peak_gib=round(memory, 1), card_gib=card_gib, fits_with_margin=bool(memory <= MARGIN * card_gib))


def rows() -> list[dict]:
    """One estimate per GPU preset, with the tiny preset's passes over the owner's emoji as the bar to meet."""
    n_owner = len(emoji.emoji_splits().owner)
    tiny = presets.exposures(presets.preset("tiny-cpu"), n_owner)
    return [estimate(name, tiny, n_owner) | {"tiny_exposures": round(tiny, 1)} for name in presets.gpu_presets()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_estimates.csv")
    args = parser.parse_args()
    write_table(rows(), args.out)


if __name__ == "__main__":
    main()
