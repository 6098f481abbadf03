"""How the audit holds up against an infringer's attacks, measured with the owner's key (which the infringer does
not have): how many templated images and triggers a dataset attack leaves, a preview of each attack for the
notebook's widget, and the audit's p-values when a service corrupts every image it serves (output attacks).
``benchmarks/robustness.py`` runs these over seeds."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..core import data
from ..infringer.attacks import CORRUPTIONS, AttackReport, corrupt_images, dedup_keep, new_captions, transform_images
from ..owner import audit
from ..owner.probe import ProbeResult
from ..owner.triggers import has_trigger


def measure_attack(report: AttackReport, key) -> AttackReport:
    """``report`` with what the attacked dataset (``report.out``) kept of the release ``key`` protects: templated
    images, captions still holding the trigger, and templated images whose caption still holds it (what links the
    template to the trigger)."""
    rows = data.read_metadata(report.out) if report.n_out else []  # an attack may drop every image
    names, captions = [row.file_name for row in rows], [row.text for row in rows]
    templated = set(key.files)
    return replace(report, templated_in=len(templated),
                   templated_kept=sum(1 for name in names if name in templated),
                   triggers_kept=sum(has_trigger(caption, key.trigger) for caption in captions),
                   templated_with_trigger=sum(name in templated and has_trigger(caption, key.trigger)
                                              for name, caption in zip(names, captions)))


# a sensible strength for each attack (strength means something different for each: ``corrupt``'s docstring)
PREVIEW_STRENGTHS = {"dedup-phash": 6, "dedup-embedding": 0.9, "recaption-shuffle": 0.9, "jpeg": 20, "blur": 1.5,
                     "noise": 20, "crop": 0.5, "flip": 1.0}
PREVIEW_ATTACKS = tuple(PREVIEW_STRENGTHS)


def preview_attack(name: str, strength: float, images: Sequence[Image.Image], captions: Sequence[str], templated: Sequence[int],
            trigger: str, pipe=None, seed: int = 0, captioner: Callable | None = None) -> tuple[Image.Image, dict]:
    """Run one dataset attack in memory and show what it did to the templated images: a grid (templated images
    above, what the attacked dataset holds for them below; grey = removed) and counts. Writes nothing.
    De-duplication also reports the sizes of the clusters the templated images fell into (a cleaner drops clusters
    of 20 or more); ``"recaption-captioner"`` needs ``captioner``."""
    templated = list(templated)
    kept, out_images, out_captions = list(range(len(images))), list(images), list(captions)
    extra = {}
    if name.startswith("dedup-"):
        kept, clusters = dedup_keep(images, name.split("-", 1)[1], strength, 20, pipe)
        size_of = {i: len(c) for c in clusters for i in c}
        extra["templated_cluster_sizes"] = sorted(size_of[i] for i in templated)
    elif name in ("recaption-shuffle", "recaption-captioner"):
        out_captions = new_captions(captions, strength, name.split("-", 1)[1], captioner, images, seed=seed)
    elif name in CORRUPTIONS:
        out_images = transform_images(images, name, strength, 1.0, seed)
    else:
        raise ValueError(f"unknown attack {name!r} for the preview: choose one of {', '.join(PREVIEW_ATTACKS)}")
    kept_set = set(kept)
    removed = Image.new("RGB", images[0].size, (128, 128, 128))
    after = [out_images[i] if i in kept_set else removed for i in templated]
    grid = data.image_grid([images[i] for i in templated] + after, cols=max(1, len(templated)))
    stats = dict(attack=name, strength=strength, n_in=len(images), n_out=len(kept), templated_in=len(templated),
                 templated_kept=sum(i in kept_set for i in templated),
                 triggers_kept=sum(has_trigger(out_captions[i], trigger) for i in kept),
                 templated_with_trigger=sum(i in kept_set and has_trigger(out_captions[i], trigger)
                                            for i in templated))
    return grid, stats | extra


# the strengths notebook 04 shows and benchmarks/robustness.py measures over seeds
OUTPUT_SETTINGS = {"jpeg": (50, 20), "blur": (0.7, 1.5), "resize": (0.75, 0.5), "noise": (8, 20), "flip": (0.5, 1.0)}


def corrupt_probe(probed, kind: str, strength: float, seed: int = 0):
    """The probe as the auditor receives it from a service that corrupts every image it serves (``corrupt``):
    trigger images drawn from ``seed``, control images from ``seed + 1``."""
    return ProbeResult(probed.captions, probed.trigger_prompts, probed.seeds,
                       corrupt_images(probed.trigger_images, kind, strength, seed),
                       corrupt_images(probed.control_images, kind, strength, seed + 1))


def output_attack_table(probed, template, negatives=None, settings: dict | None = None, decoys: int = 999,
                        salt: str = "", methods=("decoy", "binomial"), seed: int = 0) -> list[dict]:
    """The audit's p-values when the suspect's service corrupts every image before the auditor sees it (trigger
    and control images alike), one row per (corruption, strength); the first row is the unattacked probe."""
    settings = OUTPUT_SETTINGS if settings is None else settings
    cases = [("none", 0)] + [(kind, s) for kind, strengths in settings.items() for s in strengths]
    rows = []
    for kind, strength in cases:
        attacked = probed if kind == "none" else corrupt_probe(probed, kind, strength, seed)
        scores = audit.score_probe(attacked, template, ("projection",), negatives, decoys=decoys, salt=salt,
                                   progress=False)
        row = dict(corruption=kind, strength=strength)
        for verdict in audit.verdicts_from_scores(scores, "projection", audit.available_tests(scores, "projection", methods)):
            row[f"{verdict.test} p"] = verdict.p_value
        rows.append(row)
    return rows


def robustness_verdict(detected_share: float) -> str:
    """One word for an attack setting, from the share of its seeds' models still detected: ``survives`` (all),
    ``weakens`` (more than half) or ``defeats`` (half or fewer: the owner can no longer count on a verdict)."""
    if not 0 <= detected_share <= 1:
        raise ValueError(f"detected_share must be in [0, 1], got {detected_share}")
    if np.isclose(detected_share, 1):
        return "survives"
    return "weakens" if detected_share > 0.5 else "defeats"


def summarize_robustness(results, alpha: float = 0.01):
    """Per (kind, attack, strength): seeds, mean templated images and triggers kept, TPR at ``alpha`` and
    median p-value of the decoy and binomial tests, the verdict on the decoy test's TPR (``robustness_verdict``),
    mean held-out loss, the mean share of images kept when ``results`` has ``images_kept``, and mean and
    seed-to-seed sd of KID when it has ``kid`` (``benchmarks/robustness.py``'s table)."""
    tpr = lambda p: (p < alpha).mean()
    quality = {}
    if "kid" in results:  # KID of the control images on the offline feature network (quality.fid_kid)
        quality = dict(kid=("kid", "mean"), kid_sd=("kid", "std"))
    if "images_kept" in results:  # dataset attacks: images left in the release (de-duplication drops many)
        quality = dict(images_kept=("images_kept", "mean")) | quality
    summary = results.groupby(["kind", "attack", "strength"], sort=False).agg(
        seeds=("seed", "count"), templated_kept=("templated_kept", "mean"),
        templated_with_trigger=("templated_with_trigger", "mean"),
        decoy_tpr=("decoy_p", tpr), decoy_median_p=("decoy_p", "median"),
        binomial_tpr=("binomial_p", tpr), binomial_median_p=("binomial_p", "median"),
        held_out_loss=("held_out_loss", "mean"), **quality).reset_index()
    summary.insert(summary.columns.get_loc("decoy_median_p") + 1, "verdict",
                   summary["decoy_tpr"].map(robustness_verdict))
    summary.attrs["alpha"] = alpha  # the level the TPR columns were read at, for plots and captions
    return summary
