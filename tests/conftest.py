"""Tests run offline: nothing may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib
from pathlib import Path

import pytest


def hash_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative name -> digest), to prove a folder was not touched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def fail_on_nth_save(monkeypatch, n: int) -> None:
    """Make the n-th PIL ``Image.save`` raise OSError('disk full'), to provoke a failure mid-write."""
    from PIL import Image

    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)


@pytest.fixture
def small_dataset(tmp_path):
    """A 12-image captioned imagefolder of flat colours."""
    from PIL import Image

    from entruth_lite import data

    images = [Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 100)) for i in range(12)]
    captions = [f"an emoji of a colour number {i}" for i in range(12)]
    return data.save_imagefolder(images, captions, tmp_path / "small")


def protected_suspect(root: Path, methods=("full",)) -> Path:
    """A protected emoji release (40 images, 4 templated with ``random:3``) and its key under ``root``, and a
    two-step fine-tune on it per method in ``root/<method>``: a suspect for audit and CLI tests."""
    from entruth_lite import data, protect, train

    images, captions, names = data.emoji_dataset("owner", limit=40)
    owner = data.save_imagefolder(images, captions, root / "owner", file_names=names)
    protect.protect(owner, "random:3", root / "protected", root / "key", count=4, seed=0)
    for method in methods:
        train.finetune(root / "protected", root / method, train.preset("tiny-cpu", steps=2, method=method),
                       progress=False)
    return root
