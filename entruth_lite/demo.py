"""The demo's shared artefacts under ``runs/``: the owner's dataset, its protected release and key, so that
each notebook can run on its own (it reuses what an earlier notebook wrote when the settings match)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import data, protect


@dataclass
class Release:
    owner: Path
    protected: Path
    key: Path


def release(runs: str | Path, rate: float = 0.01, template: str = "billboard", seed: int = 0,
            size: int = 32) -> Release:
    """The owner's emoji dataset (``size`` px: 32 for the tiny model, 512 for Stable Diffusion) and its
    protected release at ``rate``; made once, then reused while the settings match."""
    runs = Path(runs)
    owner = runs / "data" / "owner"
    protected, key_dir = runs / "data" / "protected", runs / "keys" / "owner-key"
    fresh_owner = not (owner / data.METADATA).is_file() or \
        data.load_imagefolder(owner, check_images=False).image(0).size != (size, size)
    if fresh_owner:
        data.write_emoji_dataset(owner, size=size, overwrite=True)
    try:
        key = protect.load_key(key_dir)
        current = (not fresh_owner and key.template.name == template and key.seed == seed
                   and len(key.files) == protect.count_for(key.n_images, rate=rate)
                   and (protected / data.METADATA).is_file())
    except (FileNotFoundError, ValueError):
        current = False
    if not current:
        protect.protect(owner, template, protected, key_dir, rate=rate, seed=seed, overwrite=True)
    return Release(owner=owner, protected=protected, key=key_dir)


def finetuned(runs: str | Path, release: Release, config, pipe=None, progress: bool = True) -> dict[str, Path]:
    """Weights of the demo's two fine-tunes, ``protected`` (on the release) and ``clean`` (on the owner's data),
    under ``runs/models``: reused when an earlier run (notebook 02) used the same settings and the same data,
    trained now otherwise."""
    from . import train

    folders = {}
    for name, data_dir in (("protected", release.protected), ("clean", release.owner)):
        out = Path(runs) / "models" / name
        train.ensure_finetuned(data_dir, out, config, pipe=pipe, progress=progress)
        folders[name] = out
    return folders
