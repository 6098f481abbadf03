"""What an audit records so that anyone can check and rerun it: the hashes of the model's files (or of a
service's saved images), the software and device the numbers depend on, what it says of the key, and how the
suspect was loaded (safetensors only)."""

from __future__ import annotations

import hashlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from ..core.models import TINY_MODEL_DIR, default_resolution, load_finetuned, load_pipeline

WEIGHT_FILES = (".safetensors", ".json", ".txt")
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".webp", ".jsonl")


def file_hashes(folder: str | os.PathLike | None, suffixes: Sequence[str] = WEIGHT_FILES) -> dict[str, str]:
    """SHA-256 of every file with one of ``suffixes`` under ``folder`` (relative name -> digest): weights and
    configs by default, or a service's saved images. A single file (a LoRA as sites publish it): its own digest."""
    if folder is not None and Path(folder).is_file():
        return {Path(folder).name: hashlib.sha256(Path(folder).read_bytes()).hexdigest()}
    if folder is None or not Path(folder).is_dir():
        return {}
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes}


LIBRARIES = ("torch", "diffusers", "transformers", "peft", "numpy", "safetensors", "Pillow")


def environment(pipe=None) -> dict:
    """What the numbers depend on beyond the record's settings: package and library versions, and the pipeline's
    device, dtype and image size (generation differs across devices and precisions, not across runs of one)."""
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    record = dict(entruth_lite=installed("entruth-lite"), python=platform.python_version(),
                  libraries={name: installed(name) for name in LIBRARIES})
    if pipe is not None:
        record |= dict(device=str(pipe.device), dtype=str(pipe.unet.dtype), resolution=default_resolution(pipe))
    return record


NOT_CHECKED = ("not checked: the key was not compared with a release's commitment, so an edited key would not be "
               "caught (pass the published release: release=, CLI --release)")


def key_record(key, release: str | os.PathLike | None = None) -> dict:
    """What the audit record says of the key: its hash (the decoys' salt), the template's name and size (a random
    family member is rebuilt from them), the trigger and its placement, and whether it was checked against the
    commitment of ``release``. Publishing it reveals the template."""
    commitment = f"checked against the commitment in the release {release}" if release is not None else NOT_CHECKED
    return dict(key_sha256=key.key_sha256, template=key.template.name, template_size=list(key.template.size),
                trigger=key.trigger, placement=key.placement, commitment=commitment)


def base_dir(model: str) -> Path | None:
    """Where the model's files are: the tiny model's folder, a local folder or checkpoint file, or a hub id's
    snapshot in the local cache (its folder is named by the revision's commit), else None."""
    if model == "tiny":
        return TINY_MODEL_DIR
    if Path(model).exists():
        return Path(model)
    # imported here, not at the top: the hub client, needed only for a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def load_suspect(model: str = "tiny", weights: str | os.PathLike | None = None, device: str | None = None,
                 config: str | os.PathLike | None = None):
    """A base pipeline (or a whole fine-tuned one: a folder, hub id or single-file checkpoint, ``config`` describing
    a checkpoint's architecture) plus the suspect's weights (LoRA or full fine-tune; safetensors only)."""
    pipe = load_pipeline(model, device=device, config=config)
    return load_finetuned(pipe, weights) if weights is not None else pipe


def model_info(model: str, weights: str | os.PathLike | None, config: str | os.PathLike | None = None) -> dict:
    """The audited model as the record names it: the base (name, file hashes, and the configs a single-file
    checkpoint was read with) and the suspect's weights (path, SHA-256 of each file), so a replay can check it loads
    the same files."""
    base = base_dir(model)
    revision = base.name if base is not None and base.parent.name == "snapshots" else None  # a hub snapshot's commit
    return dict(model=model, revision=revision, weights=str(weights) if weights else None,
                base_files=file_hashes(base), weight_files=file_hashes(weights), config=str(config) if config else None)
