"""Captioned image datasets in the Hugging Face *imagefolder* layout: reading, validating and writing them.

A dataset is a folder of images plus ``metadata.jsonl`` whose rows hold ``file_name`` and ``text``:
the layout that diffusers' training scripts and ``datasets.load_dataset("imagefolder")`` read, so the
same code runs on a hub dataset saved to disk in Colab.

Nothing here writes into a folder it reads from: ``save_imagefolder`` builds the new folder under a
temporary name beside the target and renames it into place, so an interrupted run leaves no half dataset.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import atomic_folder, commit_folder

METADATA = "metadata.jsonl"
CACHED_PIXELS = 256 * 256  # images up to this size stay decoded once read (a 1,000-image dataset: under 200 MB)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used as it is; the message names the bad thing."""


@dataclass(frozen=True)
class Record:
    """One row of ``metadata.jsonl``: the file, its caption exactly as written, and any other columns (licence,
    author...), which every writer carries over unchanged."""

    file_name: str
    text: str
    extra: dict = field(default_factory=dict)


@dataclass
class CaptionedDataset:
    """A validated imagefolder: ``root`` plus its rows. Images load lazily (``image(i)``)."""

    root: Path
    records: list[Record]
    _cache: dict[int, Image.Image] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r.text for r in self.records]

    @property
    def file_names(self) -> list[str]:
        return [r.file_name for r in self.records]

    @property
    def extras(self) -> list[dict]:
        return [r.extra for r in self.records]

    def path(self, i: int) -> Path:
        return self.root / self.records[i].file_name

    def image(self, i: int) -> Image.Image:
        if i in self._cache:
            return self._cache[i]
        image = load_rgb(self.path(i))
        if image.width * image.height <= CACHED_PIXELS:  # small images stay decoded; photos never sit in RAM
            self._cache[i] = image
        return image

    def images(self) -> list[Image.Image]:
        return [self.image(i) for i in range(len(self))]


