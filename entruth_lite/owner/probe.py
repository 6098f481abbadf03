"""Querying a text-to-image pipeline: batched, seeded generation with one seed per image, so that the same
prompt and seed can be replayed on another model (paired comparisons) or by a third party (audits)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..core.data import IMAGE_SUFFIXES, load_rgb, to_rgb
from ..core.emoji import emoji_splits
from ..core.models import default_resolution, images_per_batch, launched_processes
from ..core.progress import tqdm
from .triggers import apply_trigger


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
    split: bool = True,
) -> list[Image.Image]:
    """One image per prompt; image i uses ``seeds[i]`` (default 0, 1, 2, ...) whatever the batching.
    ``batch_size``: by default sized to the resolution (``models.images_per_batch``). Under ``accelerate launch``
    the queries are split between the processes (``split``) and every process returns all of them."""
    if seeds is None:
        seeds = list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
    if split and launched_processes() > 1:
        return _generate_split(pipe, prompts, seeds, num_inference_steps, guidance_scale, batch_size, resolution,
                               progress)
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


def _generate_split(pipe, prompts, seeds, num_inference_steps, guidance_scale, batch_size, resolution,
                    progress) -> list[Image.Image]:
    """``generate`` under ``accelerate launch``: the batches one process would draw are shared out between the
    processes, whole and in order, and every process gets all images back in query order. Each image is seeded by
    its own query and drawn in the same batch as one process would draw it, so they are that process's images."""
    # imported here, not at the top: accelerate is slow to import, and needed only under several processes
    from accelerate import PartialState
    from accelerate.utils import gather_object

    resolution = resolution or default_resolution(pipe)
    batch_size = batch_size or images_per_batch(resolution, 32)
    state = PartialState(cpu=not torch.cuda.is_available())  # on CPUs: gloo (as finetune joins them)
    with state.split_between_processes(list(range(0, len(prompts), batch_size))) as starts:
        mine = slice(starts[0], starts[-1] + batch_size) if starts else slice(0, 0)
        images = generate(pipe, list(prompts)[mine], list(seeds)[mine], num_inference_steps, guidance_scale, batch_size,
                          resolution, progress and state.is_main_process, split=False) if starts else []
    return gather_object(images)


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
    if not captions:
        raise ValueError("no captions to build probe prompts from")
    n = n or len(captions)
    chosen = [captions[i % len(captions)] for i in range(n)]
    seeds = [seed * 100_003 + i for i in range(n)]
    return chosen, [apply_trigger(c, trigger, placement) for c in chosen], seeds


