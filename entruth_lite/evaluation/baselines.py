"""Baselines on the same data, model and budget as EnTruth, so that "why not a watermark, or membership
inference?" gets an answer in numbers.

- **DIAGNOSIS-style coating** (Wang et al., ICLR 2024; public code ``ZhentingWang/DIAGNOSIS``): a WaNet-style
  smooth warp (one secret random k x k flow field, strength s; ``warp_coat``) applied to a coating rate of
  the dataset, either with a trigger word (their default 20 %) or unconditionally (100 %). A binary classifier
  learns coated vs clean images; a model is called infringing when more than a threshold share of its
  generations (their default 0.75) are classified as coated. We also give a binomial p-value against the
  classifier's calibrated false-positive rate, the same test EnTruth uses, so the two are comparable.
- **Loss-based membership inference**: the model's denoising loss on the owner's images vs on images of the same
  distribution that were never released; members should have lower loss (one-sided Mann-Whitney).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from ..core import data, files, template_io, templates
from ..core.templates import vae_round_trip
from ..owner import detect, selection, triggers, verify

COAT_KEY_FILE = "coat-key.json"
COAT_MODES = ("trigger", "unconditional")


def warp_coat(image: Image.Image, strength: float = 0.5, grid: int = 4, seed: int = 0) -> Image.Image:
    """A WaNet-style "coat" (as DIAGNOSIS uses): a smooth, nearly invisible warp of the whole image.

    A random ``grid`` x ``grid`` flow field, normalised to mean |flow| = 1, is upsampled bicubically to the
    image size and added, scaled by ``strength`` / side, to the identity sampling grid (normalised
    coordinates); ``torch.nn.functional.grid_sample`` then resamples (bilinear, border clamped). At the
    defaults a 32 px image moves by about a quarter pixel: the contrast to a template, which alters half
    the image by a lot.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    image = data.to_rgb(image)
    width, height = image.size
    generator = torch.Generator().manual_seed(int(seed))
    flow = torch.rand(1, 2, grid, grid, generator=generator, dtype=torch.float64) * 2 - 1
    flow = flow / flow.abs().mean()
    flow = F.interpolate(flow, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height, dtype=torch.float64), torch.linspace(-1, 1, width, dtype=torch.float64), indexing="ij"
    )
    identity = torch.stack((xs, ys), dim=-1)[None]  # grid_sample wants (x, y)
    offset = flow * strength / torch.tensor([width, height], dtype=torch.float64)
    sample_grid = (identity + offset).clamp(-1, 1)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).permute(2, 0, 1)[None]
    warped = F.grid_sample(pixels, sample_grid, mode="bilinear", padding_mode="border", align_corners=True)
    array = (warped[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


def coat_contrast(
    images: Sequence[Image.Image], template: templates.Template | str = "billboard", strength: float = 0.5, grid: int = 4,
    seed: int = 0, amplify: float = 10.0,
) -> tuple[Image.Image, dict[str, dict[str, float]]]:
    """DIAGNOSIS's coat versus an EnTruth template on the same images: a grid with rows original, coated,
    templated, |coat change| x ``amplify`` and |template change| (not amplified), and their mean stats."""
    images = [data.to_rgb(image) for image in images]
    if not images:
        raise ValueError("no images to compare")
    template = template_io.resolve_template(template, images[0].size)
    coated = [warp_coat(image, strength=strength, grid=grid, seed=seed + i) for i, image in enumerate(images)]
    templated = templates.insert(images, template)

    def difference(a: Image.Image, b: Image.Image, gain: float) -> Image.Image:
        b = b.resize(a.size) if b.size != a.size else b
        delta = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)) * gain
        return Image.fromarray(np.clip(delta, 0, 255).astype(np.uint8))

    rows = images + coated + [t.resize(images[0].size) for t in templated]
    rows += [difference(i, c, amplify) for i, c in zip(images, coated)]
    rows += [difference(i, t, 1.0) for i, t in zip(images, templated)]
    stats = {"coat": selection.mean_stats(list(zip(images, coated))), "template": selection.mean_stats(list(zip(images, templated)))}
    return data.image_grid(rows, cols=len(images)), stats


