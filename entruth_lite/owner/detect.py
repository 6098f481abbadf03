"""Detecting the template in generated images.

Template matching, training-free: compare an image's *surround* (the pixels outside the template's screen)
with the template's surround. The main score is a projection,

    score = <a - mean(a), t - mean(t)> / ||t - mean(t)||^2      (per colour channel, over the surround)

which is 1 when the surround is the template's, 0 when it is unrelated or flat, and stays near 0 on flat
regions where normalised cross-correlation (also given) can be large by chance. By default an image is scored as
it is and mirrored left-right, and the higher score counts: a horizontal flip of the training images or of the
outputs costs an infringer nothing and would otherwise hide the template (``benchmarks/robustness.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.augmentation import augment
from ..core.data import UNIT_RANGE, image_array, images_to_tensor
from ..core.families import DEFAULT_FAMILY, decoy_templates, is_family, random_template
from ..core.progress import tqdm
from ..core.templates import Template, insert, surround_mask, vae_round_trip

BILINEAR = Image.Resampling.BILINEAR  # the classifier resizes as it was trained


def _centred(x: np.ndarray, axis: int) -> np.ndarray:
    return x - x.mean(axis=axis, keepdims=True)


def template_scores(images: Sequence[Image.Image] | np.ndarray, template: Template, method: str = "projection",
                    mirror: bool = True) -> np.ndarray:
    """One score per image, higher = more template-like: ``"projection"`` (default) or ``"ncc"``. ``images``:
    PIL images (any size) or an ``image_array`` at the template's size. ``mirror``: the higher of the image's
    score and its left-right mirror image's, so that a flip does not hide the template."""
    if len(images) == 0:
        return np.zeros(0, np.float32)
    if method not in ("projection", "ncc"):
        raise ValueError(f"unknown method {method!r}: use 'projection' or 'ncc'")
    if method == "projection":
        return template_scores_each(images, [template], mirror)[0]
    mask = surround_mask(template)
    if not mask.any():
        raise ValueError(f"template {template.name!r} has no surround pixels to compare")
    array = images if isinstance(images, np.ndarray) else image_array(images, template.size)
    if array.shape[1:3] != (template.size[1], template.size[0]):
        raise ValueError(f"image array of shape {array.shape} does not match the {template.size} template")
    t = _centred(np.asarray(template.scene, np.float32)[mask], axis=0)
    scores = _ncc(_centred(array[:, mask], axis=1), t)
    if mirror:
        scores = np.maximum(scores, _ncc(_centred(array[:, :, ::-1][:, mask], axis=1), t))
    return scores


def template_scores_each(images: Sequence[Image.Image] | np.ndarray, templates: Sequence[Template],
                         mirror: bool = True) -> np.ndarray:
    """Projection scores (the module's formula) of every image against each of many templates of one size, shape
    (K, N), float32, in one matrix product: the decoy test ranks a template among thousands this way. Centring
    the image is not needed: the template's centred surround sums to zero over its own mask, so the image's mean
    drops out of the dot product, and every template becomes one weight vector over the whole image."""
    if not templates:
        raise ValueError("no templates to score against")
    size = templates[0].size
    if any(t.size != size for t in templates):
        raise ValueError(f"templates of different sizes: score each size separately (first: {size})")
    array = images if isinstance(images, np.ndarray) else image_array(images, size)
    if array.shape[1:3] != (size[1], size[0]):
        raise ValueError(f"image array of shape {array.shape} does not match the {size} templates")
    surrounds = np.stack([surround_mask(t) for t in templates])
    empty = np.flatnonzero(~surrounds.any(axis=(1, 2)))
    if len(empty):
        raise ValueError(f"template {templates[empty[0]].name!r} has no surround pixels to compare")
    weights = projection_weights(np.stack([np.asarray(t.scene, np.float64) for t in templates]), surrounds)
    return projection_scores(weights, array, mirror)


