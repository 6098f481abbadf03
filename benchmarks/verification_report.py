"""Scores the stored probes of ``verification_runs`` with every detector and test, and prints the tables of
``null_calibration.py`` and ``detection_power.py``. Everything expensive (VAE round trips of the negatives,
a template classifier per key, reference probes, 999 decoys) is cached in each run's folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
from verification_runs import Run, owner_dataset  # noqa: E402

from entruth_lite import audit, data, detect, models, probe, protect, templates, train  # noqa: E402

DECOYS = 999  # enough for p < 0.01; the audit's default 9999 only lowers the floor to 1e-4
FPR = audit.AuditConfig().fpr  # binomial tests: detector threshold at this false-positive rate on plain images
METHODS = ["paired", "decoy", "binomial", "one-query", "reference"]
DETECTORS = ["projection", "classifier"]
SCORES = "scores-mirror"  # cache name: bump it when the scoring changes (mirror: detect.template_scores's default)


def _base():
    return models.load_pipeline("tiny", device="cpu")


def owner_negatives(root: Path) -> tuple[list[str], list]:
    """The owner's images after the base VAE (what a model draws of them), cached as ``negatives.npz``."""
    cache = root / "negatives.npz"
    owner = data.load_imagefolder(owner_dataset(root))
    if not cache.is_file():
        round_trip = templates.vae_round_trip(_base(), list(owner.images()))
        np.savez_compressed(cache, names=np.asarray(owner.file_names), images=np.stack([np.asarray(i) for i in round_trip]))
    from PIL import Image

    with np.load(cache, allow_pickle=False) as stored:
        return [str(n) for n in stored["names"]], [Image.fromarray(a) for a in stored["images"]]


def _reference_probe(run: Run, reference: Run, prompts: list[str], seeds: list[int]) -> list:
    """The reference model's images for this run's trigger prompts and seeds (cached)."""
    from PIL import Image

    cache = run.folder / f"reference-{reference.folder.name}.npz"
    if not cache.is_file():
        pipe = train.load_finetuned(_base(), reference.folder / "model")
        images = probe.generate(pipe, prompts, seeds, progress=False)
        np.savez_compressed(cache, images=np.stack([np.asarray(i) for i in images]))
    with np.load(cache, allow_pickle=False) as stored:
        return [Image.fromarray(a) for a in stored["images"]]


def run_scores(run: Run, negatives: tuple[list[str], list], reference: Run | None) -> dict[str, np.ndarray]:
    """Every per-image score of one run (cached as ``SCORES``.npz)."""
    cache = run.folder / f"{SCORES}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return dict(stored)
    key = protect.load_key(run.key)
    probed = probe.load_probe(run.probe_file)
    names, images = negatives
    altered = set(key.files)
    plain = [image for name, image in zip(names, images) if name not in altered]
    clf_dir = run.folder / "classifier"
    if (clf_dir / "classifier.json").is_file():
        classifier = detect.load_classifier(clf_dir)
    else:  # the plain images are already VAE round trips, so no vae= here
        classifier = detect.train_classifier(key.template, plain, detect.ClassifierConfig(seed=run.seed), progress=False)
        detect.save_classifier(classifier, clf_dir)
    reference_images = None
    if reference is not None and reference.done:
        reference_images = _reference_probe(run, reference, probed.trigger_prompts, probed.seeds)
    scores = audit.score_probe(probed, key.template, DETECTORS, plain, classifier, reference_images, DECOYS,
                               key.key_sha256, progress=False)
    np.savez_compressed(cache, **scores)
    return scores