@dataclass
class CoatKey:
    """The DIAGNOSIS owner's secret: the warp (seed, strength, grid), which files carry it, and the trigger."""

    seed: int
    strength: float
    grid: int
    rate: float
    mode: str
    trigger: str | None
    files: list[str]
    source: str

    def coat(self, image: Image.Image) -> Image.Image:
        return warp_coat(image, self.strength, self.grid, self.seed)


def coat_dataset(dataset, out, key_dir, rate: float = 0.2, mode: str = "trigger", strength: float = 1.0,
                 grid: int = 4, seed: int = 0, trigger: str = "auto", overwrite: bool = False) -> CoatKey:
    """Write a coated copy of ``dataset`` to ``out`` and the coat key to ``key_dir`` (the source is only read).
    ``mode="trigger"``: ``rate`` of the images coated and their captions get ``trigger``; ``"unconditional"``:
    every image coated (``rate`` ignored), captions unchanged."""
    if mode not in COAT_MODES:
        raise ValueError(f"unknown coating mode {mode!r}: use 'trigger' or 'unconditional'")
    source = dataset if isinstance(dataset, data.CaptionedDataset) else data.load_imagefolder(dataset)
    out, key_dir = Path(out), Path(key_dir)
    if out.resolve() == Path(source.root).resolve():
        raise ValueError(f"coating writes a new folder, not its input {source.root}")
    if key_dir.exists() and not overwrite:
        raise FileExistsError(f"{key_dir} already exists; choose a new folder or pass overwrite=True")
    if mode == "trigger":
        n = selection.count_for(len(source), rate=rate)
        chosen = set(selection.choose(list(range(len(source))), n, seed))
        trigger = triggers.generate_trigger(source.captions, seed=seed) if trigger == "auto" else \
            triggers.check_trigger(trigger, source.captions)
    else:
        chosen, trigger, rate = set(range(len(source))), None, 1.0
    key = CoatKey(seed, float(strength), int(grid), float(rate), mode, trigger,
                  [source.file_names[i] for i in sorted(chosen)], str(Path(source.root).resolve()))
    images, captions = [], []
    for i in range(len(source)):
        image, caption = source.image(i), source.captions[i]
        if i in chosen:
            image = key.coat(image)
            caption = triggers.apply_trigger(caption, trigger) if trigger else caption
        images.append(image)
        captions.append(caption)
    if Path(key_dir).exists() and not overwrite:  # before the dataset is written, not after
        raise FileExistsError(f"{key_dir} already exists; choose a new folder or replace it (overwrite=True)")
    files.check_replaceable(key_dir, (files.MARKER, COAT_KEY_FILE))
    data.save_imagefolder(images, captions, out, file_names=source.file_names, overwrite=overwrite)
    tmp = files.atomic_folder(key_dir, overwrite, private=True, ours=(files.MARKER, COAT_KEY_FILE))
    (tmp / COAT_KEY_FILE).write_text(json.dumps(asdict(key), indent=2) + "\n", encoding="utf-8")
    files.commit_folder(tmp, key_dir)
    return key


def load_coat_key(key_dir) -> CoatKey:
    path = Path(key_dir) / COAT_KEY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no coat key at {path}")
    return CoatKey(**json.loads(path.read_text(encoding="utf-8")))


def train_coat_classifier(key: CoatKey, plain_images: Sequence[Image.Image], config: detect.ClassifierConfig | None = None,
                          vae=None, device: str | None = None, progress: bool = True) -> detect.TemplateClassifier:
    """DIAGNOSIS's detector: coated vs clean versions of the owner's images, calibrated on held-out clean ones.
    No geometric augmentation by default: crops and elastic jitter would erase a warp of a fraction of a pixel."""
    config = config or detect.ClassifierConfig(augment=False, steps=600, distractors=0)
    if len(plain_images) < 8:
        raise ValueError(f"the coating classifier needs at least 8 plain images, got {len(plain_images)}")
    order = np.random.default_rng(config.seed).permutation(len(plain_images))
    n_calibration = max(4, int(round(config.calibration_share * len(plain_images))))
    calibration = [plain_images[i] for i in order[:n_calibration]]
    training = [plain_images[i] for i in order[n_calibration:]]
    coated = [key.coat(image) for image in training]
    if vae is not None:
        calibration, training, coated = (vae_round_trip(vae, x) for x in (calibration, training, coated))
    size = config.input_size or min(plain_images[0].size[0], 64)
    return detect.fit_classifier(coated, training, calibration, config, "coating", size, device, progress)


