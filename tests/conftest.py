"""Tests run offline: nothing may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    # tests side by side (pytest -n N): one math thread each, and each notebook kernel or subprocess it starts,
    # or N workers' thread pools fight over the cores
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import hashlib
from pathlib import Path

import pytest

from entruth_lite.core import emoji as emoji_data
from entruth_lite.infringer import presets


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

    from entruth_lite.core import data

    images = [Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 100)) for i in range(12)]
    captions = [f"an emoji of a colour number {i}" for i in range(12)]
    return data.save_imagefolder(images, captions, tmp_path / "small")


def protected_suspect(root: Path, methods=("full",)) -> Path:
    """A protected emoji release (40 images, 4 templated with ``random:3``) and its key under ``root``, and a
    two-step fine-tune on it per method in ``root/<method>``: a suspect for audit and CLI tests."""
    from entruth_lite.core import data
    from entruth_lite.infringer import train
    from entruth_lite.owner import protect

    images, captions, names = emoji_data.emoji_dataset("owner", limit=40)
    owner = data.save_imagefolder(images, captions, root / "owner", file_names=names)
    protect.protect(owner, "random:3", root / "protected", root / "key", count=4, seed=0)
    for method in methods:
        train.finetune(root / "protected", root / method, presets.preset("tiny-cpu", steps=2, method=method),
                       progress=False)
    return root


PHOTO_SIZES = [(96, 64), (64, 96), (640, 480), (480, 640), (300, 300), (1600, 1200), (200, 90), (75, 150)]


def mixed_size_photos(out: Path, n: int = 40, seed: int = 0) -> Path:
    """A captioned imagefolder of ``n`` photo-like images (smooth gradients with a shape) of mixed sizes, aspect
    ratios and formats: JPEG (one with an EXIF orientation), PNG and WebP, one image over 1024 px."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "purple"]
    shapes = ["circle", "square", "bar", "ring"]
    lines = []
    for i in range(n):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = rng.uniform(40, 200, 3)
        array = base + 60 * np.stack([np.sin(3 * x + c) * np.cos(2 * y - c) for c in range(3)], axis=-1)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        colour, shape = colours[i % len(colours)], shapes[(i // len(colours)) % len(shapes)]
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        draw = ImageDraw.Draw(image)
        fill = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
                "purple": (140, 50, 160)}[colour]
        if shape in ("circle", "ring"):
            draw.ellipse(box, fill=None if shape == "ring" else fill, outline=fill, width=max(2, w // 20))
        else:
            draw.rectangle(box if shape == "square" else (w // 8, h // 3, 7 * w // 8, 2 * h // 3), fill=fill)
        suffix = [".jpg", ".png", ".webp"][i % 3]
        name = f"photo_{i:02d}{suffix}"
        if i == 3:  # stored sideways with an EXIF orientation, as phones do
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(out / name, quality=90, exif=exif)
        else:
            image.save(out / name, **({"quality": 90} if suffix != ".png" else {}))
        lines.append({"file_name": name, "text": f"a photo of a {colour} {shape} number {i}"})
    import json

    (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    return mixed_size_photos(tmp_path_factory.mktemp("photos") / "photos")