def p_values(scores: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """p-value of every (method, detector) on the first ``n`` queries."""
    out = {}
    for detector in DETECTORS:
        methods = [m for m in METHODS if (m != "decoy" or detector == "projection")
                   and (m != "reference" or f"{detector}_reference" in scores)]
        for verdict in audit.verdicts_from_scores(scores, detector, methods, fpr=FPR, n=n):
            name, det = verdict.method.split(" ", 1)
            out[f"{_SHORT.get(name, name)} {det}"] = verdict.p_value
    return out


_SHORT = {"paired-wilcoxon": "paired", "decoy-rank": "decoy", "reference-mannwhitney": "reference"}


def _method_order(names) -> list[str]:
    return sorted(set(names), key=lambda m: (METHODS.index(m.split(" ")[0]), m))


def null_report(runs: list[Run], root: Path) -> None:
    """Share of clean models flagged by each method at alpha 0.05 and 0.01, with the binomial p-value of
    'the false-positive rate exceeds alpha' (small = the method is anti-conservative)."""
    if len(runs) < 2:
        print(f"only {len(runs)} finished clean models: nothing to calibrate")
        return
    negatives = owner_negatives(root)
    rows = []
    for i, run in enumerate(runs):
        scores = run_scores(run, negatives, reference=runs[(i + 1) % len(runs)])
        rows.append(p_values(scores, len(scores["projection_trigger"])))
    methods = _method_order(k for r in rows for k in r)
    (root / "null_calibration.json").write_text(json.dumps(dict(runs=[r.folder.name for r in runs], p_values=rows), indent=1))
    n = len(rows)
    print(f"\nFalse positives on {n} clean fine-tunes ({runs[0].steps} steps each), 64 queries each\n")
    print("| method (detector) | flagged at 0.05 | p(rate > 0.05) | flagged at 0.01 | p(rate > 0.01) | median p |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        p = np.array([r[m] for r in rows if m in r])
        cells = []
        for alpha in (0.05, 0.01):
            k = int((p < alpha).sum())
            cells += [f"{k}/{len(p)}", f"{stats.binomtest(k, len(p), alpha, alternative='greater').pvalue:.2g}"]
        print(f"| {m} | {' | '.join(cells)} | {np.median(p):.2g} |")


def power_report(runs: list[Run], root: Path, queries=(8, 16, 32, 64), alpha: float = 0.01) -> None:
    """TPR at ``alpha`` and median p-value per rate, method and number of queries; AUC of each detector
    (trigger images of protected models vs trigger images of clean models at the same settings)."""
    import pandas as pd

    negatives = owner_negatives(root)
    clean = {r.seed: r for r in runs if r.rate == 0}
    records, auc_rows = [], []
    for run in runs:
        scores = run_scores(run, negatives, reference=clean.get(run.seed) if run.rate > 0 else None)
        for n in queries:
            for method, p in p_values(scores, n).items():
                records.append(dict(rate=run.rate, seed=run.seed, n=n, method=method, p=p))
        for detector in DETECTORS:  # the clean model's images for this key's prompts: the reference probe
            reference = scores.get(f"{detector}_reference")
            if run.rate > 0 and reference is not None:
                trig = scores[f"{detector}_trigger"]
                auc = stats.mannwhitneyu(trig, reference).statistic / (len(trig) * len(reference))
                auc_rows.append(dict(rate=run.rate, seed=run.seed, detector=detector, auc=auc))
    table = pd.DataFrame(records)
    table.to_csv(root / "detection_power.csv", index=False)
    protected = table[table.rate > 0]
    summary = protected.groupby(["rate", "method", "n"]).p.agg(
        tpr=lambda p: (p < alpha).mean(), median_p="median", seeds="count").reset_index()
    print(f"\nDetection power: TPR at alpha = {alpha} (share of seeds flagged) and median p-value\n")
    methods = _method_order(summary.method)
    print("| rate | method | " + " | ".join(f"n = {n}" for n in queries) + " |")
    print("|---|---|" + "---|" * len(queries))
    for rate in sorted(summary.rate.unique(), reverse=True):
        for m in methods:
            cells = []
            for n in queries:
                row = summary[(summary.rate == rate) & (summary.method == m) & (summary.n == n)]
                cells.append("-" if row.empty else f"{row.tpr.iloc[0]:.2f} ({row.median_p.iloc[0]:.1e}, {row.seeds.iloc[0]} seeds)")
            print(f"| {rate:g} | {m} | " + " | ".join(cells) + " |")
    if auc_rows:
        auc = pd.DataFrame(auc_rows).groupby(["rate", "detector"]).auc.agg(["mean", "min", "count"]).reset_index()
        print("\nPer-image AUC, trigger images of the protected model vs the clean model's on the same prompts\n")
        print("| rate | detector | mean AUC | min | seeds |\n|---|---|---|---|---|")
        for r in auc.itertuples():
            print(f"| {r.rate:g} | {r.detector} | {r.mean:.3f} | {r.min:.3f} | {r.count} |")
    clean_rows = table[table.rate == 0]
    if not clean_rows.empty:
        flagged = clean_rows[(clean_rows.n == max(queries))].groupby("method").p.agg(lambda p: f"{(p < alpha).sum()}/{len(p)}")
        print("\nClean models at the same settings flagged at alpha = 0.01 (64 queries): "
              + ", ".join(f"{m} {v}" for m, v in flagged.items()))
    _plot_power(summary, root / "detection_power.png", alpha)


def _plot_power(summary, path: Path, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    shown = ["decoy (projection)", "binomial (projection)", "binomial (classifier)", "paired (projection)"]
    summary = summary[summary.method.isin(shown)]  # the table has every test; the plot the main ones
    grid = sns.relplot(data=summary, x="n", y="tpr", hue="method", col="rate", kind="line", marker="o",
                       col_order=sorted(summary.rate.unique(), reverse=True), height=3, aspect=0.9)
    grid.set(xscale="log", xticks=[8, 16, 32, 64], xticklabels=["8", "16", "32", "64"], ylim=(-0.05, 1.05))
    grid.set_axis_labels("trigger queries", f"TPR at alpha = {alpha}")
    from matplotlib.ticker import NullLocator

    for ax in grid.axes.flat:
        ax.xaxis.set_minor_locator(NullLocator())
    grid.savefig(path, dpi=110)
    plt.close("all")
    print(f"\nplot: {path}")