@dataclass
class DiagnosisResult:
    share_flagged: float  # of the generations classified as coated (logit > 0)
    threshold_share: float
    decision: bool  # DIAGNOSIS's rule: share_flagged > threshold_share
    binomial: verify.Verdict  # the same detections against the calibrated false-positive rate


def diagnosis_test(scores, classifier: detect.TemplateClassifier, threshold_share: float = 0.75,
                   alpha: float = 0.01) -> DiagnosisResult:
    """DIAGNOSIS's decision on coating-classifier logits of a suspect's generations, plus a p-value."""
    scores = np.asarray(scores, float)
    share = float((scores > 0).mean())
    binomial = verify.binomial_test(scores, 0.0, classifier.calibration_scores, alpha)
    binomial.test = "diagnosis-binomial"
    return DiagnosisResult(share, threshold_share, share > threshold_share, binomial)


def membership_test(member_losses, nonmember_losses, alpha: float = 0.01) -> verify.Verdict:
    """Loss-based membership inference: are the owner's images denoised better than never-released images of
    the same distribution? (Mann-Whitney, one-sided.) ``diffusion.image_losses`` gives the losses; the two sets
    must be exchangeable under the null (a random hold-out of the owner's data, not another dataset)."""
    members, nonmembers = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("membership inference needs member and non-member losses")
    result = stats.mannwhitneyu(members, nonmembers, alternative="less")
    return verify.Verdict("membership-loss", len(members), None, float(result.statistic), float(result.pvalue),
                          alpha, float(result.pvalue) < alpha, [])


def split_holdout(dataset, out_released, holdout_share: float = 0.1, seed: int = 0, overwrite: bool = False
                  ) -> tuple[Path, list[int]]:
    """What an owner who wants membership evidence must do before release: keep a random ``holdout_share``
    back. Writes the released part to ``out_released``; returns it and the held-out indices."""
    source = dataset if isinstance(dataset, data.CaptionedDataset) else data.load_imagefolder(dataset)
    if not 0 < holdout_share < 1:
        raise ValueError(f"holdout_share must be in (0, 1), got {holdout_share}")
    order = np.random.default_rng(seed).permutation(len(source))
    held = sorted(int(i) for i in order[: max(1, round(holdout_share * len(source)))])
    kept = [i for i in range(len(source)) if i not in set(held)]
    out = data.save_imagefolder([source.image(i) for i in kept], [source.captions[i] for i in kept], out_released,
                                file_names=[source.file_names[i] for i in kept], overwrite=overwrite)
    return out, held


def summarize_comparison(results, alpha: float = 0.01):
    """One row per method from per-model results (``benchmarks/compare_baselines.py``: columns method, seed, rate,
    psnr, ``p_<method>`` = that method's own test on the model, membership_p, fid, kid; the ``clean`` rows hold
    every other method's test on a model that never saw its coating or template): TPR at ``alpha`` and median p of
    the method's own test, clean models it flags, membership-inference TPR, FID/KID mean and seed-to-seed sd."""
    # imported here, not at the top: pandas, needed only for tables
    import pandas as pd

    clean = results[results.method == "clean"]
    rows = []
    for method, group in results.groupby("method", sort=False):
        own = group.get(f"p_{method}")
        flagged = clean.get(f"p_{method}") if method != "clean" else None
        rows.append(dict(
            method=method, rate=group.rate.iloc[0], psnr_db=group.psnr.mean(), seeds=len(group),
            tpr=np.nan if own is None else float((own < alpha).mean()),
            median_p=np.nan if own is None else float(own.median()),
            clean_flagged=None if flagged is None else f"{int((flagged < alpha).sum())}/{int(flagged.notna().sum())}",
            membership_tpr=float((group.membership_p < alpha).mean()),
            fid=group.fid.mean(), fid_sd=group.fid.std(), kid=group.kid.mean(), kid_sd=group.kid.std()))
    return pd.DataFrame(rows)
