"""The decoy test at scale: rank the released template among up to millions of decoys, drawn and scored in one
stream, with a sequential p-value that stops as soon as the answer is clear.

The released template is one random draw from its family; decoys are further draws, never released. A model
that never saw the release has no reason to prefer it, so the released template's statistic is exchangeable
with the decoys' and its rank gives an exact p-value, whatever the model. The smallest p-value is 1 / (K + 1)
with K decoys, so strong evidence needs many: decoys are drawn in chunks (``families.member_arrays``) and scored
with one matrix product each (``detect.projection_scores``), and nothing but one statistic per decoy is kept.

Statistics are functions of the per-query differences (trigger minus control score, one row per template), the
same function for the released template and every decoy: any such function keeps the test exact. Two per-query
scores: the projection score (``detect``'s: 1 = the whole template is in the image) and, for the ``unit-``
statistics, the image's length along the template's unit direction. They differ in what a decoy can reach: if a
model draws a share f of the released template r, a decoy d gets the projection score f <d, r> / |d|^2, which
passes the released template's f when d is a low-contrast member correlated with r; its unit score f <d, r> / |d|
never passes the released template's f |r| (Cauchy-Schwarz), so only noise can rank a decoy above it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..core import data
from ..core.families import decoy_seeds, member_arrays, random_seed_of
from ..core.progress import tqdm
from ..core.templates import Template
from . import detect, verify
from .probe import ProbeResult

WORK_SIZE = 64  # px at most: decoys are drawn and images scored at min(template size, this)
FIRST_CHUNK, LARGEST_CHUNK = 256, 2048  # decoys per matrix product: small first (an innocent model stops early)


def _top_eighth(differences: np.ndarray) -> np.ndarray:
    k = max(1, differences.shape[1] // 8)
    return np.sort(differences, axis=1)[:, -k:].mean(axis=1)


def _trimmed(differences: np.ndarray) -> np.ndarray:
    cut = differences.shape[1] // 10
    return np.sort(differences, axis=1)[:, cut:differences.shape[1] - cut].mean(axis=1)


def _signed_rank(differences: np.ndarray) -> np.ndarray:
    """Wilcoxon's signed-rank sum per row, as a share of its largest value."""
    ranks = np.argsort(np.argsort(np.abs(differences), axis=1), axis=1) + 1.0
    return (ranks * (differences > 0)).sum(axis=1) / ranks.sum(axis=1)


STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # (templates, queries) differences -> (templates,)
    "mean": lambda d: d.mean(axis=1),
    "median": lambda d: np.median(d, axis=1),
    "trimmed-mean": _trimmed,
    "top-eighth": _top_eighth,
    "signed-rank": _signed_rank,
    "positive-share": lambda d: (d > 0).mean(axis=1),
}
UNIT = "unit-"  # a statistic's name with this prefix reads unit scores instead of projection scores
STATISTIC_NAMES = (*STATISTICS, *(UNIT + name for name in STATISTICS))
DEFAULT_STATISTIC = "unit-top-eighth"  # benchmarks.decoy_statistic's pick, on runs its report half never saw


@dataclass(frozen=True)
class DecoyStatistic:
    """One statistic of the decoy test: which per-query score it reads (``unit``) and how it aggregates the
    per-query differences; called on a (templates, queries) array of them."""

    name: str
    aggregate: Callable[[np.ndarray], np.ndarray]
    unit: bool

    def __call__(self, differences: np.ndarray) -> np.ndarray:
        return self.aggregate(differences)


def statistic(name: str) -> DecoyStatistic:
    if name not in STATISTIC_NAMES:
        raise ValueError(f"unknown decoy statistic {name!r}: choose one of {', '.join(STATISTIC_NAMES)}")
    return DecoyStatistic(name, STATISTICS[name.removeprefix(UNIT)], name.startswith(UNIT))


def working_size(template: Template, work_size: int = WORK_SIZE) -> int:
    return min(template.size[0], work_size)


