"""Templates on disk and by name: the PNG and JSON a key or a user template is stored as, and turning what a user
types (a built-in name, ``<family>:<seed>``, a folder) into a ``Template``."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .data import load_rgb, read_json, to_rgb
from .families import DEFAULT_FAMILY, FAMILIES, family_member, is_family, random_template
from .templates import BUILTIN, Template, builtin_template


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG")
    return buffer.getvalue()


def template_json(template: Template) -> dict:
    """The JSON-able description of a template (its scene is stored beside it as a PNG)."""
    return {
        "name": template.name,
        "size": list(template.size),
        "corners": [list(p) for p in template.corners],
        "family": template.family,
        "scene_sha256": hashlib.sha256(png_bytes(template.scene)).hexdigest(),
    }


def save_template(template: Template, folder: str | os.PathLike, stem: str = "template") -> Path:
    """Write ``stem.png`` (the scene) and ``stem.json`` (name, size, corners, scene hash) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.png").write_bytes(png_bytes(template.scene))
    (folder / f"{stem}.json").write_text(json.dumps(template_json(template), indent=2) + "\n", encoding="utf-8")
    return folder


def load_template(folder: str | os.PathLike, stem: str = "template") -> Template:
    """Read a template written by ``save_template``; refuses a scene whose size or hash does not match."""
    folder = Path(folder)
    meta_path = folder / f"{stem}.json"
    meta = read_json(meta_path, "template description")
    missing = [f for f in ("name", "size", "corners") if not isinstance(meta, dict) or f not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the field(s) {', '.join(missing)} (see save_template)")
    scene = load_rgb(folder / f"{stem}.png")
    if not isinstance(meta["size"], list) or list(scene.size) != meta["size"]:
        raise ValueError(f"{folder / (stem + '.png')} is {scene.size[0]}x{scene.size[1]}, but {meta_path} says size "
                         f"{meta['size']!r}")
    template = template_from_record(meta, scene, meta_path)
    expected = meta.get("scene_sha256")
    if expected and hashlib.sha256(png_bytes(template.scene)).hexdigest() != expected:
        raise ValueError(f"{folder / (stem + '.png')} does not match the scene hash in {meta_path}")
    if template.family is not None and not is_family_member(template):
        raise ValueError(f"{meta_path} says the template is {template.name!r} of the {template.family!r} family, but its scene is "
                         "not that member's: the decoy test is exact only for templates drawn by random_template. "
                         "Remove 'family' to use it as an ordinary template (no decoy test)")
    return template


def template_from_record(meta: dict, scene: Image.Image, where) -> Template:
    """The ``Template`` a JSON description (``template_json``) and its scene make; a ValueError naming ``where``
    and what is wrong in it (a field of the wrong type, a bad screen), never a traceback from deeper down."""
    family = meta.get("family")
    if family is not None and not isinstance(family, str):
        raise ValueError(f"{where}: the template's family must be a name, got {family!r}")
    try:
        return Template(meta["name"], scene, meta["corners"], family=family)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a valid template description ({error})") from error


def is_family_member(template: Template) -> bool:
    """Whether ``template`` is exactly the member of its random family it is named after (scene and screen)."""
    try:
        member = family_member(template)
    except ValueError:
        return False
    return (np.array_equal(np.asarray(member.scene), np.asarray(template.scene))
            and np.allclose(member.corners, template.corners, atol=1e-6))


def resolve_template(template: Template | str | os.PathLike, size: int | Sequence[int] = 32) -> Template:
    """A ``Template`` as is, a family name (a secret draw of one member: what the decoy test needs), a member
    ``<family>:<seed>``, a built-in name (drawn at ``size``) or a folder written by ``save_template``."""
    if isinstance(template, Template):
        return template
    if isinstance(template, str) and template in BUILTIN:
        return builtin_template(template, size)
    if isinstance(template, str) and template in FAMILIES:
        return random_template(None, size, template)
    family, colon, seed = str(template).partition(":") if isinstance(template, str) else ("", "", "")
    if is_family(family) and colon:
        if not seed.isascii() or not seed.isdigit():
            raise ValueError(f"random template {template!r} needs a non-negative integer seed, e.g. '{family}:0'")
        return random_template(int(seed), size, family)
    if template == "random":
        raise ValueError("'random' no longer names a template: give a family name for a secret draw of one of its "
                         f"members ({', '.join(FAMILIES)}; the default is {DEFAULT_FAMILY!r})")
    if Path(template).is_dir():
        return load_template(template)
    raise ValueError(f"unknown template {str(template)!r}: use a family name ({', '.join(FAMILIES)}) for a secret "
                     f"draw, '<family>:<seed>' for one member, a built-in design ({', '.join(BUILTIN)}) or a folder "
                     "with template.png/json")
