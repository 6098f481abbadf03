"""The owner key (template, trigger, which files) and the release's commitment to it; writing a release and its
key as one transaction, and finishing or undoing one that a crash interrupted.

The key stays private; the release carries a salted hash of it (``entruth-commitment.json``), published with the
data before any dispute, so an edited or substituted key is caught (``check_commitment``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core import data, files
from ..core.template_io import png_bytes, template_from_record
from ..core.templates import Template

KEY_FORMAT = "entruth-lite-owner-key"
KEY_VERSION = 2  # 2: a random nonce, and the release carries a commitment to the key
READABLE_KEY_VERSIONS = (1, 2)
KEY_FILE = "key.json"
KEY_TEMPLATE = "template.png"
COMMITMENT_FILE = "entruth-commitment.json"  # in the release: the key's hash, published with the data
COMMITMENT_FORMAT = "entruth-lite-key-commitment"
# what a release or a key of this tool holds (the marker; earlier versions' by their commitment or key file):
# overwrite replaces nothing else
RELEASE_MARKERS = (files.MARKER, COMMITMENT_FILE)
KEY_MARKERS = (files.MARKER, KEY_FILE)


class KeyTamperedError(ValueError):
    """An owner key whose content no longer matches its recorded hash."""


class KeyMismatchError(ValueError):
    """An owner key that is not the one the release committed to (another key, an edited one, or an interrupted
    ``protect``)."""


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
    template = template_from_record(meta, scene, key_path)
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
        leftovers = files.staged_siblings(key.root, "tmp") + files.staged_siblings(Path(release), "old")
        hint = (f"; an interrupted protect left {', '.join(p.name for p in leftovers)}: run the same protect "
                "command again to finish it") if leftovers else ""
        raise KeyMismatchError(f"the key {key.root} (sha256 {key.key_sha256[:12]}...) is not the key the release "
                               f"{release} committed to ({committed[:12]}...){hint}")


def _write_key(tmp: Path, payload: dict, template: Template) -> str:
    payload = dict(payload, key_sha256=key_hash(payload))
    (tmp / KEY_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (tmp / KEY_TEMPLATE).write_bytes(png_bytes(template.scene))
    return payload["key_sha256"]


def write_release(release, extra_files: dict[str, bytes], out: Path, key_dir: Path, payload: dict,
                   overwrite: bool) -> None:
    """Write the release and its key as a pair that appears together or not at all.

    Both are built in full under temporary names first (the release with a commitment to the key's hash), then
    renamed into place, release first and key last: the key's rename is the commit point. A previous pair is
    set aside, not deleted, until the new key is in place. A kill at any moment leaves a state that
    ``recover_release`` (run by the next ``protect`` of the same folders) finishes or undoes, and that a reader
    detects meanwhile (``check_commitment``)."""
    out_tmp = files.atomic_folder(out, overwrite, ours=RELEASE_MARKERS)
    key_tmp = files.atomic_folder(key_dir, overwrite, private=True, ours=KEY_MARKERS)
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
    files.commit_folder(out_tmp, out)
    old_key = files.set_aside(key_dir)
    os.replace(key_tmp, key_dir)  # the commit point
    if old_key is not None:
        shutil.rmtree(old_key)


def recover_release(out: str | os.PathLike, key_dir: str | os.PathLike) -> list[str]:
    """Finish or undo an interrupted ``protect`` of ``out`` and ``key_dir``, and say what was done. A staged key
    that the release in place committed to is moved in (the pair was complete but for the last rename);
    then half-built folders are deleted and set-aside previous versions restored where the new one never
    arrived (``files.recover_folder``). Nothing else is touched."""
    out, key_dir, notes = Path(out), Path(key_dir), []
    committed = release_commitment(out) if out.is_dir() else None
    for staged in files.staged_siblings(key_dir, "tmp"):
        try:
            if committed is not None and load_key(staged).key_sha256 == committed:
                old_key = files.set_aside(key_dir)
                os.replace(staged, key_dir)
                if old_key is not None:
                    shutil.rmtree(old_key)
                notes.append(f"finished an interrupted protect: moved its key into {key_dir}")
        except (OSError, ValueError):
            continue  # a half-written key: recover_folder deletes it
    return notes + files.recover_folder(out) + files.recover_folder(key_dir)
