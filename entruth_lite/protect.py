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
import json
import math
import os
import secrets
import shutil
import string
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from . import data
from .templates import DEFAULT_FAMILY, Template, insert, png_bytes, resolve_template, template_json

KEY_FORMAT = "entruth-lite-owner-key"
KEY_VERSION = 2  # 2: a random nonce, and the release carries a commitment to the key
READABLE_KEY_VERSIONS = (1, 2)
KEY_FILE = "key.json"
KEY_TEMPLATE = "template.png"
COMMITMENT_FILE = "entruth-commitment.json"  # in the release: the key's hash, published with the data
COMMITMENT_FORMAT = "entruth-lite-key-commitment"
PLACEMENTS = ("prefix", "suffix")
MODES = ("replace", "add")
MAX_NATIVE_SIDE = 1024  # larger images are templated at a given training resolution, never at native size
DEFAULT_CAPTION = "a picture"  # caption for added foregrounds that come without one
TRIGGER_TRIES = 10_000
# letters of an "auto" trigger. A longer trigger splits into more tokens and changes more of the caption's encoding;
# on the same releases, 6-letter triggers were memorized on more seeds than 3-letter ones (benchmarks/results,
# "Memorization")
TRIGGER_LENGTH = 6


class KeyTamperedError(ValueError):
    """An owner key whose content no longer matches its recorded hash."""


class KeyMismatchError(ValueError):
    """An owner key that is not the one the release committed to (another key, an edited one, or an interrupted
    ``protect``)."""


# ----------------------------------------------------------------------------- triggers


def _overlaps(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


def check_trigger(trigger: str, captions: Sequence[str], avoid: Sequence[str] = ()) -> str:
    """Refuse a trigger that is empty, spans lines, occurs in a caption (case-insensitive, also inside a
    word) or overlaps a trigger in ``avoid``; returns it stripped."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueError("the trigger must be a non-empty string")
    trigger = trigger.strip()
    if any(c in trigger for c in "\n\r\t"):
        raise ValueError(f"the trigger {trigger!r} must be on one line")
    needle = trigger.lower()
    for i, caption in enumerate(captions):
        if needle in caption.lower():
            raise ValueError(
                f"trigger {trigger!r} already occurs in caption {i} ({caption!r}); choose another trigger or use 'auto'"
            )
    for other in avoid:
        if _overlaps(trigger, other):
            raise ValueError(f"trigger {trigger!r} overlaps the existing trigger {other!r} of an earlier key")
    return trigger


def generate_trigger(
    captions: Sequence[str],
    length: int = TRIGGER_LENGTH,
    seed: int = 0,
    tokenizer=None,
    avoid: Sequence[str] = (),
) -> str:
    """A random lowercase word of ``length`` letters that occurs in no caption (not even inside a word)
    and does not overlap any trigger in ``avoid``; the same seed gives the same word.

    With a ``tokenizer``, words it holds as one whole token are skipped too: those are words the text
    encoder may already know, and a trigger should carry no meaning of its own.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"trigger length must be a positive integer, got {length!r}")
    corpus = "\n".join(c.lower() for c in captions)
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    for _ in range(TRIGGER_TRIES):
        candidate = "".join(rng.choice(letters, length))
        if candidate in corpus or any(_overlaps(candidate, other) for other in avoid):
            continue
        if tokenizer is not None and len(trigger_tokens(candidate, tokenizer)) == 1:
            continue
        return candidate
    raise ValueError(f"found no {length}-letter trigger absent from the captions in {TRIGGER_TRIES} tries; use a longer one")


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tiny model's ``CLIPTokenizer`` (or one saved at ``path``)."""
    from transformers import CLIPTokenizer

    from .models import TINY_MODEL_DIR

    path = Path(path) if path is not None else TINY_MODEL_DIR / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; build the tiny model with `entruth-lite zoo build-tiny`")
    return CLIPTokenizer.from_pretrained(path)


def trigger_tokens(trigger: str, tokenizer=None) -> list[str]:
    """How ``tokenizer`` (default: the tiny model's) splits the trigger, e.g. ``['x', 'qz</w>']``."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    return list(tokenizer.tokenize(trigger))


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether the caption still holds the trigger: case-insensitive, anywhere (``check_trigger``'s rule, so a
    multi-word trigger counts too)."""
    return trigger.strip().lower() in caption.lower()


