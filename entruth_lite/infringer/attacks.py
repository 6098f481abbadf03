"""What an infringer who suspects protection can do, before training (to the data), while training (settings),
and after (to the outputs the auditor sees). Every dataset attack reads its input and writes a NEW folder. What an
attack left of the protection is measured on the owner's side, with the key the infringer does not have
(``evaluation.robustness.measure_attack``).

De-duplication follows what data cleaners run: perceptual hashes (ImageHash) or embedding cosine similarity,
connected clusters, one image kept per cluster and, as the EnTruth authors did with SSCD (similarity 0.3,
clusters of 20 or more), whole large clusters dropped. SSCD is not available offline; the embedding here is the
tiny VAE's latent mean, a stand-in that sees what the diffusion model sees.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..core import data
from ..core.models import images_per_batch, pick_device
from .presets import LORA_UNET_TARGETS, LORA_UNET_WIDE_TARGETS, PRESETS

CORRUPTIONS = ("jpeg", "blur", "noise", "crop", "flip", "resize")


@dataclass
class AttackReport:
    attack: str
    params: dict
    n_in: int
    n_out: int
    out: Path | None = None
    templated_in: int | None = None  # these four: filled by evaluation.robustness.measure_attack, with the owner key
    templated_kept: int | None = None
    triggers_kept: int | None = None  # captions (of any image) still holding the key's trigger
    templated_with_trigger: int | None = None  # templated images kept whose caption still holds it: what links them
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        kept = "" if self.templated_in is None else \
            f"; templated images kept {self.templated_kept}/{self.templated_in}, of them still with the trigger " \
            f"{self.templated_with_trigger}; captions with the trigger {self.triggers_kept}"
        return f"{self.attack} {self.params}: {self.n_in} -> {self.n_out} images{kept}"


# ----------------------------------------------------------------------------- image corruptions


def corrupt(image: Image.Image, kind: str, strength: float, rng: np.random.Generator) -> Image.Image:
    """One corruption of one image. ``strength``: JPEG quality (1-95), blur sigma in px, noise std (0-255),
    crop: smallest kept area share (random resized crop back to size), flip: probability, resize: factor
    (down then back up)."""
    image = data.to_rgb(image)
    width, height = image.size
    if kind == "jpeg":
        if not 1 <= strength <= 95:
            raise ValueError(f"JPEG quality must be in 1-95, got {strength}")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(strength))
        return data.to_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    if kind in ("blur", "noise") and not strength >= 0:
        raise ValueError(f"{kind} sigma must be >= 0, got {strength}")
    if kind == "flip" and not 0 <= strength <= 1:
        raise ValueError(f"flip probability must be in [0, 1], got {strength}")
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=float(strength)))
    if kind == "noise":
        noisy = np.asarray(image, np.float32) + rng.normal(0, float(strength), (height, width, 3))
        return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    if kind == "crop":
        if not 0 < strength <= 1:
            raise ValueError(f"crop keeps a share of the area in (0, 1], got {strength}")
        area = rng.uniform(strength, 1.0)
        side_w, side_h = max(1, round(width * np.sqrt(area))), max(1, round(height * np.sqrt(area)))
        left, top = int(rng.integers(0, width - side_w + 1)), int(rng.integers(0, height - side_h + 1))
        return image.crop((left, top, left + side_w, top + side_h)).resize((width, height), Image.Resampling.BICUBIC)
    if kind == "flip":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < strength else image
    if kind == "resize":
        if not 0 < strength <= 1:
            raise ValueError(f"resize factor must be in (0, 1], got {strength}")
        small = image.resize((max(1, round(width * strength)), max(1, round(height * strength))), Image.Resampling.BILINEAR)
        return small.resize((width, height), Image.Resampling.BILINEAR)
    raise ValueError(f"unknown corruption {kind!r}: choose one of {', '.join(CORRUPTIONS)}")


def corrupt_images(images: Sequence[Image.Image], kind: str, strength: float, seed: int = 0) -> list[Image.Image]:
    """Output-level attack: what the suspect's service does to its images before the auditor sees them."""
    rng = np.random.default_rng(seed)
    return [corrupt(image, kind, strength, rng) for image in images]


# ----------------------------------------------------------------------------- near-duplicates


def phash_distances(images: Sequence[Image.Image], hash_size: int = 8) -> np.ndarray:
    """Pairwise Hamming distances of perceptual hashes (0 = same hash, hash_size**2 = opposite)."""
    # imported here, not at the top: imagehash is needed only here
    import imagehash

    bits = np.stack([imagehash.phash(data.to_rgb(im), hash_size=hash_size).hash.flatten() for im in images])
    bits = bits.astype(np.int32)
    return bits @ (1 - bits).T + (1 - bits) @ bits.T