def projection_weights(scenes: np.ndarray, surrounds: np.ndarray, unit: bool = False) -> np.ndarray:
    """Each template as one weight vector over the whole image, (K, H * W * 3) float64: its surround (``surrounds``,
    (K, H, W) bool) centred per colour channel and divided by its squared norm (the projection score: 1 = the whole
    template is there), or with ``unit`` by its norm (the image's length along the template's direction, in pixel
    units: what ``decoys`` compares across templates of different contrast), zero on the screen. ``scenes``:
    (K, H, W, 3), 0-255."""
    mask = surrounds[..., None]
    means = (scenes * mask).sum(axis=(1, 2), keepdims=True) / mask.sum(axis=(1, 2), keepdims=True)
    weights = ((scenes - means) * mask).reshape(len(scenes), -1)
    squared = (weights * weights).sum(axis=1, keepdims=True)
    return weights / (np.sqrt(squared) if unit else squared)


def projection_scores(weights: np.ndarray, array: np.ndarray, mirror: bool = True) -> np.ndarray:
    """The projection score of each image of ``array`` (N, H, W, 3) against each weight vector, (K, N) float32."""
    flat = array.reshape(len(array), -1).astype(np.float64)
    scores = weights @ flat.T
    if mirror:
        scores = np.maximum(scores, weights @ array[:, :, ::-1].reshape(len(array), -1).astype(np.float64).T)
    return scores.astype(np.float32)


