"""Turning template scores into a verdict with a p-value.

Each test states its null hypothesis; a p-value is only as honest as that hypothesis is for the model at
hand, which is why ``benchmarks/`` checks the false-positive rate of every test on clean fine-tunes.

- ``paired_test``: trigger-prompt scores vs the same prompts without the trigger, same model and seeds
  (Wilcoxon signed-rank). Null: the trigger does not make outputs more template-like. No reference model.
- ``reference_test``: trigger-prompt scores of the suspect vs those of a clean reference model
  (Mann-Whitney U). Null: the suspect is no more template-like than a model that never saw the data.
- ``binomial_test``: k of n trigger images flagged by a detector whose false-positive rate was calibrated on
  negatives; null rate = the calibration's upper confidence bound, so estimation error is not in our favour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import stats


@dataclass
class Verdict:
    test: str  # which test: "paired", "reference", "binomial", "one-query", "decoy"
    n_queries: int
    detections: int | None
    statistic: float
    p_value: float
    alpha: float
    decision: bool | None  # True: evidence of training on the protected data at level alpha; None: no decision
    # (a supporting test, whose false-positive rate is not controlled on the data at hand, reports its number only)
    evidence: list[int] = field(default_factory=list)  # indices of the queries that support it
    detector: str | None = None  # the score the test read ("projection", "classifier"), when run on a detector's
    floor: float | None = None  # the smallest p-value the test could give at these sizes (queries, decoys, negatives)
    draws: int | None = None  # decoy test: decoys ranked against (fewer than allowed when it stopped early)
    at_least: int | None = None  # decoy test: how many of them reached the released template's statistic

    @property
    def reachable(self) -> bool:
        """Whether the test could reject at ``alpha`` at all with the sizes it was given."""
        return self.floor is None or self.floor < self.alpha

    @property
    def outcome(self) -> str:
        """The decision in words, as tables and reports show it."""
        if not self.reachable:
            return "cannot reach alpha"
        return {True: "evidence", False: "no evidence", None: "supporting only"}[self.decision]

    @property
    def label(self) -> str:
        """What tables and reports show, e.g. ``decoy (projection)``."""
        return self.test if self.detector is None else f"{self.test} ({self.detector})"

    def summary(self) -> str:
        flagged = "" if self.detections is None else f", {self.detections}/{self.n_queries} flagged"
        if self.draws is not None:
            flagged += f", {self.at_least} of {self.draws:,} decoys at or above it"
        if not self.reachable:
            return (f"{self.label}: p = {self.p_value:.2e}{flagged} -> cannot reach alpha {self.alpha:g} at these sizes "
                    f"(smallest possible p {self.floor:.2g}): not evidence either way")
        if self.decision is None:
            return f"{self.label}: p = {self.p_value:.2e}{flagged} (supporting number, not a verdict)"
        verdict = "TRAINED ON THE PROTECTED DATA" if self.decision else "no evidence"
        return f"{self.label}: p = {self.p_value:.2e}{flagged} -> {verdict} (alpha {self.alpha:g})"


def _scores(x: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(x, dtype=float)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of scores")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite scores")
    return array


def paired_test(trigger_scores, control_scores, alpha: float = 0.01) -> Verdict:
    trigger, control = _scores(trigger_scores, "trigger_scores"), _scores(control_scores, "control_scores")
    if len(trigger) != len(control):
        raise ValueError(f"paired scores differ in length: {len(trigger)} trigger vs {len(control)} control")
    difference = trigger - control
    if not np.any(difference):
        p = 1.0
        statistic = 0.0
    else:
        result = stats.wilcoxon(trigger, control, alternative="greater", zero_method="wilcox")
        p, statistic = float(result.pvalue), float(result.statistic)
    evidence = [int(i) for i in np.argsort(-difference)[: min(8, len(difference))] if difference[i] > 0]
    return Verdict("paired", len(trigger), None, statistic, p, alpha, p < alpha, evidence)


def reference_test(suspect_scores, reference_scores, alpha: float = 0.01) -> Verdict:
    suspect, reference = _scores(suspect_scores, "suspect_scores"), _scores(reference_scores, "reference_scores")
    result = stats.mannwhitneyu(suspect, reference, alternative="greater")
    evidence = [int(i) for i in np.argsort(-suspect)[:8] if suspect[i] > np.max(reference)]
    return Verdict("reference", len(suspect), None, float(result.statistic), float(result.pvalue), alpha,
                   float(result.pvalue) < alpha, evidence)


def calibrate_threshold(negative_scores, fpr: float = 0.05) -> float:
    """The smallest threshold whose empirical false-positive rate on negatives is at most ``fpr``."""
    negatives = np.sort(_scores(negative_scores, "negative_scores"))
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    k = min(int(np.floor(fpr * len(negatives))), len(negatives) - 1)  # negatives allowed at or above it
    # just above the (n-k)-th smallest: at most k negatives lie above it, ties included
    return float(np.nextafter(negatives[len(negatives) - k - 1], np.inf))


def null_rate_upper(false_positives: int, n_negatives: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on the detector's false-positive rate."""
    if false_positives >= n_negatives:
        return 1.0
    return float(stats.beta.ppf(confidence, false_positives + 1, n_negatives - false_positives))


