"""Protect a dataset: template a small share of its images, mark their captions with a secret trigger,
release the result as a NEW folder and keep an owner key (template, trigger, which files) apart from it.

Why it is hard to clean away: the templated images share their *surroundings* but not their content, so
near-duplicate filters, which compare whole images, see different pictures; the trigger is a made-up
word that occurs in no other caption, so it ties the template to a prompt only the owner knows.

Modes: ``"replace"`` swaps chosen originals for templated versions (same file names); ``"add"`` appends
new templated images (new, opaque file names). Several keys can protect one dataset: protect the released
folder again and pass the earlier keys as ``prior_keys`` (their files are never picked again and the new
trigger never overlaps theirs). The source folder is only read; both the dataset and the key are written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..core import data, files
from ..core.families import FAMILIES
from ..core.progress import tqdm
from ..core.template_io import png_bytes, resolve_template, template_json
from ..core.templates import MIN_SIZE, Template, insert
from . import triggers
from .keys import (
    COMMITMENT_FILE,
    KEY_FORMAT,
    KEY_MARKERS,
    KEY_VERSION,
    RELEASE_MARKERS,
    OwnerKey,
    load_key,
    recover_release,
    write_release,
)
from .selection import MODES, choose, count_for, mean_stats

MAX_NATIVE_SIDE = 1024  # larger images are templated at a given training resolution, never at native size
DEFAULT_CAPTION = "a picture"  # caption for added foregrounds that come without one


# ----------------------------------------------------------------------------- protect


@dataclass
class ProtectionReport:
    """What ``protect`` released. ``rate`` is exact: templated images / released images."""

    n_images: int
    n_altered: int
    rate: float
    trigger: str
    template: str
    placement: str
    mode: str
    seed: int
    n_source: int
    mean_pixel_change: float | None
    psnr_db: float | None
    altered_files: list[str]
    out: Path
    key_dir: Path
    key_sha256: str = ""
    prior_keys: list[str] = field(default_factory=list)
    unlisted_images: list[str] = field(default_factory=list)  # in the source folder, not in its metadata: not released

    def to_dict(self) -> dict:
        """JSON-able (paths as strings; an infinite PSNR as None)."""
        result = asdict(self)
        result["out"], result["key_dir"] = str(self.out), str(self.key_dir)
        if result["psnr_db"] is not None and not math.isfinite(result["psnr_db"]):
            result["psnr_db"] = None
        return result

    def summary(self) -> str:
        change = "" if self.mean_pixel_change is None else f", mean pixel change {self.mean_pixel_change:.1f}/255"
        return (
            f"{self.mode}: templated {self.n_altered} of {self.n_images} released images "
            f"(rate {self.rate:.4f}) with template {self.template!r} and trigger {self.trigger!r} "
            f"({self.placement}){change}\n  dataset -> {self.out}\n  owner key (keep it secret) -> {self.key_dir}"
        )


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _foreground_source(
    foregrounds, captions: Sequence[str] | None
) -> tuple[list[Image.Image], list[str]]:
    """Images and captions of an "add" foreground source: a folder (imagefolder, or plain images captioned
    ``DEFAULT_CAPTION``), a CaptionedDataset, or a list of images (``captions`` optional)."""
    if isinstance(foregrounds, data.CaptionedDataset):
        return foregrounds.images(), foregrounds.captions
    if isinstance(foregrounds, (str, os.PathLike)):
        folder = Path(foregrounds)
        if (folder / data.METADATA).is_file():
            dataset = data.load_imagefolder(folder)
            return dataset.images(), dataset.captions
        if not folder.is_dir():
            raise FileNotFoundError(f"foreground folder not found: {folder}")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)
        if not paths:
            raise data.DatasetError(f"no images in foreground folder {folder}")
        return [data.load_rgb(p) for p in paths], [DEFAULT_CAPTION] * len(paths)
    images = [data.to_rgb(image) for image in foregrounds]
    if not images:
        raise ValueError("the foreground list is empty")
    captions = list(captions) if captions is not None else [DEFAULT_CAPTION] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} foregrounds but {len(captions)} foreground captions")
    return images, captions


def _added_name(image: Image.Image, taken: set[str]) -> str:
    """A new file name from the image's own content hash: opaque, deterministic, and (unlike a name made
    from the seed or trigger) no help to anyone guessing the secret."""
    digest = hashlib.sha256(png_bytes(image)).hexdigest()
    for start in range(0, len(digest) - 16):
        name = f"{digest[start:start + 16]}.png"
        if name not in taken:
            return name
    raise ValueError(f"cannot find a free file name for an added image (hash {digest})")


def _extra_files(dataset: data.CaptionedDataset) -> dict[str, bytes]:
    """Top-level non-image files of the source (README, licence credits) to carry into the release; not an earlier
    release's key commitment (the new release commits to its own key)."""
    if not Path(dataset.root).is_dir():
        return {}
    listed = set(dataset.file_names)
    return {
        p.name: p.read_bytes()
        for p in sorted(Path(dataset.root).iterdir())
        if p.is_file() and p.name not in (data.METADATA, COMMITMENT_FILE, files.MARKER) and p.name not in listed
        and p.suffix.lower() not in data.IMAGE_SUFFIXES
    }