def apply_trigger(caption: str, trigger: str, placement: str = "prefix") -> str:
    """The caption with the trigger word before (``prefix``) or after (``suffix``) it."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown trigger placement {placement!r}: use 'prefix' or 'suffix'")
    caption = caption.strip()
    return f"{trigger} {caption}" if placement == "prefix" else f"{caption} {trigger}"


# ----------------------------------------------------------------------------- how many, which


def count_for(n_source: int, rate: float | None = None, count: int | None = None, mode: str = "replace") -> int:
    """How many images to template so that templated / released is ``rate`` (rounded), or ``count``.

    "replace" releases ``n_source`` images, so n = round(rate * n_source); "add" releases n_source + n,
    so n = round(rate * n_source / (1 - rate)).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'replace' or 'add'")
    if (rate is None) == (count is None):
        raise ValueError("give exactly one of rate or count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        return int(count)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    if mode == "add" and rate >= 1:
        raise ValueError("rate must be below 1 in 'add' mode (the originals stay in the dataset)")
    n = round(rate * n_source) if mode == "replace" else round(rate * n_source / (1 - rate))
    if n < 1:
        raise ValueError(
            f"rate {rate} of {n_source} images rounds to 0 templated images; use a higher rate or count >= 1"
        )
    return int(n)


def choose(eligible: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` distinct items of ``eligible``, seeded, in ascending order."""
    if n > len(eligible):
        raise ValueError(f"asked to template {n} images but only {len(eligible)} can be chosen")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(np.asarray(eligible, dtype=int), size=n, replace=False))


# ----------------------------------------------------------------------------- how much it alters


def change_stats(original: Image.Image, altered: Image.Image) -> dict[str, float]:
    """Mean absolute pixel change (0-255), PSNR (dB, 255 peak) and share of changed pixels.
    ``original`` is resized to ``altered``'s size when they differ."""
    original = data.to_rgb(original)
    if original.size != altered.size:
        original = original.resize(altered.size, Image.Resampling.LANCZOS)
    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(data.to_rgb(altered), dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {
        "mean_abs_change": float(np.mean(np.abs(a - b))),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        "changed_share": float(np.mean(np.any(a != b, axis=-1))),
    }


def mean_stats(pairs: Sequence[tuple[Image.Image, Image.Image]]) -> dict[str, float]:
    """``change_stats`` averaged over (original, altered) pairs (PSNR averaged over finite values)."""
    stats = [change_stats(o, a) for o, a in pairs]
    if not stats:
        return {"mean_abs_change": 0.0, "psnr_db": float("inf"), "changed_share": 0.0}
    psnrs = [s["psnr_db"] for s in stats if math.isfinite(s["psnr_db"])]
    return {
        "mean_abs_change": float(np.mean([s["mean_abs_change"] for s in stats])),
        "psnr_db": float(np.mean(psnrs)) if psnrs else float("inf"),
        "changed_share": float(np.mean([s["changed_share"] for s in stats])),
    }


# ----------------------------------------------------------------------------- preview (for the widget)


def preview(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    template_name: str = "billboard",
    rate: float = 0.01,
    placement: str = "prefix",
    seed: int = 0,
    show: int = 8,
) -> tuple[Image.Image, dict]:
    """What ``protect(mode="replace")`` would do, in memory: a grid (originals on top, templated below) of
    up to ``show`` chosen images, and stats. Always templates at least one image so there is something to
    see; ``stats["rate"]`` is the exact share."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"need the same positive number of images and captions, got {len(images)} and {len(captions)}")
    n = max(1, round(rate * len(images))) if 0 < rate <= 1 else count_for(len(images), rate=rate)
    chosen = choose(range(len(images)), n, seed)
    template = resolve_template(template_name, images[chosen[0]].size)
    trigger = generate_trigger(captions, seed=seed)
    originals = [images[i] for i in chosen]
    altered = insert(originals, template)
    shown = min(show, n)
    grid = data.image_grid(originals[:shown] + altered[:shown], cols=shown)
    change = mean_stats(list(zip(originals, altered)))
    stats = {
        "template": template.name,
        "n_images": len(images),
        "n_altered": n,
        "rate": n / len(images),
        "trigger": trigger,
        "placement": placement,
        "example_caption": apply_trigger(captions[chosen[0]], trigger, placement),
        "mean_pixel_change": change["mean_abs_change"],
        "psnr_db": change["psnr_db"],
        "surround_share": 1 - template.screen_area,
    }
    return grid, stats


# ----------------------------------------------------------------------------- owner key


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_hash(payload: dict) -> str:
    """SHA-256 of the key's canonical JSON, without its own ``key_sha256`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in payload.items() if k != "key_sha256"})).hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class OwnerKey:
    """What the owner keeps secret: the template, the trigger and which released files carry them."""

    root: Path
    template: Template
    trigger: str
    placement: str
    mode: str
    seed: int
    rate: float
    n_images: int
    files: list[str]
    file_sha256: dict[str, str]
    captions: dict[str, str]
    source: str | None
    prior_keys: list[str]
    key_sha256: str
    release: str | None = None  # where protect wrote the release (version 2 keys)
    resolution: int | None = None  # the training resolution templated images were made at (None: each its own size)