def binomial_test(scores, threshold: float, negative_scores, alpha: float = 0.01) -> Verdict:
    scores, negatives = _scores(scores, "scores"), _scores(negative_scores, "negative_scores")
    flagged = scores >= threshold
    null_rate = null_rate_upper(int((negatives >= threshold).sum()), len(negatives))
    k = int(flagged.sum())
    p = float(stats.binomtest(k, len(scores), null_rate, alternative="greater").pvalue)
    return Verdict("binomial", len(scores), k, float(null_rate), p, alpha, p < alpha,
                   [int(i) for i in np.flatnonzero(flagged)], floor=float(null_rate ** len(scores)))


def conformal_p_values(scores, negative_scores) -> np.ndarray:
    """Per query: (1 + #negatives scoring at least as high) / (N + 1). Valid for one query drawn like the
    negatives (exchangeable with them) under the null; the smallest possible value is 1 / (N + 1)."""
    scores, negatives = _scores(scores, "scores"), np.sort(_scores(negative_scores, "negative_scores"))
    at_least = len(negatives) - np.searchsorted(negatives, scores, side="left")
    return (1.0 + at_least) / (len(negatives) + 1.0)


def one_query_test(scores, negative_scores, alpha: float = 0.01) -> Verdict:
    """The paper's one-query evidence: the most template-like of the n generated images, with its
    conformal p-value against the detector's calibration negatives, Bonferroni-corrected for having picked
    the best of n (so it stays valid however many queries were made)."""
    per_query = conformal_p_values(scores, negative_scores)
    best = int(np.argmin(per_query))
    p = float(min(1.0, per_query[best] * len(per_query)))
    floor = min(1.0, len(per_query) / (len(np.asarray(negative_scores)) + 1.0))
    return Verdict("one-query", len(per_query), int((per_query * len(per_query) < alpha).sum()),
                   float(np.asarray(scores, float)[best]), p, alpha, p < alpha, [best], floor=floor)


STOP_AFTER = 20  # the sequential decoy test stops once this many decoys reach the released statistic


def decoy_test(released_statistic: float, decoy_statistics, n_queries: int, alpha: float = 0.01) -> Verdict:
    """Rank of the released template's statistic among K decoys drawn from the same family and never
    released. Under the null the model never saw any of them, so the released one is exchangeable with the
    decoys and p = (1 + #decoys >= released) / (K + 1) is exact (ties count against us). No reference
    model is needed; the smallest p is 1 / (K + 1), so use K = 999 to reach p = 0.001."""
    decoys = _scores(decoy_statistics, "decoy_statistics")
    return sequential_decoy_test(released_statistic, [decoys], n_queries, len(decoys), len(decoys) + 1, alpha)


@dataclass
class SequentialDecoyCount:
    """Besag & Clifford's sequential rule as a running count, for a caller that feeds several statistics from one
    stream of decoys (``sequential_decoy_test`` reads one). ``update`` with each chunk in draw order until
    ``done``; ``verdict`` then gives the test's result."""

    released_statistic: float
    max_decoys: int
    stop_after: int = STOP_AFTER
    drawn: int = 0
    at_least: int = 0
    stopped: bool = False  # the h-th decoy reached the released statistic

    def __post_init__(self):
        if not np.isfinite(self.released_statistic):
            raise ValueError("released_statistic must be finite")
        if self.max_decoys <= 0 or self.stop_after <= 0:
            raise ValueError(f"max_decoys and stop_after must be positive, got {self.max_decoys} and {self.stop_after}")

    @property
    def done(self) -> bool:
        return self.stopped or self.drawn >= self.max_decoys

    def update(self, chunk) -> None:
        if self.done:
            return
        chunk = _scores(chunk, "decoy_statistics")[:self.max_decoys - self.drawn]
        hits = np.flatnonzero(chunk >= self.released_statistic)
        if self.at_least + len(hits) >= self.stop_after:
            self.drawn += int(hits[self.stop_after - self.at_least - 1]) + 1
            self.at_least, self.stopped = self.stop_after, True
        else:
            self.at_least, self.drawn = self.at_least + len(hits), self.drawn + len(chunk)

    @property
    def p_value(self) -> float:
        if self.drawn == 0:
            raise ValueError("no decoy statistics to rank against")
        return self.stop_after / self.drawn if self.stopped else (1.0 + self.at_least) / (self.drawn + 1.0)

    def verdict(self, n_queries: int, alpha: float = 0.01) -> Verdict:
        p = self.p_value
        floor = 1 / (self.max_decoys + 1) if self.stopped else 1 / (self.drawn + 1)
        return Verdict("decoy", n_queries, None, float(self.released_statistic), p, alpha, p < alpha, [],
                       floor=floor, draws=self.drawn, at_least=self.at_least)