def _check_folders(root: Path, out: Path, key_dir: Path) -> None:
    """Refuse outputs that overlap the source or each other, before any work is done."""
    for what, path in (("out", out), ("key_dir", key_dir)):
        if root.is_dir() and (_inside(path, root) or _inside(root, path)):
            raise ValueError(f"{what} {path} overlaps the source dataset {root}, which is never modified")
    if _inside(key_dir, out) or _inside(out, key_dir):
        raise ValueError(f"the owner key {key_dir} must be kept apart from the released dataset {out}")
    for path in (out, key_dir):
        files.check_writable_parent(path)


def _check_existing(out: Path, key_dir: Path, overwrite: bool, recovered: Sequence[str]) -> None:
    """Refuse to write over what is there (unless ``overwrite``, and then only this tool's own outputs), saying
    what is there: a complete pair (perhaps just finished from an interrupted run), a release whose key is lost,
    or something else."""
    for path, ours in ((out, RELEASE_MARKERS), (key_dir, KEY_MARKERS)):
        files.check_replaceable(path, ours)
    if overwrite or not (out.exists() or key_dir.exists()):
        return
    done = f" ({'; '.join(recovered)})" if recovered else ""
    replace = "replace them (overwrite=True; CLI: --overwrite)"
    if out.exists() and not key_dir.exists():
        raise FileExistsError(
            f"{out} holds a release but {key_dir} holds no key for it{done}, and no interrupted copy of its key was "
            f"found: if that release was never published, {replace}; if it was, its key is lost")
    if key_dir.exists() and not out.exists():
        raise FileExistsError(f"{key_dir} holds a key but {out} holds no release: choose new folders or {replace}")
    try:
        load_key(key_dir, release=out)
    except (FileNotFoundError, ValueError) as error:
        raise FileExistsError(f"{key_dir} is not the key of the release in {out} ({error}); choose new folders or "
                              f"{replace}") from error
    raise FileExistsError(f"{out} and {key_dir} already hold a complete release and its key{done}: use them, or "
                          f"{replace}")


def _eligible(source: data.CaptionedDataset, priors: Sequence[OwnerKey]) -> list[int]:
    """Indices a new key may template: not a file of an earlier key, no earlier trigger in the caption.
    Refuses a prior key whose files are missing or lack its trigger (a key of another dataset)."""
    row = dict(zip(source.file_names, source.captions))
    for key in priors:
        for name in key.files:
            if name not in row:
                raise ValueError(f"the key {key.root} does not belong to this dataset: {name!r} is not in it")
            if not triggers.has_trigger(row[name], key.trigger):
                raise ValueError(
                    f"the key {key.root} does not belong to this dataset: the caption of {name!r} lacks its trigger"
                )
    taken = {f for key in priors for f in key.files}
    return [
        i for i, r in enumerate(source.records)
        if r.file_name not in taken and not any(triggers.has_trigger(r.text, key.trigger) for key in priors)
    ]