def probe_model(pipe, captions: Sequence[str], trigger: str, placement: str = "prefix", n: int | None = None,
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


# ----------------------------------------------------------------------------- black-box suspects
# A suspect known only as a generation service: the owner sends it the prompt sheet's prompts, saves its images in a
# folder, and ``probe_from_images`` turns the folder back into a probe that the audit scores like any other.

SHEET_FIELDS = ("query", "kind", "prompt", "seed", "file")
KINDS = ("trigger", "control")


def prompt_sheet(captions: Sequence[str], trigger: str, placement: str = "prefix", n: int | None = None,
                 seed: int = 0, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 resolution: int = 512) -> list[dict]:
    """The queries as rows a person can paste into any service: each query's trigger prompt, then its control
    prompt (same caption, no trigger), with the seed and sampler settings to use where the service accepts them and
    the file name to save the answer under. Pairs come together, so a sheet answered halfway has whole pairs."""
    plain, triggered, seeds = probe_prompts(captions, trigger, placement, n, seed)
    settings = dict(steps=num_inference_steps, guidance_scale=guidance_scale, width=resolution, height=resolution)
    return [dict(query=i, kind=kind, prompt=prompt, seed=s, file=f"{kind}-{i:03d}.png", **settings)
            for i, (p, t, s) in enumerate(zip(plain, triggered, seeds)) for kind, prompt in zip(KINDS, (t, p))]


def write_prompt_sheet(rows: Sequence[dict], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The sheet as JSON lines (one query each), written whole or not at all."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_prompt_sheet(path: str | os.PathLike) -> list[dict]:
    """A prompt sheet (or a manifest: the sheet with each ``file`` changed to the name the image was saved under)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt sheet not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from error
        missing = [f for f in SHEET_FIELDS if f not in row] if isinstance(row, dict) else list(SHEET_FIELDS)
        if missing or row["kind"] not in KINDS:
            raise ValueError(f"{path}, line {number}: a prompt sheet row needs {', '.join(SHEET_FIELDS)} with kind "
                             f"'trigger' or 'control' (missing: {', '.join(missing) or 'none'})")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no queries")
    return rows


def _natural(name: str) -> list:
    """Sort key that puts 'image (2)' before 'image (10)', as file browsers do."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def match_images(folder: str | os.PathLike, rows: Sequence[dict]) -> tuple[list[Path], list[str]]:
    """The image answering each row, and notes. By name when every row's ``file`` is in ``folder`` (the sheet's
    own names, or a manifest's); otherwise by order: the folder's images sorted by name (naturally) answer the
    rows in sheet order, which needs exactly one image per row."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda p: _natural(p.name))
    names = [row["file"] for row in rows]
    present = {p.name for p in images}
    if all(name in present for name in names):
        extra = sorted(present - set(names), key=_natural)
        notes = [f"ignored {len(extra)} image(s) the sheet does not name: {', '.join(extra[:5])}"] if extra else []
        return [folder / name for name in names], notes + [f"images matched to prompts by file name in {folder}"]
    named = [name for name in names if name in present]
    if named:  # some names match: a partly answered or mistyped manifest, not an order
        missing = [name for name in names if name not in present]
        raise ValueError(f"{len(missing)} image(s) the sheet names are missing from {folder}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if len(images) != len(rows):
        raise ValueError(f"{folder} has {len(images)} images and no file the sheet names; matching by order needs "
                         f"exactly one image per prompt ({len(rows)}: {len(rows) // 2} queries x trigger and control)"
                         f", or a manifest naming each image")
    return images, [f"images matched to prompts by file-name order in {folder} (first: {images[0].name})"]


def probe_from_images(folder: str | os.PathLike, rows: Sequence[dict]) -> tuple[ProbeResult, list[str]]:
    """A probe from a service's saved answers to a prompt sheet (``rows``, its own or a manifest's file names):
    every query needs its trigger and its control image; each must be a readable square image, resized to the
    sheet's size when the service answered at another one. Returns the probe and notes saying what was done."""
    paths, notes = match_images(folder, rows)
    by_query: dict[int, dict[str, tuple[dict, Path]]] = {}
    for row, path in zip(rows, paths):
        by_query.setdefault(int(row["query"]), {})[row["kind"]] = (row, path)
    unpaired = [q for q, pair in by_query.items() if set(pair) != set(KINDS)]
    if unpaired:
        raise ValueError(f"queries {unpaired[:5]} lack a trigger or a control row: the sheet is not a whole prompt sheet")
    resized, images = [], {}
    for query, pair in by_query.items():
        for kind, (row, path) in pair.items():
            image = load_rgb(path)  # a DatasetError naming the file when it is corrupt
            if image.width != image.height:
                raise ValueError(f"{path.name} is {image.width}x{image.height}: the sheet asks for square "
                                 f"{row['width']}x{row['height']} images (answer query {query} again, uncropped)")
            if image.width != row["width"]:
                resized.append(path.name)
                image = image.resize((row["width"], row["height"]), Image.Resampling.LANCZOS)
            images[query, kind] = image
    if resized:
        notes.append(f"{len(resized)} image(s) were not {rows[0]['width']} px and were resized to it "
                     f"(e.g. {resized[0]})")
    queries = sorted(by_query)
    first = {q: by_query[q]["control"][0] for q in queries}
    probed = ProbeResult(captions=[first[q]["prompt"] for q in queries],
                         trigger_prompts=[by_query[q]["trigger"][0]["prompt"] for q in queries],
                         seeds=[int(first[q]["seed"]) for q in queries],
                         trigger_images=[images[q, "trigger"] for q in queries],
                         control_images=[images[q, "control"] for q in queries])
    notes.append(f"scored {len(queries)} trigger and {len(queries)} control images")
    return probed, notes


def answer_prompt_sheet(pipe, rows: Sequence[dict], folder: str | os.PathLike, progress: bool = True) -> Path:
    """Stand in for a generation service: answer every row with ``pipe`` (its prompt, seed and settings) and save
    the images under the sheet's names, as a user would save a service's answers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    for kind in KINDS:  # batched as ``probe_model`` batches them, so the images are the ones an audit of ``pipe`` draws
        chosen = [r for r in rows if r["kind"] == kind]
        images = generate(pipe, [r["prompt"] for r in chosen], [r["seed"] for r in chosen],
                          num_inference_steps=first["steps"], guidance_scale=first["guidance_scale"],
                          resolution=first["width"], progress=progress)
        for row, image in zip(chosen, images):
            image.save(folder / row["file"])
    return folder


def answer_from_probe(probed: ProbeResult, rows: Sequence[dict], folder: str | os.PathLike) -> Path:
    """Answer a prompt sheet with a probe's images (a service's answers, recorded): each row gets the image the
    probe holds for its prompt and seed, trigger rows from the trigger images, control rows from the controls.
    Refused, before anything is written, when the probe lacks a row's query."""
    answers = {}
    for prompts, images, kind in ((probed.trigger_prompts, probed.trigger_images, "trigger"),
                                  (probed.captions, probed.control_images, "control")):
        answers |= {(kind, prompt, int(seed)): image for prompt, seed, image in zip(prompts, probed.seeds, images)}
    missing = [row for row in rows if (row["kind"], row["prompt"], int(row["seed"])) not in answers]
    if missing:
        raise ValueError(f"the probe has no answer to {len(missing)} of the sheet's {len(rows)} rows (first: "
                         f"{missing[0]['kind']} {missing[0]['prompt']!r}, seed {missing[0]['seed']})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        answers[row["kind"], row["prompt"], int(row["seed"])].save(folder / row["file"])
    return folder


def default_captions(model: str) -> list[str]:
    """The default probe captions: for the tiny model, the emoji split's held-out probe captions."""
    if model != "tiny":
        raise ValueError("give the probe captions (held-out captions like the dataset's, one per line) for a model "
                         "other than the tiny one")

    return [caption for _, caption in emoji_splits().probe]