def sequential_decoy_test(released_statistic: float, decoy_statistics: Iterable, n_queries: int, max_decoys: int,
                          stop_after: int = STOP_AFTER, alpha: float = 0.01) -> Verdict:
    """The decoy test with Besag & Clifford's (1991) sequential Monte Carlo p-value: read the decoys' statistics
    (chunks, in draw order) until ``stop_after`` (h) of them reach the released statistic, or ``max_decoys`` (K)
    were read. Stopped at the l-th decoy: p = h / l; otherwise p = (1 + g) / (K + 1), g the decoys that reached it.

    Exact, not an approximation: under the null the released template is exchangeable with every decoy, so its
    rank among the first l + 1 templates is uniform for every l, and the stopping rule only looks at those ranks;
    Besag & Clifford show P(p <= u) <= u for every u (with equality at the values p can take, for a continuous
    statistic). Ties count against the released template. An innocent model stops after about 2h decoys; only a
    statistic beyond all but a few decoys pays for all K, and reaches the fixed-K test's floor 1 / (K + 1). With
    fewer than h decoys reaching it, the p-value is the fixed-K one on the same draws."""
    count = SequentialDecoyCount(released_statistic, max_decoys, stop_after)
    for chunk in decoy_statistics:
        count.update(chunk)
        if count.done:
            break
    return count.verdict(n_queries, alpha)


def roc_curve(positive_scores, negative_scores) -> tuple[np.ndarray, np.ndarray, float]:
    """(false-positive rates, true-positive rates, AUC) over every threshold; AUC counts ties as half."""
    positive, negative = _scores(positive_scores, "positive_scores"), _scores(negative_scores, "negative_scores")
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    tpr = np.concatenate([[0.0], [(positive >= t).mean() for t in thresholds]])
    fpr = np.concatenate([[0.0], [(negative >= t).mean() for t in thresholds]])
    auc = float(stats.mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))
    return fpr, tpr, auc


def measured_power(table, rate: float, test: str = "decoy (projection)", queries: int = 64) -> str:
    """What the detection-power benchmark measured nearest to ``rate`` (its table: ``detection_power.csv``), in
    one sentence for a widget: the consequence of choosing a rate, not only its look."""
    rows = table[(table["test"] == test) & (table["n"] == queries)]
    if rows.empty:
        raise ValueError(f"the table has no rows for test {test!r} at {queries} queries")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    row = rows.iloc[int(np.argmin(np.abs(np.log(rows["rate"].to_numpy(float)) - np.log(rate))))]
    measured = float(row["rate"])
    where = "measured at this rate" if abs(np.log(measured / rate)) < 0.05 else f"nearest measured rate {measured:.1%}"
    caveat = ""
    if rate < rows["rate"].min() * 0.9:
        caveat = " (below every measured rate: expect fewer)"
    elif rate > rows["rate"].max() * 1.1:
        caveat = " (above every measured rate: expect at least as many)"
    return (f"{rate:.2%}: {where}{caveat}, the {test} test detected {int(row['detected'])} of {int(row['seeds'])} "
            f"fine-tuned models at {queries} queries (median p {float(row['median_p']):.0e})")


def summarize_memorization(table, alpha: float = 0.01, queries: int = 64):
    """The memorization benchmark's table (``memorization.csv``: one row per setting, rate and seed) as one row per
    setting and rate: seeds run, how many the decoy test detected at ``alpha``, the median share of trigger images
    over the 1 % threshold, and the fastest seed's training minutes (the runs shared 2 cores with other jobs: the
    fastest is the least disturbed; a run resumed from a checkpoint timed only its last part and is left out)."""
    # imported here, not at the top: pandas, needed only for tables
    import pandas as pd

    missing = {"setting", "rate", "seed", "decoy_p", "binomial_flagged", "train_seconds"} - set(table.columns)
    if missing:
        raise ValueError(f"not a memorization table: columns {sorted(missing)} are missing")
    rows = []
    for (setting, rate), group in table.groupby(["setting", "rate"], sort=False):
        whole = group[group["resumed_from_step"] == 0] if "resumed_from_step" in group else group
        rows.append(dict(setting=setting, rate=rate, seeds=len(group),
                         detected=int((group["decoy_p"] < alpha).sum()),
                         flagged_share=float(group["binomial_flagged"].median()) / queries,
                         train_minutes=float(whole["train_seconds"].min()) / 60 if len(whole) else float("nan")))
    return pd.DataFrame(rows)


def summarize_query_budget(table, alpha: float = 0.01):
    """The query-budget benchmark's table (``query_budget.csv``: the decoy test on the first n queries of each
    run) as one row per rate and n: the most decoys a run could draw, seeds, how many were detected at ``alpha``,
    and the median and worst seed's p-value. How many images an owner must ask a service for."""
    missing = {"rate", "queries", "seed", "p_value", "max_decoys"} - set(table.columns)
    if missing:
        raise ValueError(f"not a query-budget table: columns {sorted(missing)} are missing")
    grouped = table.groupby(["rate", "queries"])
    return grouped.agg(max_decoys=("max_decoys", "max"), seeds=("seed", "size"),
                       detected=("p_value", lambda p: int((p < alpha).sum())), median_p=("p_value", "median"),
                       worst_p=("p_value", "max")).reset_index()
