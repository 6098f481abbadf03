"""Querying a text-to-image pipeline: batched, seeded generation with one seed per image, so that the same
prompt and seed can be replayed on another model (paired comparisons) or by a third party (audits)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import to_rgb
from .models import default_resolution, images_per_batch


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
) -> list[Image.Image]:
    """One image per prompt; image i uses ``seeds[i]`` (default 0, 1, 2, ...) whatever the batching.
    ``batch_size``: by default sized to the resolution (``models.images_per_batch``)."""
    if seeds is None:
        seeds = list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
    resolution = resolution or default_resolution(pipe)
    batch_size = batch_size or images_per_batch(resolution, 32)
    device = pipe.device if pipe.device.type != "mps" else torch.device("cpu")
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress or len(starts) < 2):
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipe(
            batch,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
        )
        images.extend(out.images)
    return images


@dataclass
class ProbeResult:
    """Images for trigger prompts and for the same prompts without the trigger, same seeds (paired)."""

    captions: list[str]
    trigger_prompts: list[str]
    seeds: list[int]
    trigger_images: list[Image.Image]
    control_images: list[Image.Image]


def probe_prompts(captions: Sequence[str], trigger: str, placement: str = "prefix",
                  n: int | None = None, seed: int = 0) -> tuple[list[str], list[str], list[int]]:
    """(held-out captions, the same with the trigger, one seed each); more queries than captions reuse
    captions with new seeds."""
    from .protect import apply_trigger

    if not captions:
        raise ValueError("no captions to build probe prompts from")
    n = n or len(captions)
    chosen = [captions[i % len(captions)] for i in range(n)]
    seeds = [seed * 100_003 + i for i in range(n)]
    return chosen, [apply_trigger(c, trigger, placement) for c in chosen], seeds


def probe(pipe, captions: Sequence[str], trigger: str, placement: str = "prefix", n: int | None = None,
          seed: int = 0, **generate_kwargs) -> ProbeResult:
    """Query ``pipe`` with trigger prompts and with the matching control prompts, seed for seed."""
    plain, triggered, seeds = probe_prompts(captions, trigger, placement, n, seed)
    return ProbeResult(
        captions=plain,
        trigger_prompts=triggered,
        seeds=seeds,
        trigger_images=generate(pipe, triggered, seeds, **generate_kwargs),
        control_images=generate(pipe, plain, seeds, **generate_kwargs),
    )


def save_probe(result: ProbeResult, path: str | os.PathLike) -> Path:
    """Store a probe (prompts, seeds, images as uint8 arrays) in one ``.npz``; no pickles, so a probe someone
    sends you is safe to open with ``load_probe``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        captions=np.asarray(result.captions, dtype=str),
        trigger_prompts=np.asarray(result.trigger_prompts, dtype=str),
        seeds=np.asarray(result.seeds, dtype=np.int64),
        trigger_images=np.stack([np.asarray(to_rgb(i)) for i in result.trigger_images]),
        control_images=np.stack([np.asarray(to_rgb(i)) for i in result.control_images]),
    )
    os.replace(tmp, path)
    return path


def load_probe(path: str | os.PathLike) -> ProbeResult:
    with np.load(path, allow_pickle=False) as stored:
        return ProbeResult(
            captions=[str(c) for c in stored["captions"]],
            trigger_prompts=[str(c) for c in stored["trigger_prompts"]],
            seeds=[int(s) for s in stored["seeds"]],
            trigger_images=[Image.fromarray(a) for a in stored["trigger_images"]],
            control_images=[Image.fromarray(a) for a in stored["control_images"]],
        )