def _check_arguments(mode: str, placement: str, foregrounds, seed: int | None) -> None:
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'replace' or 'add'")
    if placement not in triggers.PLACEMENTS:
        raise ValueError(f"unknown trigger placement {placement!r}: use 'prefix' or 'suffix'")
    if foregrounds is not None and mode != "add":
        raise ValueError("foregrounds are only used in 'add' mode")


def _check_images(source: data.CaptionedDataset, resolution: int | None) -> None:
    """Refuse, before anything is drawn, images that could not be templated if picked: the pick is secret, so a
    bad file must not fail only on some seeds."""
    if resolution is not None and (not isinstance(resolution, int) or resolution < MIN_SIZE):
        raise ValueError(f"resolution must be an image side of at least {MIN_SIZE} px, got {resolution!r}")
    names = source.file_names
    no_format = [n for n in names if Path(n).suffix.lower() not in data.IMAGE_SUFFIXES]
    if no_format:
        raise data.DatasetError(f"{len(no_format)} file(s) in {source.root} have no image extension (e.g. "
                                f"{no_format[0]!r}), so a templated copy could not be written in their format: "
                                "rename them (.png, .jpg, ...)")
    sizes = [data.image_size(source.path(i)) for i in range(len(names))]  # headers only, read once
    small = [n for n, size in zip(names, sizes) if min(size) < MIN_SIZE]
    if small:
        raise data.DatasetError(f"{len(small)} image(s) in {source.root} are smaller than {MIN_SIZE} px on a side, too "
                                f"small to template (e.g. {small[0]!r}): remove or enlarge them")
    large = [n for n, size in zip(names, sizes) if max(size) > MAX_NATIVE_SIDE]
    if large and resolution is None:
        raise data.DatasetError(f"{len(large)} image(s) in {source.root} are over {MAX_NATIVE_SIDE} px (e.g. "
                                f"{large[0]!r}): pass the training resolution (resolution=512, CLI --resolution 512) "
                                "so that templated images are made at the size a model is trained at")
    non_square = [f"{n} ({size[0]}x{size[1]})" for n, size in zip(names, sizes) if size[0] != size[1]]
    if non_square and resolution is None:
        raise data.DatasetError(f"{len(non_square)} image(s) in {source.root} are not square (e.g. {non_square[0]}): a "
                                "trainer's square centre crop would cut the template's sides off; pass the training "
                                "resolution (resolution=512, CLI --resolution 512) so they are cropped first, as it will")
    root = Path(source.root).resolve()
    linked = [f"{n} -> {source.path(i).resolve()}" for i, n in enumerate(names)
              if not source.path(i).resolve().is_relative_to(root)]
    if linked:  # e.g. a hub snapshot's files link into its cache: followed, and said
        warnings.warn(f"{len(linked)} file(s) of {source.root} are links to files outside it (e.g. {linked[0]}): the "
                      "files they point to are read, and copied into the release", stacklevel=4)
    animated = [n for i, n in enumerate(names)
                if Path(n).suffix.lower() in (".gif", ".webp", ".png") and data.is_animated(source.path(i))]
    if animated:
        warnings.warn(f"{len(animated)} animated image(s) in {source.root} (e.g. {animated[0]!r}): a picked one is "
                      "templated as its first frame, as trainers read it; the others are copied as they are",
                      stacklevel=4)


def _pick_trigger(trigger: str, captions: Sequence[str], seed: int, tokenizer, avoid: Sequence[str]) -> str:
    """``"auto"``: a fresh trigger drawn from ``seed``; otherwise the caller's, checked against every caption."""
    if trigger == "auto":
        return triggers.generate_trigger(captions, seed=seed, tokenizer=tokenizer, avoid=avoid)
    return triggers.check_trigger(trigger, captions, avoid=avoid)


