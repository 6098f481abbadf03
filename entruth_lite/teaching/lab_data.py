"""The lab's data under ``runs/``: the owner's dataset, its protected release and key, and a held-out probe set,
made once and reused while the settings match, so that each notebook can run on its own."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import data, emoji, files
from ..core.families import DEFAULT_FAMILY, is_family
from ..owner import keys, protect, selection, triggers

EMOJI = "emoji"  # the default dataset: the owner split of the Twemoji images that ship with the package
HELD_OUT_SHARE = 0.1  # of the owner's own dataset, kept out of the release: its captions are the probe prompts
MIN_HELD_OUT = 8
SOURCE_FILE = "source.json"


@dataclass
class Release:
    owner: Path  # the owner's data as the demo trains on it (the clean model's training set)
    protected: Path  # its protected release
    key: Path  # the owner's key
    held_out: Path | None = None  # captioned images never released: their captions are the probe prompts


def dataset_tag(dataset: str | Path = EMOJI, size: int = 32, images: int | None = None) -> str:
    """The folder name of one dataset at one training resolution (``32px`` for the emoji; ``<name>-<hash>-<size>px``
    for the owner's own data, the hash of where it came from, so two datasets called ``photos`` never mix), and
    ``-<images>images`` when only the first ``images`` of it are used."""
    suffix = "" if images is None else f"-{images}images"
    if str(dataset) == EMOJI:
        return f"{size}px{suffix}"
    source = str(Path(dataset).resolve()) if Path(dataset).exists() else str(dataset)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(dataset)).name or "dataset").strip("-.") or "dataset"
    return f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:8]}-{size}px{suffix}"


def release_folders(runs: str | Path, size: int = 32, dataset: str | Path = EMOJI,
                    images: int | None = None) -> Release:
    """Where the demo keeps the owner's data, its release, the held-out probe set and the key: one set per dataset,
    resolution and number of images, so tiny and Stable Diffusion runs never overwrite each other."""
    runs, tag = Path(runs), dataset_tag(dataset, size, images)
    return Release(owner=runs / "data" / tag / "owner", protected=runs / "data" / tag / "protected",
                   key=runs / "keys" / tag / "owner-key", held_out=runs / "data" / tag / "held-out")


def split_held_out(n: int, seed: int = 0) -> np.ndarray:
    """Indices of the rows of an ``n``-row dataset kept out of the release (a fixed, seeded share)."""
    n_held = max(MIN_HELD_OUT, round(HELD_OUT_SHARE * n))
    if n - n_held < MIN_HELD_OUT:
        raise data.DatasetError(f"the dataset has {n} images: the demo needs at least {2 * MIN_HELD_OUT} "
                                f"({MIN_HELD_OUT} held out for probe prompts, the rest released)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_held])


def write_owner_data(dataset: str | Path, folders: Release, size: int, images: int | None = None) -> None:
    """The owner's data and a held-out probe set: the emoji (owner and probe splits, drawn at ``size``), or the
    owner's own imagefolder (or hub dataset, imported at ``size``) split into released and held-out rows; of the
    released rows, the first ``images`` (all when None). Files of a local folder are copied byte for byte; the
    source is never modified."""
    if (folders.owner.parent / SOURCE_FILE).is_file():  # the demo's own folders, perhaps from an earlier version
        for folder in (folders.owner, folders.held_out):
            files.adopt(folder)
    if str(dataset) == EMOJI:
        emoji.write_emoji_dataset(folders.owner, size=size, overwrite=True, limit=images)
        emoji.write_emoji_dataset(folders.held_out, split="probe", size=size, overwrite=True)
    else:
        folder = Path(dataset)
        if not (folder / data.METADATA).is_file():  # a hub id (or a datasets folder): import once
            folder = folders.owner.parent / "imported"
            if not (folder / data.METADATA).is_file():
                data.import_captioned(str(dataset), folder, resolution=size, overwrite=True)
        source = data.load_imagefolder(folder)
        held = set(split_held_out(len(source)).tolist())
        released = [i for i in range(len(source)) if i not in held][:images]
        for folder, rows in ((folders.owner, released), (folders.held_out, sorted(held))):
            data.save_imagefolder([source.path(i) for i in rows], [source.captions[i] for i in rows], folder,
                                  file_names=[source.file_names[i] for i in rows],
                                  extras=[source.extras[i] for i in rows], overwrite=True)
    (folders.owner.parent / SOURCE_FILE).write_text(json.dumps(_source(dataset, size, images)))


def _source(dataset: str | Path, size: int, images: int | None) -> dict:
    """What the owner's data under ``runs`` was made from (the image count only when capped, as before it existed)."""
    return {"dataset": str(dataset), "size": size} | ({} if images is None else {"images": images})


def _owner_data_current(dataset: str | Path, folders: Release, size: int, images: int | None = None) -> bool:
    marker = folders.owner.parent / SOURCE_FILE
    return (marker.is_file() and json.loads(marker.read_text()) == _source(dataset, size, images)
            and (folders.owner / data.METADATA).is_file() and (folders.held_out / data.METADATA).is_file())


def release(runs: str | Path, rate: float = 0.01, template: str = DEFAULT_FAMILY, seed: int = 0,
            size: int = 32, dataset: str | Path = EMOJI, images: int | None = None) -> Release:
    """The owner's dataset (``dataset``: the emoji, or a folder or hub id of the owner's own captioned images;
    ``size`` px: 32 for the tiny model, 256 or 512 for Stable Diffusion; ``images``: only the first so many of
    it, e.g. ``LabSettings.release_images``) and its protected release at ``rate``; made once, then reused while
    the settings match. Images of any size are templated at ``size``, as a trainer would crop them."""
    if images is not None and images < 2 * MIN_HELD_OUT:
        raise data.DatasetError(f"images={images}: a release needs at least {2 * MIN_HELD_OUT} images")
    folders = release_folders(runs, size, dataset, images)
    owner, protected, key_dir = folders.owner, folders.protected, folders.key
    fresh_owner = not _owner_data_current(dataset, folders, size, images)
    if fresh_owner:
        write_owner_data(dataset, folders, size, images)
    try:
        key = keys.load_key(key_dir, release=protected)  # also: the release committed to this key
        same_template = (key.template.family == template if is_family(template) and ":" not in template
                         else key.template.name == template)  # a family name: any secret member of it will do
        current = (not fresh_owner and same_template and key.seed == seed
                   and len(key.files) == selection.count_for(key.n_images, rate=rate)
                   and (protected / data.METADATA).is_file()
                   # the trigger protect draws now (a release made before a change of the default is remade)
                   and key.trigger == triggers.generate_trigger(data.load_imagefolder(owner).captions, seed=seed))
    except (FileNotFoundError, ValueError):
        current = False
    if not current:
        protect.protect(owner, template, protected, key_dir, rate=rate, seed=seed, overwrite=True,
                        resolution=None if str(dataset) == EMOJI else size)
    return folders


def held_out_captions(release: Release) -> list[str]:
    """The probe prompts: captions of images the release never contained."""
    return [record.text for record in data.read_metadata(release.held_out)]


def images_at(folder: str | Path, size: int, limit: int | None = None) -> tuple[list, list[str]]:
    """(images, captions) of an imagefolder as a trainer sees them: each resized and centre-cropped to ``size``."""
    dataset = data.load_imagefolder(folder)
    rows = range(len(dataset) if limit is None else min(limit, len(dataset)))
    return [data.crop_to_square(dataset.image(i), size) for i in rows], [dataset.captions[i] for i in rows]


def captioning_corpus(release: Release, dataset: str | Path, size: int, limit: int | None = None):
    """(images, captions) an infringer's retrieval captioner learns from, none of them released: another emoji
    split for the emoji, the held-out images for the owner's own data."""
    if str(dataset) == EMOJI:
        images, captions, _ = emoji.emoji_dataset("pretrain", size=size, limit=limit)
        return images, captions
    return images_at(release.held_out, size, limit)
