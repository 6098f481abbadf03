"""Scores the stored probes of ``verification_runs`` with every detector and test, and prints the tables of
``null_calibration.py`` and ``detection_power.py``. Everything expensive (VAE round trips of the negatives,
a template classifier per key, reference probes, 999 decoys) is cached in each run's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from entruth_lite.core import models
from entruth_lite.owner import audit, detect, keys, probe, verify

from .common import (
    DECOYS,
    FPR,
    NULL_FORMATS,
    SCORES,
    Run,
    base_pipeline,
    cached_scores,
    false_positive_row,
    plain_negatives,
    write_table,
)


def _reference_probe(run: Run, reference: Run, prompts: list[str], seeds: list[int]) -> list:
    """The reference model's images for this run's trigger prompts and seeds (cached)."""
    from PIL import Image

    cache = run.folder / f"reference-{reference.folder.name}.npz"
    if not cache.is_file():
        pipe = models.load_finetuned(base_pipeline(), reference.folder / "model")
        images = probe.generate(pipe, prompts, seeds, progress=False)
        np.savez_compressed(cache, images=np.stack([np.asarray(i) for i in images]))
    with np.load(cache, allow_pickle=False) as stored:
        return [Image.fromarray(a) for a in stored["images"]]


def run_scores(run: Run, root: Path, reference: Run | None) -> dict[str, np.ndarray]:
    """Every per-image score of one run, every detector (cached as ``SCORES``.npz)."""

    def compute():
        key = keys.load_key(run.key)
        probed = probe.load_probe(run.probe_file)
        plain = plain_negatives(root, key)
        clf_dir = run.folder / "classifier"
        if (clf_dir / "classifier.json").is_file():
            classifier = detect.load_classifier(clf_dir)
        else:  # the plain images are already VAE round trips, so no vae= here
            classifier = detect.train_classifier(key.template, plain, detect.ClassifierConfig(seed=run.seed),
                                                 progress=False)
            detect.save_classifier(classifier, clf_dir)
        reference_images = None
        if reference is not None and reference.done:
            reference_images = _reference_probe(run, reference, probed.trigger_prompts, probed.seeds)
        return audit.score_probe(probed, key.template, audit.DETECTORS, plain, classifier, reference_images, DECOYS,
                                 key.key_sha256, progress=False)

    return cached_scores(run.folder / f"{SCORES}.npz", compute)


def p_values(scores: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """p-value of every test the scores allow, on every detector, on the first ``n`` queries (by label)."""
    return {v.label: v.p_value for detector in audit.DETECTORS
            for v in audit.verdicts_from_scores(scores, detector, audit.available_tests(scores, detector), fpr=FPR, n=n)}


def _method_order(labels) -> list[str]:
    return sorted(set(labels), key=lambda m: (audit.METHODS.index(m.split(" ")[0]), m))


def null_report(runs: list[Run], root: Path, setting: dict | None = None) -> None:
    """Share of clean models flagged by each method at alpha 0.05 and 0.01, with the binomial p-value of
    'the false-positive rate exceeds alpha' (small = the method is anti-conservative). ``setting`` (e.g. the
    template family, trigger letters and steps) leads every row, so calibrations of several settings can share
    one table."""
    if len(runs) < 2:
        print(f"only {len(runs)} finished clean models: nothing to calibrate")
        return
    rows = []
    for i, run in enumerate(runs):
        scores = run_scores(run, root, reference=runs[(i + 1) % len(runs)])
        rows.append(p_values(scores, len(scores["projection_trigger"])))
    methods = _method_order(k for r in rows for k in r)
    (root / "null_calibration.json").write_text(json.dumps(dict(runs=[r.folder.name for r in runs], p_values=rows), indent=1))
    n = len(rows)
    print(f"\nFalse positives on {n} clean fine-tunes ({runs[0].steps} steps each), 64 queries each\n")
    summary = []
    for m in methods:
        summary.append(dict(setting or {}) | dict(test=m) | false_positive_row([r[m] for r in rows if m in r]))
    write_table(summary, root / "null_calibration.csv", NULL_FORMATS)


def power_report(runs: list[Run], root: Path, queries=(8, 16, 32, 64), alpha: float = 0.01, design: str = "") -> None:
    """TPR at ``alpha`` and median p-value per rate, method and number of queries; AUC of each detector
    (trigger images of protected models vs trigger images of clean models at the same settings). ``design``
    (``common.design_suffix``) is added to the tables' names."""
    import pandas as pd

    clean = {r.seed: r for r in runs if r.rate == 0}
    records, auc_rows = [], []
    for run in runs:
        scores = run_scores(run, root, reference=clean.get(run.seed) if run.rate > 0 else None)
        for n in queries:
            for method, p in p_values(scores, n).items():
                records.append(dict(rate=run.rate, seed=run.seed, n=n, method=method, p=p))
        for detector in audit.DETECTORS:  # the clean model's images for this key's prompts: the reference probe
            reference = scores.get(f"{detector}_reference")
            if run.rate > 0 and reference is not None:
                auc = verify.roc_curve(scores[f"{detector}_trigger"], reference)[2]
                auc_rows.append(dict(rate=run.rate, seed=run.seed, detector=detector, auc=auc))
    table = pd.DataFrame(records)
    table.to_csv(root / f"detection_power_runs{design}.csv", index=False)
    protected = table[table.rate > 0]
    summary = protected.groupby(["rate", "method", "n"]).p.agg(
        detected=lambda p: int((p < alpha).sum()), seeds="count", median_p="median").reset_index()
    summary = summary.rename(columns={"method": "test"})
    previous = root / f"detection_power{design}.csv"
    if not clean and previous.is_file():  # no clean runs here (they are not archived): keep the rows that need them
        kept = pd.read_csv(previous)
        kept = kept[~kept.test.isin(summary.test)]
        print(f"no clean runs: rows of {sorted(set(kept.test))} kept from {previous}")
        summary = pd.concat([summary, kept], ignore_index=True).sort_values(["rate", "test", "n"], ignore_index=True)
    summary.to_csv(previous, index=False)
    summary["tpr"] = summary.detected / summary.seeds
    print(f"\nDetection power: TPR at alpha = {alpha} (share of seeds flagged) and median p-value\n")
    methods = _method_order(summary.test)
    print("| rate | method | " + " | ".join(f"n = {n}" for n in queries) + " |")
    print("|---|---|" + "---|" * len(queries))
    for rate in sorted(summary.rate.unique(), reverse=True):
        for m in methods:
            cells = []
            for n in queries:
                row = summary[(summary.rate == rate) & (summary.test == m) & (summary.n == n)]
                cells.append("-" if row.empty else f"{row.tpr.iloc[0]:.2f} ({row.median_p.iloc[0]:.1e}, {row.seeds.iloc[0]} seeds)")
            print(f"| {rate:g} | {m} | " + " | ".join(cells) + " |")
    if auc_rows:
        auc = pd.DataFrame(auc_rows).groupby(["rate", "detector"]).auc.agg(
            mean_auc="mean", min_auc="min", seeds="count").reset_index()
        print("\nPer-image AUC, trigger images of the protected model vs the clean model's on the same prompts\n")
        write_table(auc.to_dict("records"), root / f"detection_power_auc{design}.csv", dict(mean_auc=".3f", min_auc=".3f"))
    clean_rows = table[table.rate == 0]
    if not clean_rows.empty:
        flagged = clean_rows[(clean_rows.n == max(queries))].groupby("method").p.agg(lambda p: f"{(p < alpha).sum()}/{len(p)}")
        print("\nClean models at the same settings flagged at alpha = 0.01 (64 queries): "
              + ", ".join(f"{m} {v}" for m, v in flagged.items()))
    _plot_power(summary, root / f"detection_power{design}.png", alpha)


def _plot_power(summary, path: Path, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    shown = ["decoy (projection)", "binomial (projection)", "binomial (classifier)", "paired (projection)"]
    summary = summary[summary.test.isin(shown)]  # the table has every test; the plot the main ones
    grid = sns.relplot(data=summary, x="n", y="tpr", hue="test", col="rate", kind="line", marker="o",
                       col_order=sorted(summary.rate.unique(), reverse=True), height=3, aspect=0.9)
    grid.set(xscale="log", xticks=[8, 16, 32, 64], xticklabels=["8", "16", "32", "64"], ylim=(-0.05, 1.05))
    grid.set_axis_labels("trigger queries", f"TPR at alpha = {alpha}")
    from matplotlib.ticker import NullLocator

    for ax in grid.axes.flat:
        ax.xaxis.set_minor_locator(NullLocator())
    grid.savefig(path, dpi=110)
    plt.close("all")
    print(f"\nplot: {path}")