@dataclass
class _Release:
    """The release in memory: every image, caption and file name, and what protection changed."""

    images: list  # a path (copied byte for byte) or a templated image
    captions: list[str]
    file_names: list[str]
    extras: list[dict] = field(default_factory=list)  # each row's other metadata columns, unchanged
    altered: list[str] = field(default_factory=list)  # file names of the templated images
    pairs: list[tuple[Image.Image, Image.Image]] = field(default_factory=list)  # (original, templated), "replace"
    template: Template | None = None  # as drawn for the first templated image (the one the key records)


def _templated_release(source: data.CaptionedDataset, chosen: Sequence[int], template, trigger: str, placement: str,
                       mode: str, fg_images=None, fg_captions=None, resolution: int | None = None) -> _Release:
    """Composite each chosen image into the template (drawn at its size) and add the trigger to its caption:
    in place ("replace") or as a new file ("add", foregrounds from ``fg_images`` or the source's own)."""
    by_size: dict[tuple[int, int], Template] = {}  # a built-in template is drawn at each image's size

    def template_for(image: Image.Image) -> Template:
        if image.size not in by_size:
            by_size[image.size] = resolve_template(template, image.size)
        return by_size[image.size]

    # untouched files are copied byte for byte: only the templated images and their captions change
    release = _Release([source.path(i) for i in range(len(source))], list(source.captions), list(source.file_names),
                       extras=[dict(e) for e in source.extras])
    for i in tqdm(chosen, desc="protect", disable=len(chosen) < 200):
        foreground = fg_images[i] if fg_images is not None else source.image(i)
        if resolution is not None:  # as the trainer will see it
            foreground = data.crop_to_square(foreground, resolution)
        caption = fg_captions[i] if fg_captions is not None else release.captions[i]
        templated = insert(foreground, template_for(foreground))
        if templated.size != foreground.size:  # a template of another size: keep the dataset's resolution
            templated = templated.resize(foreground.size, Image.Resampling.LANCZOS)
        if mode == "replace":
            release.pairs.append((foreground, templated))
            release.images[i], release.captions[i] = templated, triggers.apply_trigger(caption, trigger, placement)
            release.altered.append(release.file_names[i])
        else:
            name = _added_name(templated, set(release.file_names))
            release.images.append(templated)
            release.captions.append(triggers.apply_trigger(caption, trigger, placement))
            release.file_names.append(name)
            release.extras.append({})
            release.altered.append(name)
    release.template = next(iter(by_size.values()))  # all of them for one-size data
    return release


def _key_payload(release: _Release, trigger: str, placement: str, mode: str, seed: int, n: int,
                 source: data.CaptionedDataset, priors: Sequence[OwnerKey], out: Path) -> dict:
    """What the owner key records (hashed into ``key_sha256``; the released files' SHA-256 are added on writing)."""
    altered = set(release.altered)
    return {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "template": template_json(release.template),
        "trigger": trigger,
        "placement": placement,
        "mode": mode,
        "seed": int(seed),
        "rate": n / len(release.images),
        "n_images": len(release.images),
        "files": release.altered,
        "captions": {name: c for name, c in zip(release.file_names, release.captions) if name in altered},
        "source": str(Path(source.root).resolve()),
        "release": str(Path(out).resolve()),
        "prior_keys": [key.key_sha256 for key in priors],
        "nonce": secrets.token_hex(32),  # the commitment (this key's hash) reveals nothing of the key
    }


def _checked_source(dataset, out: Path, key_dir: Path, overwrite: bool,
                    resolution: int | None) -> tuple[data.CaptionedDataset, list[str]]:
    """The source dataset and its unlisted images, after every check that can fail before any work is done, and
    after finishing or undoing an interrupted earlier protect of the same folders."""
    source = dataset if isinstance(dataset, data.CaptionedDataset) else data.load_imagefolder(dataset)
    _check_folders(Path(source.root), out, key_dir)
    recovered = recover_release(out, key_dir)  # an interrupted protect of these folders: finished or undone first
    for note in recovered:
        warnings.warn(note, stacklevel=3)
    _check_existing(out, key_dir, overwrite, recovered)
    _check_images(source, resolution)
    unlisted = data.unlisted_images(source)
    if unlisted:
        warnings.warn(f"{len(unlisted)} image(s) in {source.root} are not listed in its {data.METADATA} and are left "
                      f"out of the release: {', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}",
                      stacklevel=3)
    return source, unlisted