def _ncc(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """NCC of centred surrounds ``a`` (N, P, 3) with the centred template surround ``t`` (P, 3)."""
    dot = (a * t[None]).sum(axis=(1, 2))
    return dot / (np.sqrt((a * a).sum(axis=(1, 2))) * np.sqrt(float((t * t).sum())) + 1e-8)


@dataclass
class FamilySpread:
    """A family member's own score on its VAE-limited rendition and its decoys' scores on the same images."""

    template: str
    method: str
    own: float  # 1 = the surround came back exactly
    decoy_scores: np.ndarray  # (K,)

    @property
    def max_ratio(self) -> float:
        """The best decoy's score over the member's own: >= 1 means the member cannot rank first even when a
        model reproduces it as well as the VAE allows."""
        return float(self.decoy_scores.max() / self.own)

    @property
    def decoys_at_or_above(self) -> int:
        return int((self.decoy_scores >= self.own).sum())


def family_spread(template: Template, foregrounds: Sequence[Image.Image], vae, decoys: int = 999,
                  method: str = "projection", salt: str = "template-family") -> FamilySpread:
    """The decoy test's ceiling for ``template`` (a random family's member): insert ``foregrounds``, round-trip
    them through ``vae`` (the most a latent model can learn of the template) and score them with the template
    and with ``decoys`` members of its family. A family whose members look alike after the VAE caps the test's
    power whatever a model memorized."""
    array = image_array(vae_round_trip(vae, insert(list(foregrounds), template)), template.size)
    others = decoy_templates(template, decoys, salt=salt)
    own = float(template_scores(array, template, method).mean())
    scores = np.array([template_scores(array, other, method).mean() for other in others])
    return FamilySpread(template.name, method, own, scores)


# ----------------------------------------------------------------------------- the template classifier
#
# As in the paper (a ResNet-18 trained on templated vs plain images with heavy augmentation), but small
# enough to train on a CPU in well under a minute at 32 px: positives are plain images inserted into the
# template, negatives the same plain images, so the only difference the network can use is the surround.
# Its threshold is set on plain images it never saw (``calibration_scores``), which is what makes its
# false-positive rate a measured number rather than a hope.


@dataclass
class ClassifierConfig:
    arch: str = "auto"  # "small", "resnet18" (torchvision) or "auto": resnet18 on a GPU with torchvision, else small
    init_weights: str | None = None  # a .safetensors file to start from (e.g. ImageNet ResNet-18); mismatched keys skipped
    width: int = 32
    input_size: int | None = None  # None: the template's size, at most 64 px
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    calibration_share: float = 0.25  # plain images held out of training to calibrate the threshold
    distractors: int = 32  # other templates (random family) whose insertions are negatives: be specific
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.arch not in ("auto", "small", "resnet18"):
            raise ValueError(f"arch must be 'auto', 'small' or 'resnet18', got {self.arch!r}")
        if self.init_weights is not None and not str(self.init_weights).endswith(".safetensors"):
            raise ValueError(f"init_weights must be a .safetensors file (pickles are never loaded), got {self.init_weights!r}")
        if not 0 < self.calibration_share < 1:
            raise ValueError(f"calibration_share must be in (0, 1), got {self.calibration_share}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")
        for name in ("steps", "batch_size", "width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def small_cnn(width: int = 32):
    """Four strided conv blocks and a linear head: enough to see a coloured ring, not enough to overfit."""
    def block(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, width, 1), *block(width, width, 2), *block(width, 2 * width, 2),
                         *block(2 * width, 2 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, 1))


def resnet18():
    try:
        # imported here, not at the top: optional package
        from torchvision.models import resnet18 as tv_resnet18
    except Exception as error:  # torchvision missing or built for another torch
        raise ImportError(f"arch='resnet18' needs torchvision matching your torch ({error}); use arch='small'") from error
    return tv_resnet18(weights=None, num_classes=1)


def resolve_arch(arch: str) -> str:
    """'auto' means the paper's ResNet-18 where it is cheap (a CUDA GPU with torchvision), the small CNN elsewhere."""
    if arch != "auto":
        return arch

    try:
        import torchvision  # noqa: F401
    except Exception:
        return "small"
    return "resnet18" if torch.cuda.is_available() else "small"


def _network(config: ClassifierConfig, arch: str):
    network = small_cnn(config.width) if arch == "small" else resnet18()
    if config.init_weights:
        own = network.state_dict()
        given = load_file(config.init_weights, device="cpu")
        usable = {k: v for k, v in given.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ValueError(f"{config.init_weights} has no weights that fit a {arch} network")
        network.load_state_dict(usable, strict=False)  # the 1-logit head (and anything else mismatched) starts fresh
    return network


@dataclass
class TemplateClassifier:
    """A trained detector for one template, with the scores of the plain images it was calibrated on."""

    network: object
    template_name: str
    input_size: int
    config: ClassifierConfig
    arch: str
    calibration_scores: np.ndarray
    losses: list[float] = field(default_factory=list)

    def scores(self, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
        """Logits, higher = more template-like."""
        if len(images) == 0:
            return np.zeros(0, np.float32)
        self.network.eval()
        device = next(self.network.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images_to_tensor(images[start : start + batch_size], self.input_size, UNIT_RANGE, BILINEAR).to(device)
                out.append(self.network(batch).float().squeeze(1).cpu().numpy())
        return np.concatenate(out)


def _distractors(template: Template, config: ClassifierConfig) -> list[Template]:
    """Members of the template's random family (the default family for other templates), never itself."""
    family = template.family if is_family(template.family) else DEFAULT_FAMILY
    rng = np.random.default_rng([config.seed, 0xD15])
    seeds = []
    while len(seeds) < config.distractors:
        seed = int(rng.integers(0, 2**31 - 1))
        if f"{family}:{seed}" != template.name:
            seeds.append(seed)
    return [random_template(seed, template.size, family) for seed in seeds]


def train_classifier(template: Template, plain_images: Sequence[Image.Image], config: ClassifierConfig | None = None,
                     vae=None, device: str | None = None, progress: bool = True) -> TemplateClassifier:
    """Train the template classifier on ``plain_images`` (the owner's unaltered images) and calibrate it on a
    held-out share of them. ``vae``: pass the suspect pipeline's VAE (or the pipeline) to train and calibrate
    on VAE round trips, which look more like generated images than the originals do."""
    config = config or ClassifierConfig()
    if len(plain_images) < 8:
        raise ValueError(f"the classifier needs at least 8 plain images, got {len(plain_images)}")
    size = config.input_size or min(template.size[0], 64)
    order = np.random.default_rng(config.seed).permutation(len(plain_images))
    n_calibration = max(4, int(round(config.calibration_share * len(plain_images))))
    calibration = [plain_images[i] for i in order[:n_calibration]]
    training = [plain_images[i] for i in order[n_calibration:]]
    positives = insert(training, template)
    # hard negatives: the same images in other templates, so that "has a colourful frame" is not enough
    others = _distractors(template, config)
    distracted = [insert(image, others[i % len(others)]) for i, image in enumerate(training)] if others else []
    if vae is not None:
        calibration, training, positives, distracted = (
            vae_round_trip(vae, x) if x else x for x in (calibration, training, positives, distracted))

    return fit_classifier(positives, training + distracted, calibration, config, template.name, size, device, progress)


def fit_classifier(positives: Sequence[Image.Image], negatives: Sequence[Image.Image],
                   calibration: Sequence[Image.Image], config: ClassifierConfig, label: str, input_size: int,
                   device: str | None = None, progress: bool = True) -> TemplateClassifier:
    """The training loop shared by the template classifier and DIAGNOSIS's coating classifier: balanced
    batches, optional augmentation, AdamW; then the scores of ``calibration`` (negatives never trained on)."""
    positives_t = images_to_tensor(positives, input_size, UNIT_RANGE, BILINEAR)
    negatives_t = images_to_tensor(negatives, input_size, UNIT_RANGE, BILINEAR)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    arch = resolve_arch(config.arch)
    network = _network(config, arch).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    half = config.batch_size // 2
    labels = torch.cat([torch.ones(half), torch.zeros(half)]).to(device)
    losses = []
    network.train()
    for _ in tqdm(range(config.steps), desc=f"training the {label} classifier", disable=not progress):
        pick_pos = torch.randint(len(positives_t), (half,), generator=generator)
        pick_neg = torch.randint(len(negatives_t), (half,), generator=generator)
        batch = torch.cat([positives_t[pick_pos], negatives_t[pick_neg]])
        if config.augment:
            batch = augment(batch, generator)
        loss = F.binary_cross_entropy_with_logits(network(batch.to(device)).squeeze(1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    classifier = TemplateClassifier(network, label, input_size, config, arch, np.zeros(0), losses)
    classifier.calibration_scores = classifier.scores(calibration)
    return classifier


def save_classifier(classifier: TemplateClassifier, folder: str | os.PathLike) -> Path:
    """``classifier.safetensors`` (weights) and ``classifier.json`` (config, calibration scores)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in classifier.network.state_dict().items()},
              folder / "classifier.safetensors")
    meta = dict(template_name=classifier.template_name, input_size=classifier.input_size, arch=classifier.arch,
                config=asdict(classifier.config), calibration_scores=classifier.calibration_scores.tolist())
    (folder / "classifier.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return folder


def load_classifier(folder: str | os.PathLike, device: str = "cpu") -> TemplateClassifier:
    """Read a classifier saved by ``save_classifier`` (safetensors only: weights someone sends you are
    never unpickled)."""
    folder = Path(folder)
    weights, meta_path = folder / "classifier.safetensors", folder / "classifier.json"
    if not weights.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{folder} needs classifier.safetensors and classifier.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    config = ClassifierConfig(**(meta["config"] | {"init_weights": None}))
    network = _network(config, meta.get("arch", "small"))
    network.load_state_dict(load_file(weights, device="cpu"))
    return TemplateClassifier(network.to(device), meta["template_name"], int(meta["input_size"]), config,
                              meta.get("arch", "small"), np.asarray(meta["calibration_scores"], np.float32))
