"""The demo's shared artefacts under ``runs/``: the owner's dataset, its protected release and key, so that
each notebook can run on its own (it reuses what an earlier notebook wrote when the settings match)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import data, protect


@dataclass
class Release:
    owner: Path
    protected: Path
    key: Path


def release_folders(runs: str | Path, size: int = 32) -> Release:
    """Where the demo keeps the owner's data, its release and the key: one set per resolution, so tiny and
    Stable Diffusion runs never overwrite each other."""
    runs = Path(runs)
    return Release(owner=runs / "data" / f"{size}px" / "owner", protected=runs / "data" / f"{size}px" / "protected",
                   key=runs / "keys" / f"{size}px" / "owner-key")


def release(runs: str | Path, rate: float = 0.01, template: str = "billboard", seed: int = 0,
            size: int = 32) -> Release:
    """The owner's emoji dataset (``size`` px: 32 for the tiny model, 512 for Stable Diffusion) and its
    protected release at ``rate``; made once, then reused while the settings match."""
    folders = release_folders(runs, size)
    owner, protected, key_dir = folders.owner, folders.protected, folders.key
    fresh_owner = not (owner / data.METADATA).is_file() or \
        data.load_imagefolder(owner, check_images=False).image(0).size != (size, size)
    if fresh_owner:
        data.write_emoji_dataset(owner, size=size, overwrite=True)
    try:
        key = protect.load_key(key_dir, release=protected)  # also: the release committed to this key
        current = (not fresh_owner and key.template.name == template and key.seed == seed
                   and len(key.files) == protect.count_for(key.n_images, rate=rate)
                   and (protected / data.METADATA).is_file())
    except (FileNotFoundError, ValueError):
        current = False
    if not current:
        protect.protect(owner, template, protected, key_dir, rate=rate, seed=seed, overwrite=True)
    return folders


def model_folder(runs: str | Path, name: str, config, data_dir: str | Path) -> Path:
    """``runs/models/<name>-<model>-<hash of the settings and data>``: a run with other settings, another base
    model or other data gets its own folder, so a finished fine-tune (hours on a small GPU) is never overwritten."""
    from . import train

    digest = hashlib.sha256(f"{config.fingerprint()}|{train.dataset_fingerprint(data_dir)}".encode()).hexdigest()
    return Path(runs) / "models" / f"{name}-{Path(str(config.model)).name}-{digest[:10]}"


def finetuned(runs: str | Path, release: Release, config, pipe=None, progress: bool = True) -> dict[str, Path]:
    """Weights of the demo's two fine-tunes, ``protected`` (on the release) and ``clean`` (on the owner's data):
    reused when an earlier run (notebook 02) finished them, resumed from a checkpoint when one was interrupted,
    trained now otherwise."""
    from . import train

    folders = {}
    for name, data_dir in (("protected", release.protected), ("clean", release.owner)):
        folders[name] = model_folder(runs, name, config, data_dir)
        train.ensure_finetuned(data_dir, folders[name], config, pipe=pipe, progress=progress)
    return folders