# ----------------------------------------------------------------------------- image loading


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over ``background``."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def crop_to_square(image: Image.Image, resolution: int, centre: bool = True) -> Image.Image:
    """What diffusers' trainers feed a model: the shorter side resized to ``resolution`` (Lanczos), then the centre
    (or top-left) square. Protection templates images this way, so a trainer's crop never cuts the template off."""
    image = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.LANCZOS)
    w, h = image.size
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if centre else (0, 0)
    return image.crop((left, top, left + resolution, top + resolution))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it (orientation not applied)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as error:
        raise DatasetError(too_many_pixels(path, error)) from error


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert one image, upright (its EXIF orientation applied, as every viewer does);
    a clear ``DatasetError`` for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decodes the whole file: catches truncated data, not only a bad header
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise DatasetError(too_many_pixels(path, error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: corrupt or truncated ({error})") from error


def is_animated(path: str | os.PathLike) -> bool:
    """Whether the image file holds several frames (an animated GIF, WebP or PNG); read from its header."""
    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return False  # load_rgb says what is wrong with it


def too_many_pixels(path, error) -> str:
    return (f"refusing to decode {path}: it is over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
            f"({error}), as a decompression bomb is; shrink it, or remove it from the dataset")


# ----------------------------------------------------------------------------- imagefolder IO


def read_json(path: Path, what: str, error: type[Exception] = ValueError):
    """A JSON file's content, with errors that name the file: missing (``FileNotFoundError``) or not JSON
    (``error``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as failure:
        raise error(f"{path} is not valid JSON ({failure.msg}, line {failure.lineno})") from failure


def read_metadata(root: str | os.PathLike) -> list[Record]:
    """Parse and check ``metadata.jsonl`` (one JSON object a line, ``file_name`` and ``text``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path} is missing: an imagefolder dataset needs {METADATA}")
    records: list[Record] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(meta_path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(f"{meta_path}, line {line_no}: not UTF-8 text (byte {raw[error.start]:#04x} at "
                               f"column {error.start + 1}); save the file as UTF-8") from error
        if not line.strip():
            continue
        where = f"{meta_path}, line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
        file_name = row.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DatasetError(f"{where}: row has no 'file_name'")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: row for {file_name!r} has no 'text' caption")
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise DatasetError(f"{where}: file_name {file_name!r} must be a relative path inside {root}")
        if file_name in seen:
            raise DatasetError(
                f"{where}: duplicate file_name {file_name!r} (first on line {seen[file_name]})"
            )
        seen[file_name] = line_no
        records.append(Record(file_name, text, {k: v for k, v in row.items() if k not in ("file_name", "text")}))
    if not records:
        raise DatasetError(f"{meta_path} has no rows")
    return records


def load_imagefolder(root: str | os.PathLike, check_images: bool = True) -> CaptionedDataset:
    """Load and validate a dataset folder. With ``check_images`` every image is decoded once."""
    root = Path(root)
    dataset = CaptionedDataset(root=root, records=read_metadata(root))
    if check_images:
        for i in range(len(dataset)):
            dataset.image(i)  # raises DatasetError naming the file; keeps a small decoded image
    return dataset


def save_image(image: Image.Image, path: Path) -> None:
    """Write an image the format its name says, losslessly where the format allows (PNG, WebP) and at an explicit
    high quality otherwise (JPEG 95, no chroma subsampling), never at a library default."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DatasetError(f"{path.name}: cannot tell the image format from the file name (use .png, .jpg, ...)")
    options = {".jpg": dict(quality=95, subsampling=0), ".jpeg": dict(quality=95, subsampling=0),
               ".webp": dict(lossless=True)}.get(suffix, {})
    to_rgb(image).save(path, **options)


def write_imagefolder(folder: Path, images: Sequence, captions: Sequence[str], file_names: Sequence[str],
                      extras: Sequence[dict] | None = None, extra_files: dict[str, bytes] | None = None) -> None:
    """Write an imagefolder's files into the existing ``folder``. An entry of ``images`` that is a path is copied
    byte for byte (an untouched file keeps its encoding and metadata); an image is saved with ``save_image``.
    ``extras``: the other columns of each row, written after ``file_name`` and ``text``."""
    extras = extras if extras is not None else [{}] * len(images)
    with open(folder / METADATA, "w", encoding="utf-8") as meta:
        for image, caption, name, extra in zip(images, captions, file_names, extras):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(image, (str, os.PathLike)):
                shutil.copyfile(image, target)
            else:
                save_image(image, target)
            meta.write(json.dumps({"file_name": name, "text": caption, **extra}, ensure_ascii=False) + "\n")
    for name, content in (extra_files or {}).items():
        (folder / name).write_bytes(content)


def check_rows(images: Sequence, captions: Sequence[str], file_names: Sequence[str]) -> None:
    """Refuse rows that would make a broken imagefolder, naming the bad one."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(file_names) != len(images):
        raise ValueError(f"{len(images)} images but {len(file_names)} file names")
    if len(set(file_names)) != len(file_names):
        raise DatasetError("duplicate file names in the dataset to save")
    for caption, name in zip(captions, file_names):
        if not caption or not caption.strip():
            raise DatasetError(f"empty caption for {name!r}")
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{name!r} has no image extension (.png, .jpg, ...): its format cannot be told")


def save_imagefolder(
    images: Sequence,
    captions: Sequence[str],
    out: str | os.PathLike,
    file_names: Sequence[str] | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
    extras: Sequence[dict] | None = None,
) -> Path:
    """Write a NEW imagefolder atomically (build in a temp folder, then rename into place).

    ``images``: PIL images, or paths of files to copy byte for byte. ``extra_files`` maps relative names to
    bytes written beside the images (e.g. a README); ``extras`` holds each row's other metadata columns.
    """
    out = Path(out)
    if file_names is None:
        file_names = [f"{i:05d}.png" for i in range(len(images))]
    check_rows(images, captions, file_names)
    tmp = atomic_folder(out, overwrite)
    try:
        write_imagefolder(tmp, images, captions, file_names, extras, extra_files)
        commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def unlisted_images(dataset: CaptionedDataset) -> list[str]:
    """Image files in the dataset's folder that ``metadata.jsonl`` does not list (a release would leave them out)."""
    root = Path(dataset.root)
    listed = set(dataset.file_names)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and str(p.relative_to(root)) not in listed
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


VAE_RANGE = (-1.0, 1.0)  # what the VAE reads and writes
UNIT_RANGE = (0.0, 1.0)  # what the template classifier and the quality network read


def image_array(images: Iterable[Image.Image], size: int | Sequence[int] | None = None,
                resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Images as one float32 array (N, H, W, 3) of 0-255 RGB values, resized to ``size`` (a side or (width,
    height)) where needed: the one conversion from PIL that every stage uses."""
    size = None if size is None else (size, size) if isinstance(size, int) else tuple(size)
    arrays = []
    for image in images:
        image = to_rgb(image)
        if size is not None and image.size != size:
            image = image.resize(size, resample)
        arrays.append(np.asarray(image, np.float32))
    if not arrays:
        return np.zeros((0, size[1], size[0], 3) if size else (0, 0, 0, 3), np.float32)
    return np.stack(arrays)


def images_to_tensor(images: Iterable[Image.Image], size: int | None = None, value_range=VAE_RANGE,
                     resample: Image.Resampling = Image.Resampling.LANCZOS):
    """``image_array`` as a float tensor (N, 3, H, W) scaled to ``value_range``: [-1, 1] for the VAE by default."""
    low, high = value_range
    images = list(images)
    out = None
    for i, image in enumerate(images):  # one image at a time: no second full-size copy of a large dataset
        array = image_array([image], size, resample)[0] / (255.0 / (high - low)) + low
        if out is None:
            out = torch.empty((len(images), 3, *array.shape[:2]))
        elif array.shape[:2] != tuple(out.shape[2:]):
            raise ValueError(f"image {i} is {array.shape[1]}x{array.shape[0]}, the first {out.shape[3]}x{out.shape[2]}: "
                             "give a size to resize them to one")
        out[i] = torch.from_numpy(array).permute(2, 0, 1)
    return out if out is not None else torch.empty((0, 3, size or 0, size or 0))


def tensor_to_images(tensor) -> list[Image.Image]:
    """Inverse of ``images_to_tensor`` (values clipped to [-1, 1])."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def image_grid(images: Sequence[Image.Image], cols: int = 8, pad: int = 1) -> Image.Image:
    """Tile images into one grid image (for notebooks and reports)."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    cols = min(cols, len(images))
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(to_rgb(image).resize((w, h)), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def _row_image(value, where: str) -> Image.Image:
    """A dataset row's image: a PIL image, a ``datasets`` Image dict (bytes or path) or a path."""
    if isinstance(value, Image.Image):
        return to_rgb(ImageOps.exif_transpose(value))
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as image:
                    image.load()
                    return to_rgb(ImageOps.exif_transpose(image))
            except (UnidentifiedImageError, OSError) as error:
                raise DatasetError(f"{where}: its image bytes cannot be read ({error})") from error
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        return load_rgb(value)
    raise DatasetError(f"{where}: the image column holds {type(value).__name__}, not an image")


def import_captioned(source, out: str | os.PathLike, image_column: str = "image", caption_column: str = "text",
                     resolution: int | None = None, limit: int | None = None, split: str = "train",
                     overwrite: bool = False) -> Path:
    """A captioned image dataset as an imagefolder: ``source`` is a Hugging Face ``datasets`` object (or anything
    that yields row dicts) or a hub id / local dataset path (needs the optional ``datasets`` package). With
    ``resolution`` every image is resized and centre-cropped to it, as a trainer would; other scalar columns
    are kept as metadata."""
    if isinstance(source, (str, os.PathLike)):
        try:
            # imported here, not at the top: optional package (the hub extra)
            import datasets
        except ImportError as error:
            raise ImportError("importing a dataset by name needs the datasets package: pip install datasets (or the "
                              "hub extra: pip install -e '.[hub]')") from error
        source = datasets.load_dataset(str(source), split=split)
    if resolution is not None and resolution < 8:
        raise ValueError(f"resolution must be an image side of at least 8 px, got {resolution}")
    images, captions, extras = [], [], []
    for i, row in enumerate(source):
        if limit is not None and i >= limit:
            break
        where = f"row {i}"
        for column in (image_column, caption_column):
            if column not in row:
                raise DatasetError(f"{where} has no column {column!r} (columns: {', '.join(map(str, row))})")
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetError(f"{where}: the caption column {caption_column!r} is empty or not text")
        image = _row_image(row[image_column], where)
        images.append(crop_to_square(image, resolution) if resolution else image)
        captions.append(caption)
        extras.append({k: v for k, v in row.items() if k not in (image_column, caption_column, "file_name")
                       and isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and v != v)})
    if not images:
        raise DatasetError("the dataset to import has no rows")
    return save_imagefolder(images, captions, out, file_names=[f"{i:06d}.png" for i in range(len(images))],
                            overwrite=overwrite, extras=extras)