def vae_embeddings(images: Sequence[Image.Image], pipe_or_vae, batch_size: int | None = None,
                   center: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm VAE latent means, flattened: an offline stand-in for a copy-detection embedding (SSCD).
    Cosine similarity is taken around ``center`` (default: these images' own mean, as SSCD centres on its
    corpus); pass a corpus's ``vae_latents(...).mean(axis=0)`` to embed a few new images in that corpus's frame."""
    vectors = vae_latents(images, pipe_or_vae, batch_size)
    vectors -= vectors.mean(axis=0, keepdims=True) if center is None else center
    return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8)


def vae_latents(images: Sequence[Image.Image], pipe_or_vae, batch_size: int | None = None) -> np.ndarray:
    """VAE latent means, flattened, one row per image (batches sized to the images by default). Images of mixed
    sizes are first centre-cropped to one square side (the smallest short side, at most 256 px), so that every
    image has a comparable embedding."""
    if len({image.size for image in images}) > 1:
        side = min(256, min(min(image.size) for image in images))
        images = [data.crop_to_square(image, side) for image in images]
    batch_size = batch_size or images_per_batch(images[0].size[0] if len(images) else 32, 64)
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    param = next(vae.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = data.images_to_tensor(images[start : start + batch_size]).to(param.device, param.dtype)
            out.append(vae.encode(batch).latent_dist.mean.flatten(1).float().cpu().numpy())
    return np.concatenate(out)


def clusters_from_pairs(n: int, linked: np.ndarray) -> list[list[int]]:
    """Connected components of the graph whose edges are ``linked[i, j]`` (union-find)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def near_duplicate_clusters(images: Sequence[Image.Image], method: str = "phash", threshold: float | None = None,
                            pipe=None) -> list[list[int]]:
    """Clusters of near-duplicates. ``phash``: Hamming distance <= threshold (default 6 of 64 bits);
    ``embedding``: cosine similarity >= threshold (default 0.9) of ``vae_embeddings`` (needs ``pipe``)."""
    if method == "phash":
        linked = phash_distances(images) <= (6 if threshold is None else threshold)
    elif method == "embedding":
        if pipe is None:
            raise ValueError("embedding de-duplication needs a pipeline (its VAE embeds the images)")
        vectors = vae_embeddings(images, pipe)
        linked = vectors @ vectors.T >= (0.9 if threshold is None else threshold)
    else:
        raise ValueError(f"unknown de-duplication method {method!r}: use 'phash' or 'embedding'")
    return clusters_from_pairs(len(images), linked)


# ----------------------------------------------------------------------------- dataset attacks


def _load(dataset) -> data.CaptionedDataset:
    return dataset if isinstance(dataset, data.CaptionedDataset) else data.load_imagefolder(dataset)


def _check_out(out, *inputs: data.CaptionedDataset) -> None:
    """An attack writes a new folder: not its input, not a folder inside it, and not one that holds it (with
    ``overwrite`` that would delete the input)."""
    target = Path(out).resolve()
    for source in inputs:
        root = Path(source.root).resolve()
        if target == root or root in target.parents or target in root.parents:
            raise ValueError(f"the attack must write a new folder outside its input {source.root}, got out={out}")


def _write(out, rows: Sequence[tuple[Image.Image, str, str]], overwrite: bool) -> Path:
    """The attacked dataset, in a folder ``_check_out`` allowed before the work began."""
    images, captions, names = zip(*rows) if rows else ((), (), ())
    return data.save_imagefolder(list(images), list(captions), out, file_names=list(names), overwrite=overwrite)


def dedup_keep(images: Sequence[Image.Image], method: str = "phash", threshold: float | None = None,
               drop_clusters_of: int | None = None, pipe=None) -> tuple[list[int], list[list[int]]]:
    """(indices kept, clusters): the first image of each near-duplicate cluster, none of clusters of
    ``drop_clusters_of`` or more."""
    clusters = near_duplicate_clusters(images, method, threshold, pipe)
    keep = sorted(c[0] for c in clusters if drop_clusters_of is None or len(c) < drop_clusters_of)
    return keep, clusters


def deduplicate(dataset, out, method: str = "phash", threshold: float | None = None, drop_clusters_of: int | None = None,
                pipe=None, overwrite: bool = False) -> AttackReport:
    """Keep the first image of each near-duplicate cluster; drop whole clusters of ``drop_clusters_of`` or more
    (the EnTruth authors' setting: 20). Templated images share their surroundings, which is exactly what a
    cluster of near-duplicates looks like at high enough rates."""
    source = _load(dataset)
    _check_out(out, source)
    images = source.images()
    keep, clusters = dedup_keep(images, method, threshold, drop_clusters_of, pipe)
    rows = [(images[i], source.captions[i], source.file_names[i]) for i in keep]
    out = _write(out, rows, overwrite)
    report = AttackReport("dedup", dict(method=method, threshold=threshold, drop_clusters_of=drop_clusters_of),
                          len(source), len(keep), out)
    report.notes.append(f"{sum(len(c) > 1 for c in clusters)} clusters of near-duplicates; largest {max(map(len, clusters))}")
    return report


def retrieval_captioner(corpus_images: Sequence[Image.Image], corpus_captions: Sequence[str], pipe) -> Callable:
    """An offline captioner: each image gets the caption of its nearest corpus image (VAE embedding). Like any
    captioning model it describes the picture and never emits the owner's trigger."""
    center = vae_latents(corpus_images, pipe).mean(axis=0)
    corpus = vae_embeddings(corpus_images, pipe, center=center)

    def caption(images: Sequence[Image.Image]) -> list[str]:
        # the corpus's centre, not the query batch's own: one image centred on itself is all zeros
        vectors = vae_embeddings(images, pipe, center=center)
        return [corpus_captions[int(i)] for i in np.argmax(vectors @ corpus.T, axis=1)]

    return caption


def model_captioner(model: str = "Salesforce/blip-image-captioning-base", device: str | None = None,
                    allow_download: bool = False, max_new_tokens: int = 30, batch_size: int = 16) -> Callable:
    """A captioning model (BLIP through transformers), the infringer's tool on a GPU: ``model`` is a hub name or a
    local folder, loaded from safetensors, and only from disk unless ``allow_download`` (Colab: pass True)."""
    # imported here, not at the top: transformers is slow to import
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(model, local_files_only=not allow_download)
        net = BlipForConditionalGeneration.from_pretrained(model, local_files_only=not allow_download,
                                                           use_safetensors=True)
    except (OSError, ValueError) as error:  # missing files; a path that is not there reads as a bad hub id
        raise RuntimeError(f"captioning model {model!r} is not available here ({error}); use "
                           "attacks.retrieval_captioner offline, or allow_download=True with a connection") from error
    device = device or pick_device()
    net = net.to(device).eval()

    def caption(images: Sequence[Image.Image]) -> list[str]:
        out = []
        for start in range(0, len(images), batch_size):
            batch = [data.to_rgb(image) for image in images[start : start + batch_size]]
            inputs = processor(images=batch, return_tensors="pt").to(device)
            with torch.no_grad():
                ids = net.generate(**inputs, max_new_tokens=max_new_tokens)
            out += [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    return caption


def new_captions(captions: Sequence[str], share: float, source: str = "shuffle", captioner: Callable | None = None,
                 images: Sequence[Image.Image] | None = None, seed: int = 0) -> list[str]:
    """Captions with a random ``share`` replaced: ``"shuffle"`` takes them from other images of the dataset (a
    trigger may move with its caption), ``"captioner"`` asks ``captioner(images)`` for the chosen images."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    captions = list(captions)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(captions))[: round(share * len(captions))])
    if source == "shuffle":
        donors = rng.permutation(len(captions))[: len(chosen)]
        replaced = [captions[d] for d in donors]
    elif source == "captioner":
        if captioner is None or images is None:
            raise ValueError("source='captioner' needs a captioner (e.g. attacks.retrieval_captioner) and the images")
        replaced = captioner([images[int(i)] for i in chosen]) if len(chosen) else []
    else:
        raise ValueError(f"unknown caption source {source!r}: use 'shuffle' or 'captioner'")
    if len(replaced) != len(chosen):
        raise ValueError(f"the captioner returned {len(replaced)} captions for {len(chosen)} images")
    for i, caption in zip(chosen, replaced):
        captions[i] = caption
    return captions


def recaption(dataset, out, share: float, source: str = "shuffle", captioner: Callable | None = None, seed: int = 0,
              overwrite: bool = False) -> AttackReport:
    """Replace the captions of a random ``share`` of the images (``new_captions``); images unchanged."""
    dataset = _load(dataset)
    _check_out(out, dataset)
    images = dataset.images() if source == "captioner" else None
    captions = new_captions(dataset.captions, share, source, captioner, images, seed)
    rows = [(dataset.image(i), captions[i], dataset.file_names[i]) for i in range(len(dataset))]
    out = _write(out, rows, overwrite)
    report = AttackReport("recaption", dict(share=share, source=source, seed=seed), len(dataset), len(dataset), out)
    return report


def transform_images(images: Sequence[Image.Image], kind: str, strength: float, share: float = 1.0,
                     seed: int = 0) -> list[Image.Image]:
    """A random ``share`` of the images corrupted (``corrupt``), the rest unchanged."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = np.random.default_rng(seed)
    chosen = set(rng.permutation(len(images))[: round(share * len(images))].tolist())
    return [corrupt(image, kind, strength, rng) if i in chosen else image for i, image in enumerate(images)]


def transform(dataset, out, kind: str, strength: float, share: float = 1.0, seed: int = 0,
              overwrite: bool = False) -> AttackReport:
    """Corrupt a random ``share`` of the images (``corrupt``): JPEG, blur, noise, random resized crop, flips."""
    dataset = _load(dataset)
    _check_out(out, dataset)
    images = transform_images(dataset.images(), kind, strength, share, seed)
    rows = [(images[i], dataset.captions[i], dataset.file_names[i]) for i in range(len(dataset))]
    out = _write(out, rows, overwrite)
    report = AttackReport("transform", dict(kind=kind, strength=strength, share=share, seed=seed), len(dataset),
                          len(dataset), out)
    return report


def dilute(dataset, extra, out, factor: float, seed: int = 0, overwrite: bool = False) -> AttackReport:
    """Mix in ``factor`` x as many images from another clean dataset ``extra``: the templated share falls by
    1 / (1 + factor)."""
    dataset, extra = _load(dataset), _load(extra)
    _check_out(out, dataset, extra)
    if not factor >= 0:
        raise ValueError(f"factor must be >= 0 (extra images per image), got {factor}")
    n_extra = round(factor * len(dataset))
    if n_extra > len(extra):
        raise ValueError(f"factor {factor} needs {n_extra} extra images but {extra.root} has {len(extra)}")
    picked = np.random.default_rng(seed).permutation(len(extra))[:n_extra]
    taken = set(dataset.file_names)
    rows = [(dataset.image(i), dataset.captions[i], dataset.file_names[i]) for i in range(len(dataset))]
    for i in picked:
        name = extra.file_names[i]
        if name in taken:
            name = f"extra-{name}"
        rows.append((extra.image(int(i)), extra.captions[i], name))
    out = _write(out, rows, overwrite)
    report = AttackReport("dilute", dict(factor=factor, seed=seed), len(dataset), len(rows), out)
    return report


# ----------------------------------------------------------------------------- training-level attacks

# What an infringer can change in the fine-tune itself, as TrainConfig overrides of the tiny-cpu preset.
TRAINING_ATTACKS: dict[str, Callable[[float], dict]] = {
    "fewer_steps": lambda share: {"steps": max(1, round(PRESETS["tiny-cpu"]["steps"] * share))},
    "lower_lr": lambda factor: {"learning_rate": PRESETS["tiny-cpu"]["learning_rate"] * factor},
    # LoRA instead of the full UNet: at a given rank on attention, convolutions and feed-forward layers, or at a
    # given rank on the attention projections only (different targets)
    "lora_rank": lambda rank: {"method": "lora", "lora_rank": int(rank), "lora_targets": LORA_UNET_WIDE_TARGETS},
    "lora_attention_only": lambda rank: {"method": "lora", "lora_rank": int(rank), "lora_targets": LORA_UNET_TARGETS},
    # LoRA (rank 32, wide targets) at this many times the full fine-tune's learning rate: LoRAs are usually trained
    # at a higher rate than a full fine-tune (Stable Diffusion: 1e-4 against 1e-5); the benchmark runs the highest
    # multiple that trained stably on the tiny model (benchmarks/results)
    "lora_higher_lr": lambda factor: TRAINING_ATTACKS["lora_rank"](32)
    | {"learning_rate": PRESETS["tiny-cpu"]["learning_rate"] * factor},
    "flip": lambda _: {"random_flip": True},
    "augment": lambda views: {"augment_views": int(views)},  # strong augmentation, this many views per image
}


def training_overrides(name: str, strength: float) -> dict:
    if name not in TRAINING_ATTACKS:
        raise ValueError(f"unknown training attack {name!r}: choose one of {', '.join(TRAINING_ATTACKS)}")
    return TRAINING_ATTACKS[name](strength)