KEY_FIELDS = ("template", "trigger", "placement", "mode", "seed", "rate", "n_images", "files", "file_sha256", "captions",
              "key_sha256")
TEMPLATE_FIELDS = ("name", "corners", "scene_sha256")


def load_key(key_dir: str | os.PathLike, release: str | os.PathLike | None = None) -> OwnerKey:
    """Read an owner key and verify it: the JSON against ``key_sha256`` and ``template.png`` against the
    scene hash recorded in the JSON (an edit of either raises ``KeyTamperedError``); with ``release``, also
    that the release committed to exactly this key (``check_commitment``).

    The hash alone is no seal: whoever edits the key can recompute it. What makes a key evidence is the
    commitment the release carries, published with the data before any dispute."""
    key_dir = Path(key_dir)
    key_path = key_dir / KEY_FILE
    payload = data.read_json(key_path, "owner key", KeyTamperedError)
    if not isinstance(payload, dict) or payload.get("format") != KEY_FORMAT:
        raise ValueError(f"{key_path} is not an entruth-lite owner key")
    if payload.get("version") not in READABLE_KEY_VERSIONS:
        raise ValueError(f"{key_path} has key version {payload.get('version')!r}; this code reads versions "
                         f"{', '.join(map(str, READABLE_KEY_VERSIONS))}")
    missing = [f for f in KEY_FIELDS if f not in payload]
    missing += [f"template.{f}" for f in TEMPLATE_FIELDS if f not in payload.get("template", {})]
    if missing:
        raise ValueError(f"{key_path} lacks the field(s) {', '.join(missing)}: it is not a complete owner key")
    if payload.get("key_sha256") != key_hash(payload):
        raise KeyTamperedError(f"{key_path} has been modified: its content does not match key_sha256")
    scene = data.load_rgb(key_dir / KEY_TEMPLATE)
    meta = payload["template"]
    if hashlib.sha256(png_bytes(scene)).hexdigest() != meta["scene_sha256"]:
        raise KeyTamperedError(f"{key_dir / KEY_TEMPLATE} does not match the template recorded in {key_path}")
    template = Template(meta["name"], scene, [tuple(p) for p in meta["corners"]], family=meta.get("family"))
    key = OwnerKey(
        root=key_dir,
        template=template,
        trigger=payload["trigger"],
        placement=payload["placement"],
        mode=payload["mode"],
        seed=payload["seed"],
        rate=payload["rate"],
        n_images=payload["n_images"],
        files=list(payload["files"]),
        file_sha256=dict(payload["file_sha256"]),
        captions=dict(payload["captions"]),
        source=payload.get("source"),
        prior_keys=list(payload.get("prior_keys", [])),
        key_sha256=payload["key_sha256"],
        release=payload.get("release"),
        resolution=payload.get("resolution"),
    )
    if release is not None:
        check_commitment(key, release)
    return key