def probe_arrays(probed: ProbeResult, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The trigger and control images as arrays at the working size, (n, size, size, 3)."""
    return data.image_array(probed.trigger_images, (size, size)), data.image_array(probed.control_images, (size, size))


def differences_of(seeds: list[int], family: str, trigger: np.ndarray, control: np.ndarray,
                   unit: bool = False) -> np.ndarray:
    """Per-query trigger-minus-control scores (projection, or with ``unit`` unit scores) of the members ``seeds``,
    (len(seeds), n)."""
    weights = detect.projection_weights(*member_arrays(family, seeds, trigger.shape[1]), unit=unit)
    scores = detect.projection_scores(weights, np.concatenate([trigger, control]))
    return scores[:, :len(trigger)] - scores[:, len(trigger):]


def released_differences(probed: ProbeResult, template: Template, work_size: int = WORK_SIZE,
                         n: int | None = None, unit: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``n`` trigger and control images at the working size, and the released template's per-query
    differences on them (n,): what every decoy is then scored against."""
    own = random_seed_of(template)  # a clear error for a template of no family
    trigger, control = probe_arrays(probed, working_size(template, work_size))
    trigger, control = trigger[:n], control[:n]
    return trigger, control, differences_of([own], template.family, trigger, control, unit)[0]


def decoy_differences_stream(template: Template, trigger: np.ndarray, control: np.ndarray, salt: str = "",
                             max_decoys: int | None = None, progress: bool = False,
                             unit: bool = False) -> Iterator[np.ndarray]:
    """The decoys' per-query differences in draw order (``families.decoy_seeds``), in chunks (b, n) that grow from
    ``FIRST_CHUNK`` to ``LARGEST_CHUNK``; at most ``max_decoys`` in all (None: endless). Memory stays bounded by the
    largest chunk, however many are drawn."""
    seeds = decoy_seeds(template, salt)
    drawn, chunk = 0, FIRST_CHUNK
    bar = tqdm(total=max_decoys, desc="decoys", unit="decoy", disable=not progress, mininterval=2)
    try:
        while max_decoys is None or drawn < max_decoys:
            take = chunk if max_decoys is None else min(chunk, max_decoys - drawn)
            yield differences_of(list(itertools.islice(seeds, take)), template.family, trigger, control, unit)
            drawn += take
            bar.update(take)
            chunk = min(2 * chunk, LARGEST_CHUNK)
    finally:  # also when the test stops reading early
        bar.close()


@dataclass
class DecoyRanking:
    """What the decoy test measured: its verdict and the statistics behind it (the decoys' in draw order, as far
    as the test drew)."""

    verdict: verify.Verdict
    released_statistic: float
    decoy_statistics: np.ndarray


def rank_released(probed: ProbeResult, template: Template, salt: str = "", max_decoys: int = 999_999,
                  stop_after: int = verify.STOP_AFTER, statistic_name: str = DEFAULT_STATISTIC,
                  alpha: float = 0.01, n: int | None = None, work_size: int = WORK_SIZE,
                  progress: bool = True) -> DecoyRanking:
    """The decoy test on the first ``n`` queries (all by default) of a probe: the released template's statistic
    ranked among up to ``max_decoys`` decoys, stopping once ``stop_after`` decoys have reached it
    (``verify.sequential_decoy_test``)."""
    function = statistic(statistic_name)
    trigger, control, released_row = released_differences(probed, template, work_size, n, function.unit)
    released = float(function(released_row[None])[0])
    kept: list[np.ndarray] = []

    def statistics() -> Iterator[np.ndarray]:
        for chunk in decoy_differences_stream(template, trigger, control, salt, max_decoys, progress, function.unit):
            kept.append(function(chunk))
            yield kept[-1]

    verdict = verify.sequential_decoy_test(released, statistics(), len(trigger), max_decoys, stop_after, alpha)
    drawn = np.concatenate(kept)[:verdict.draws] if kept else np.zeros(0)
    return DecoyRanking(verdict, released, drawn)


def stored_statistic(scores: dict[str, np.ndarray]) -> str:
    """The decoy statistic stored scores were made for (``score_probe``); 'mean' in files older than the choice."""
    return str(scores.get("decoy_statistic", "mean"))


def decoy_statistics(scores: dict[str, np.ndarray], n: int | None = None,
                     statistic_name: str | None = None) -> tuple[float, np.ndarray]:
    """The decoy test's statistics on the first ``n`` queries (all by default) of stored scores
    (``audit.score_probe``): the released template's and each decoy's, shape (K,), by ``statistic_name`` (default:
    the one the scores were made for). What the decoy figure and its widget draw."""
    stored = statistic(stored_statistic(scores))
    function = statistic(statistic_name or stored.name)
    if function.unit != stored.unit:
        raise ValueError(f"statistic {function.name!r} reads {'unit' if function.unit else 'projection'} scores, and "
                         f"these decoy scores were made for {stored.name!r}: score the probe again with "
                         f"score_probe(..., statistic={function.name!r})")
    released, matrix = scores["decoy_released"][:n], scores["decoy_matrix"][:, :n]
    return float(function(released[None])[0]), function(matrix)


def more_decoys_note(verdict: verify.Verdict) -> str:
    """What a larger decoy budget would buy, in one sentence for the audit's notes ('' for other tests)."""
    if verdict.test != "decoy" or verdict.draws is None:
        return ""
    allowed = round(1 / verdict.floor) - 1
    if verdict.draws < allowed:
        return (f"decoy test: stopped after {verdict.draws:,} of up to {allowed:,} decoys, {verdict.at_least} of them "
                f"at or above the released template: more decoys would not change p = {verdict.p_value:.2g}")
    if verdict.at_least == 0:
        more = 10 * (allowed + 1) - 1
        return (f"decoy test: p = {verdict.p_value:.1e} is the floor of {allowed:,} decoys (the released template beat "
                f"them all); --decoys {more:,} could reach {1 / (more + 1):.0e}, at about 10 times the cost")
    return (f"decoy test: {verdict.at_least} of {allowed:,} decoys reach the released template; more decoys would "
            f"bring p near {verdict.at_least / allowed:.1e}, not below")


def decoy_differences(probed: ProbeResult, template: Template, k: int = 999, salt: str = "",
                      work_size: int = WORK_SIZE, progress: bool = True,
                      unit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (trigger - control) scores (projection, or with ``unit`` unit scores) for the released template,
    shape (n,), and for its first K decoys, shape (K, n), all drawn at one working size (at most ``work_size`` px)
    so every template is scored the same way: what a stored score file keeps, so tests on any number of queries
    are cheap."""
    trigger, control, released = released_differences(probed, template, work_size, unit=unit)
    stream = decoy_differences_stream(template, trigger, control, salt, k, progress and k > LARGEST_CHUNK, unit)
    return released, np.concatenate(list(stream))