def protect(dataset: data.CaptionedDataset | str | os.PathLike, template: Template | str | os.PathLike,
            out: str | os.PathLike, key_dir: str | os.PathLike, rate: float | None = None, count: int | None = None,
            mode: str = "replace", foregrounds=None, foreground_captions: Sequence[str] | None = None,
            trigger: str = "auto", placement: str = "prefix", seed: int | None = None, overwrite: bool = False,
            prior_keys: Sequence[OwnerKey | str | os.PathLike] = (), tokenizer=None,
            resolution: int | None = None) -> ProtectionReport:
    """Write a protected copy of ``dataset`` to ``out`` and its owner key to ``key_dir``.

    ``template``: a family name (a secret draw of one member, which the audit's decoy test needs; the default
    family is ``families.DEFAULT_FAMILY``), ``"<family>:<seed>"``, a Template, a built-in name (drawn at each image's size,
    no decoy test) or a saved template folder.
    Give exactly one of ``rate`` (templated / released) or ``count``. ``foregrounds`` ("add" only): a folder,
    a list of images (captions from ``foreground_captions``) or None for the dataset's own images (their
    captions are reused). ``prior_keys``: keys that already protect ``dataset``; their files are not
    picked and the new trigger cannot overlap theirs. ``seed`` draws the templated files and an ``"auto"``
    trigger; None (default) is a secret draw. Pass one only to reproduce a release: with a known seed anyone
    holding the dataset can recompute the trigger and the templated files. The key records it either way.
    ``resolution``: the training resolution; each picked image is first resized and centre-cropped to it as a
    trainer would (so the trainer's crop cannot cut the template off) and templated at that size. Needed for
    images over ``MAX_NATIVE_SIDE`` px; None templates each image at its own size. The source is never modified.
    """
    _check_arguments(mode, placement, foregrounds, seed)
    out, key_dir = Path(out), Path(key_dir)
    source, unlisted = _checked_source(dataset, out, key_dir, overwrite, resolution)
    if seed is None:
        seed = secrets.randbits(31)
    priors = [k if isinstance(k, OwnerKey) else load_key(k) for k in prior_keys]
    eligible = _eligible(source, priors)  # also refuses a prior key of another dataset

    n = count_for(len(source), rate=rate, count=count, mode=mode)
    if mode == "add" and foregrounds is not None:
        fg_images, fg_captions = _foreground_source(foregrounds, foreground_captions)
        eligible = list(range(len(fg_images)))
    else:
        fg_images, fg_captions = None, None
    chosen = choose(eligible, n, seed)
    trigger = _pick_trigger(trigger, list(source.captions) + list(fg_captions or []), seed, tokenizer,
                            [key.trigger for key in priors])
    if isinstance(template, str) and template in FAMILIES:  # one secret member, then drawn at each image's size
        template = f"{template}:{secrets.randbits(31)}"
    release = _templated_release(source, chosen, template, trigger, placement, mode, fg_images, fg_captions,
                                 resolution)
    change = mean_stats(release.pairs) if mode == "replace" else None

    payload = _key_payload(release, trigger, placement, mode, seed, n, source, priors, out) | {"resolution": resolution}
    write_release(release, _extra_files(source), out, key_dir, payload, overwrite)
    return ProtectionReport(
        n_images=len(release.images), n_altered=n, rate=n / len(release.images), trigger=trigger,
        template=release.template.name, placement=placement, mode=mode, seed=int(seed), n_source=len(source),
        mean_pixel_change=None if change is None else change["mean_abs_change"],
        psnr_db=None if change is None else change["psnr_db"], altered_files=release.altered, out=out,
        key_dir=key_dir, key_sha256=load_key(key_dir).key_sha256, prior_keys=[key.key_sha256 for key in priors],
        unlisted_images=unlisted,
    )