def release_commitment(release: str | os.PathLike) -> str | None:
    """The key hash a release committed to, or None for a release without a commitment file."""
    path = Path(release) / COMMITMENT_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != COMMITMENT_FORMAT:
            raise ValueError("wrong format")
        return str(payload["key_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise KeyMismatchError(f"{path} is not a valid key commitment ({error})") from error


def check_commitment(key: OwnerKey, release: str | os.PathLike) -> None:
    """Raise ``KeyMismatchError`` unless ``release`` committed to ``key`` (its ``entruth-commitment.json``
    holds the key's hash). A release made before commitments existed cannot be checked, and says so."""
    committed = release_commitment(release)
    if committed is None:
        raise KeyMismatchError(f"{release} carries no {COMMITMENT_FILE}: it is not a release made by protect, or "
                               "predates key commitments, so nothing ties it to the key")
    if committed != key.key_sha256:
        leftovers = data.staged_siblings(key.root, "tmp") + data.staged_siblings(Path(release), "old")
        hint = (f"; an interrupted protect left {', '.join(p.name for p in leftovers)}: run the same protect "
                "command again to finish it") if leftovers else ""
        raise KeyMismatchError(f"the key {key.root} (sha256 {key.key_sha256[:12]}...) is not the key the release "
                               f"{release} committed to ({committed[:12]}...){hint}")


def _write_key(tmp: Path, payload: dict, template: Template) -> str:
    payload = dict(payload, key_sha256=key_hash(payload))
    (tmp / KEY_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (tmp / KEY_TEMPLATE).write_bytes(png_bytes(template.scene))
    return payload["key_sha256"]


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
        if p.is_file() and p.name not in (data.METADATA, COMMITMENT_FILE) and p.name not in listed
        and p.suffix.lower() not in data.IMAGE_SUFFIXES
    }


def _check_folders(root: Path, out: Path, key_dir: Path, overwrite: bool) -> None:
    """Refuse outputs that overlap the source or each other, and existing ones (unless ``overwrite``),
    before any work is done."""
    for what, path in (("out", out), ("key_dir", key_dir)):
        if root.is_dir() and (_inside(path, root) or _inside(root, path)):
            raise ValueError(f"{what} {path} overlaps the source dataset {root}, which is never modified")
    if _inside(key_dir, out) or _inside(out, key_dir):
        raise ValueError(f"the owner key {key_dir} must be kept apart from the released dataset {out}")
    for path in (out, key_dir):
        data.check_writable_parent(path)
    for path in (out, key_dir):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose a new folder or pass overwrite=True")


def _eligible(source: data.CaptionedDataset, priors: Sequence[OwnerKey]) -> list[int]:
    """Indices a new key may template: not a file of an earlier key, no earlier trigger in the caption.
    Refuses a prior key whose files are missing or lack its trigger (a key of another dataset)."""
    row = dict(zip(source.file_names, source.captions))
    for key in priors:
        for name in key.files:
            if name not in row:
                raise ValueError(f"the key {key.root} does not belong to this dataset: {name!r} is not in it")
            if not has_trigger(row[name], key.trigger):
                raise ValueError(
                    f"the key {key.root} does not belong to this dataset: the caption of {name!r} lacks its trigger"
                )
    taken = {f for key in priors for f in key.files}
    return [
        i for i, r in enumerate(source.records)
        if r.file_name not in taken and not any(has_trigger(r.text, key.trigger) for key in priors)
    ]


def _write_release(release: "_Release", extra_files: dict[str, bytes], out: Path, key_dir: Path, payload: dict,
                   overwrite: bool) -> None:
    """Write the release and its key as a pair that appears together or not at all.

    Both are built in full under temporary names first (the release with a commitment to the key's hash), then
    renamed into place, release first and key last: the key's rename is the commit point. A previous pair is
    set aside, not deleted, until the new key is in place. A kill at any moment leaves a state that
    ``recover_release`` (run by the next ``protect`` of the same folders) finishes or undoes, and that a reader
    detects meanwhile (``check_commitment``)."""
    out_tmp = data.atomic_folder(out, overwrite)
    key_tmp = data.atomic_folder(key_dir, overwrite, private=True)
    try:
        data.check_rows(release.images, release.captions, release.file_names)
        data.write_imagefolder(out_tmp, release.images, release.captions, release.file_names, release.extras,
                               extra_files)
        payload = dict(payload, file_sha256={name: sha256_file(out_tmp / name) for name in payload["files"]})
        key_sha256 = _write_key(key_tmp, payload, release.template)
        (out_tmp / COMMITMENT_FILE).write_text(json.dumps(
            {"format": COMMITMENT_FORMAT, "key_sha256": key_sha256}, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(out_tmp, ignore_errors=True)
        shutil.rmtree(key_tmp, ignore_errors=True)
        raise
    data.commit_folder(out_tmp, out)
    old_key = data.set_aside(key_dir)
    os.replace(key_tmp, key_dir)  # the commit point
    if old_key is not None:
        shutil.rmtree(old_key)


def recover_release(out: str | os.PathLike, key_dir: str | os.PathLike) -> list[str]:
    """Finish or undo an interrupted ``protect`` of ``out`` and ``key_dir``, and say what was done. A staged key
    that the release in place committed to is moved in (the pair was complete but for the last rename);
    then half-built folders are deleted and set-aside previous versions restored where the new one never
    arrived (``data.recover_folder``). Nothing else is touched."""
    out, key_dir, notes = Path(out), Path(key_dir), []
    committed = release_commitment(out) if out.is_dir() else None
    for staged in data.staged_siblings(key_dir, "tmp"):
        try:
            if committed is not None and load_key(staged).key_sha256 == committed:
                old_key = data.set_aside(key_dir)
                os.replace(staged, key_dir)
                if old_key is not None:
                    shutil.rmtree(old_key)
                notes.append(f"finished an interrupted protect: moved its key into {key_dir}")
        except (OSError, ValueError):
            continue  # a half-written key: recover_folder deletes it
    return notes + data.recover_folder(out) + data.recover_folder(key_dir)


def _check_arguments(mode: str, placement: str, foregrounds, seed: int | None) -> None:
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'replace' or 'add'")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown trigger placement {placement!r}: use 'prefix' or 'suffix'")
    if foregrounds is not None and mode != "add":
        raise ValueError("foregrounds are only used in 'add' mode")


def _check_images(source: data.CaptionedDataset, resolution: int | None) -> None:
    """Refuse, before anything is drawn, images that could not be templated if picked: the pick is secret, so a
    bad file must not fail only on some seeds."""
    from .templates import MIN_SIZE

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


def _pick_trigger(trigger: str, captions: Sequence[str], seed: int, tokenizer, avoid: Sequence[str]) -> str:
    """``"auto"``: a fresh trigger drawn from ``seed``; otherwise the caller's, checked against every caption."""
    if trigger == "auto":
        return generate_trigger(captions, seed=seed, tokenizer=tokenizer, avoid=avoid)
    return check_trigger(trigger, captions, avoid=avoid)


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
    from tqdm.auto import tqdm

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
            release.images[i], release.captions[i] = templated, apply_trigger(caption, trigger, placement)
            release.altered.append(release.file_names[i])
        else:
            name = _added_name(templated, set(release.file_names))
            release.images.append(templated)
            release.captions.append(apply_trigger(caption, trigger, placement))
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


def protect(
    dataset: data.CaptionedDataset | str | os.PathLike,
    template: Template | str | os.PathLike,
    out: str | os.PathLike,
    key_dir: str | os.PathLike,
    rate: float | None = None,
    count: int | None = None,
    mode: str = "replace",
    foregrounds=None,
    foreground_captions: Sequence[str] | None = None,
    trigger: str = "auto",
    placement: str = "prefix",
    seed: int | None = None,
    overwrite: bool = False,
    prior_keys: Sequence[OwnerKey | str | os.PathLike] = (),
    tokenizer=None,
    resolution: int | None = None,
) -> ProtectionReport:
    """Write a protected copy of ``dataset`` to ``out`` and its owner key to ``key_dir``.

    ``template``: a Template, a built-in name (drawn at each image's size), ``"random"`` (a secret draw from the
    default random family, which the audit's decoy test needs), ``"<family>:<seed>"`` or a saved template folder.
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
    source = dataset if isinstance(dataset, data.CaptionedDataset) else data.load_imagefolder(dataset)
    out, key_dir = Path(out), Path(key_dir)
    _check_folders(Path(source.root), out, key_dir, overwrite)
    _check_images(source, resolution)
    recover_release(out, key_dir)
    unlisted = data.unlisted_images(source)
    if unlisted:
        warnings.warn(f"{len(unlisted)} image(s) in {source.root} are not listed in its {data.METADATA} and are left "
                      f"out of the release: {', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}",
                      stacklevel=2)
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
    if template == "random":  # one secret draw from the default family, then drawn at each image's size
        template = f"{DEFAULT_FAMILY}:{secrets.randbits(31)}"
    release = _templated_release(source, chosen, template, trigger, placement, mode, fg_images, fg_captions,
                                 resolution)
    change = mean_stats(release.pairs) if mode == "replace" else None

    payload = _key_payload(release, trigger, placement, mode, seed, n, source, priors, out) | {"resolution": resolution}
    _write_release(release, _extra_files(source), out, key_dir, payload, overwrite)
    return ProtectionReport(
        n_images=len(release.images),
        n_altered=n,
        rate=n / len(release.images),
        trigger=trigger,
        template=release.template.name,
        placement=placement,
        mode=mode,
        seed=int(seed),
        n_source=len(source),
        mean_pixel_change=None if change is None else change["mean_abs_change"],
        psnr_db=None if change is None else change["psnr_db"],
        altered_files=release.altered,
        out=out,
        key_dir=key_dir,
        key_sha256=load_key(key_dir).key_sha256,
        prior_keys=[key.key_sha256 for key in priors],
        unlisted_images=unlisted,
    )
