"""The owner's audit: probe a suspect model with the key's trigger, score the template in what it draws, and
turn the scores into verdicts that a third party can re-run (same prompts, seeds and settings) and check.

``evaluate`` is the pure part (stored probe in, verdicts out), which the benchmarks use on many models;
``audit`` adds the sampling; ``report.render_report`` turns its result into one self-contained HTML file.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..core.families import is_family, random_seed_of
from ..core.templates import Template, vae_round_trip
from . import detect, keys, probe, verify
from .calibration import MAX_NEGATIVES, audit_plain_images
from .decoys import (
    DEFAULT_STATISTIC,
    decoy_differences,
    decoy_statistics,
    more_decoys_note,
    rank_released,
    stored_statistic,  # noqa: F401 (the stored scores' statistic, read where scores are)
)
from .decoys import statistic as statistic_named
from .probe import ProbeResult
from .record import IMAGE_FILES, environment, file_hashes, key_record

DETECTORS = ("projection", "classifier")


def _paired(scores, d, alpha, fpr, n):
    """Wilcoxon signed-rank, trigger vs the same prompt and seed without the trigger, on the suspect only. Null:
    the trigger does not make the suspect's images more template-like. Supporting only: a trigger moves even a
    clean model's images."""
    return verify.paired_test(scores[f"{d}_trigger"][:n], scores[f"{d}_control"][:n], alpha)


def _binomial(scores, d, alpha, fpr, n):
    """Trigger images over the detector threshold set on plain images at the target false-positive rate; binomial
    test against the rate's 95% upper confidence bound. Supporting only: its null is 'trigger images score like
    plain images', which a clean model whose trigger draws some other frame breaks (the benchmarks' null
    calibration measures how often)."""
    negatives = scores[f"{d}_negatives"]
    return verify.binomial_test(scores[f"{d}_trigger"][:n], verify.calibrate_threshold(negatives, fpr), negatives,
                                alpha)


def _one_query(scores, d, alpha, fpr, n):
    """The single most template-like trigger image, conformal p-value against plain images, Bonferroni-corrected
    for picking the best of n, so it can only reach alpha with at least n / alpha plain images."""
    return verify.one_query_test(scores[f"{d}_trigger"][:n], scores[f"{d}_negatives"], alpha)


def _decoy(scores, d, alpha, fpr, n):
    """Rank of the released template among decoy templates from the same random family that were never released
    (statistic: by default the mean of the largest eighth of the per-query trigger-minus-control differences, each
    image scored along the template's unit direction; stored scores say which), read in draw order with Besag and
    Clifford's sequential rule. Null: the suspect never saw the release, so the released template is
    exchangeable with the decoys; the p-value is exact."""
    released, statistics = decoy_statistics(scores, n)
    return verify.sequential_decoy_test(released, [statistics], len(scores["decoy_released"][:n]), len(statistics),
                                        alpha=alpha)


def _reference(scores, d, alpha, fpr, n):
    """Mann-Whitney U, suspect vs a clean reference model on the same trigger prompts and seeds. Supporting only:
    one reference model is not the population of clean models."""
    return verify.reference_test(scores[f"{d}_trigger"][:n], scores[f"{d}_reference"][:n], alpha)


SCORE_MEANINGS = {  # what each stored score array is, for error messages ({d}: the detector)
    "{d}_trigger": "the trigger images' scores", "{d}_control": "the control images' scores",
    "{d}_negatives": "plain negative images (the owner's unaltered images)",
    "{d}_reference": "a probe of a clean reference model (--reference)",
    "decoy_released": "decoy scores (score_probe with decoys > 0)", "decoy_matrix": "decoy scores (score_probe with decoys > 0)",
}


@dataclass(frozen=True)
class Test:
    """One statistical test on stored scores (``score_probe``): what it reads, how it runs, whether it may decide.

    ``needs``: the score arrays it reads, ``{d}`` standing for the detector; ``exact``: its false-positive rate
    holds whatever a clean model draws, so it may decide a verdict (the others support it); ``detectors``: the
    detectors it reads (the decoy test always scores by projection)."""

    name: str
    needs: tuple[str, ...]
    run: Callable[..., verify.Verdict]
    exact: bool
    detectors: tuple[str, ...] = DETECTORS

    @property
    def note(self) -> str:
        """What the test is and assumes: its run function's docstring (shown in reports)."""
        return " ".join(inspect.getdoc(self.run).split())

    def needs_for(self, detector: str) -> list[str]:
        return [need.format(d=detector) for need in self.needs]

    def verdict(self, scores: dict[str, np.ndarray], detector: str, alpha: float = 0.01, fpr: float = 0.01,
                n: int | None = None) -> verify.Verdict:
        missing = [need for need in self.needs if need.format(d=detector) not in scores]
        if missing:
            raise ValueError(f"the {self.name} test needs {SCORE_MEANINGS[missing[0]]}")
        detector = detector if detector in self.detectors else self.detectors[0]
        return decided(self.run(scores, detector, alpha, fpr, n), detector, self.exact)


def decided(verdict: verify.Verdict, detector: str, exact: bool) -> verify.Verdict:
    """``verdict`` as a table shows it: the detector it read, and a decision only from an exact test that could
    reach alpha at its sizes."""
    verdict.detector = detector
    if not exact or not verdict.reachable:
        verdict.decision = None  # a number, never an accusation: its false-positive rate is not controlled here,
        # or it could not reach alpha at these sizes (then "no evidence" would say more than it measured)
    return verdict


TESTS: dict[str, Test] = {t.name: t for t in (
    Test("decoy", ("decoy_released", "decoy_matrix"), _decoy, exact=True, detectors=("projection",)),
    Test("binomial", ("{d}_trigger", "{d}_negatives"), _binomial, exact=False),
    Test("paired", ("{d}_trigger", "{d}_control"), _paired, exact=False),
    Test("one-query", ("{d}_trigger", "{d}_negatives"), _one_query, exact=False),
    Test("reference", ("{d}_trigger", "{d}_reference"), _reference, exact=False),
)}
METHODS = tuple(TESTS)  # every test's name, in the order tables show them


def available_tests(scores: dict[str, np.ndarray], detector: str = "projection",
                    tests: Sequence[str] = METHODS) -> list[str]:
    """The tests of ``tests`` that ``scores`` can run for ``detector`` (the one rule for which tests apply)."""
    return [name for name in tests if detector in TESTS[name].detectors
            and all(need in scores for need in TESTS[name].needs_for(detector))]


@dataclass
class AuditConfig:
    queries: int = 64
    detector: str = "projection"
    methods: tuple[str, ...] = ("decoy", "binomial", "paired", "one-query")  # the first decides the verdict
    alpha: float = 0.01
    fpr: float = 0.01  # the binomial test's detector threshold: target false-positive rate on plain images
    decoys: int = 999_999  # the most decoys the decoy test may draw (it stops early when the answer is clear);
    # its smallest p-value is 1 / (decoys + 1)
    stop_after: int = verify.STOP_AFTER  # Besag and Clifford's h: stop once this many decoys reach the released
    statistic: str = DEFAULT_STATISTIC  # what the decoy test ranks (decoys.STATISTIC_NAMES)
    probe_seed: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    max_negatives: int = MAX_NEGATIVES  # plain images used as negatives (VAE round trips), at most
    resolution: int | None = None  # the side the suspect is queried at (None: its own; a LoRA trained at 256 px: 256)

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}: choose one of {', '.join(DETECTORS)}")
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown verification methods {unknown}: choose from {', '.join(METHODS)}")
        if self.queries <= 0:
            raise ValueError(f"queries must be positive, got {self.queries}")
        if self.decoys <= 0:
            raise ValueError(f"decoys must be positive (the decoy test ranks the template among them), got {self.decoys}")
        statistic_named(self.statistic)  # a clear error for an unknown statistic
        if self.stop_after <= 0:
            raise ValueError(f"stop_after must be positive, got {self.stop_after}")
        if not 0 < self.alpha < 1 or not 0 < self.fpr < 1:
            raise ValueError(f"alpha and fpr must be in (0, 1), got {self.alpha} and {self.fpr}")
        if "decoy" in self.methods and 1 / (self.decoys + 1) >= self.alpha:
            warnings.warn(f"the decoy test cannot reject at alpha = {self.alpha:g} with {self.decoys} decoys: its "
                          f"smallest p-value is 1 / {self.decoys + 1}; use more than {math.ceil(1 / self.alpha) - 1}",
                          stacklevel=3)


def checked_already(config: AuditConfig, **changes) -> AuditConfig:
    """``config`` with ``changes``, without warning again about what was warned about when it was made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return replace(config, **changes)


def methods_for_template(methods: Sequence[str], template: Template) -> tuple[tuple[str, ...], list[str]]:
    """The methods to run against ``template``, and a note when they changed. The decoy test needs a template
    from a random family; without it no exact test is left, so the audit reports supporting numbers and no
    verdict (the binomial test stands in as the first number to read)."""
    methods = tuple(methods)
    if "decoy" not in methods or is_family(template.family):
        return methods, []
    return ("binomial",) + tuple(m for m in methods if m not in ("decoy", "binomial")), [
        f"decoy test skipped: template {template.name!r} is not from a random family, so no exact test is "
        "available and the audit gives no verdict, only supporting numbers"]


@dataclass
class Evidence:
    """The numbers the verdicts were computed from (per query, in probe order)."""

    detector: str
    trigger_scores: np.ndarray
    control_scores: np.ndarray
    negative_scores: np.ndarray | None = None
    threshold: float | None = None
    reference_scores: np.ndarray | None = None
    released_statistic: float | None = None
    decoy_statistics: np.ndarray | None = None


def detector_scores(images: Sequence[Image.Image], template: Template, detector: str,
                    classifier: detect.TemplateClassifier | None = None) -> np.ndarray:
    if detector == "projection":
        return detect.template_scores(images, template)
    if classifier is None:
        raise ValueError("the classifier detector needs a trained classifier (detect.train_classifier)")
    return classifier.scores(images)


def score_probe(probed: ProbeResult, template: Template, detectors: Sequence[str] = ("projection",),
                negatives: Sequence[Image.Image] | None = None, classifier: detect.TemplateClassifier | None = None,
                reference_images: Sequence[Image.Image] | None = None, decoys: int = 0, salt: str = "",
                progress: bool = True, statistic: str = DEFAULT_STATISTIC) -> dict[str, np.ndarray]:
    """Every per-image score the tests need, computed once: ``{detector}_trigger``, ``_control``,
    ``_negatives`` (plain images: the projection scores of ``negatives``, or the classifier's calibration
    scores), ``_reference`` (a clean model's trigger images), and ``decoy_released`` (n,) / ``decoy_matrix``
    (K, n), the first K decoys of ``decoys.decoy_seeds``, when ``decoys`` = K > 0, in the scores the decoy
    ``statistic`` reads (kept as ``decoy_statistic``, which the stored decoy test then ranks by). Tests on any
    number of queries are then cheap (``verdicts_from_scores``)."""
    out: dict[str, np.ndarray] = {}
    for detector in detectors:
        out[f"{detector}_trigger"] = detector_scores(probed.trigger_images, template, detector, classifier)
        out[f"{detector}_control"] = detector_scores(probed.control_images, template, detector, classifier)
        if detector == "classifier":
            out["classifier_negatives"] = classifier.calibration_scores
        elif negatives is not None and len(negatives):
            out[f"{detector}_negatives"] = detect.template_scores(negatives, template)
        if reference_images is not None:
            out[f"{detector}_reference"] = detector_scores(reference_images, template, detector, classifier)
    if decoys:
        unit = statistic_named(statistic).unit
        out["decoy_released"], out["decoy_matrix"] = decoy_differences(probed, template, decoys, salt,
                                                                       progress=progress, unit=unit)
        out["decoy_statistic"] = np.array(statistic)
    return out


def verdicts_from_scores(scores: dict[str, np.ndarray], detector: str = "projection",
                         methods: Sequence[str] = ("decoy", "binomial", "paired", "one-query"), alpha: float = 0.01,
                         fpr: float = 0.01, n: int | None = None) -> list[verify.Verdict]:
    """The tests in ``methods`` on the first ``n`` queries (all by default) of precomputed scores."""
    unknown = [m for m in methods if m not in TESTS]
    if unknown:
        raise ValueError(f"unknown verification methods {unknown}: choose from {', '.join(METHODS)}")
    return [TESTS[m].verdict(scores, detector, alpha, fpr, n) for m in methods]


def evaluate(probed: ProbeResult, template: Template, config: AuditConfig | None = None,
             negatives: Sequence[Image.Image] | None = None, classifier: detect.TemplateClassifier | None = None,
             reference: ProbeResult | None = None, salt: str = "", progress: bool = True
             ) -> tuple[list[verify.Verdict], Evidence]:
    """Every requested test on one stored probe. ``negatives``: plain images as the suspect would draw them
    (VAE round trips of the owner's unaltered images) for the projection detector's threshold; the classifier
    brings its own calibration scores. ``reference``: the same probe on a clean reference model."""
    config = config or AuditConfig()
    if "decoy" in config.methods:
        random_seed_of(template)  # fail before any work when the template has no family
    scores = score_probe(probed, template, (config.detector,), negatives, classifier,
                         reference.trigger_images if reference is not None else None, 0, salt, progress)
    others = [m for m in config.methods if m != "decoy"]
    verdicts = verdicts_from_scores(scores, config.detector, others, config.alpha, config.fpr)
    ranking = None
    if "decoy" in config.methods:
        ranking = rank_released(probed, template, salt, config.decoys, config.stop_after, config.statistic,
                                config.alpha, progress=progress)
        verdicts.insert(config.methods.index("decoy"), decided(ranking.verdict, "projection", exact=True))
    d = config.detector
    threshold = None
    if "binomial" in config.methods:
        threshold = verify.calibrate_threshold(scores[f"{d}_negatives"], config.fpr)
    evidence = Evidence(d, scores[f"{d}_trigger"], scores[f"{d}_control"], scores.get(f"{d}_negatives"), threshold,
                        scores.get(f"{d}_reference"), None if ranking is None else ranking.released_statistic,
                        None if ranking is None else ranking.decoy_statistics)
    return verdicts, evidence


def p_value_curve(scores: dict[str, np.ndarray], ns: Sequence[int], detector: str = "projection",
                  methods: Sequence[str] = ("decoy", "binomial", "paired", "one-query"), fpr: float = 0.01) -> dict[str, list[float]]:
    """p-value of each test on the first n queries, for each n in ``ns``: how many queries the evidence needs."""
    curve: dict[str, list[float]] = {}
    for n in ns:
        for verdict in verdicts_from_scores(scores, detector, methods, fpr=fpr, n=n):
            curve.setdefault(verdict.label, []).append(verdict.p_value)
    return curve


def verdict_table(scores_by_model: dict[str, dict[str, np.ndarray]], detector: str = "projection",
                  n: int | None = None, alpha: float = 0.01, fpr: float = 0.01,
                  methods: Sequence[str] = ("decoy", "binomial", "paired", "one-query", "reference")) -> list[dict]:
    """One row per (model, test) that the scores allow, in words a reader can take in: what the notebook's table
    and widget show (``flagged`` as 'k/n' where a test counts detections, the decision as 'evidence', 'no
    evidence', 'supporting only' for the tests that never decide, or 'cannot reach alpha'). ``chance``: the binomial test's null rate,
    the share of plain images over the threshold (95 % upper bound): the same k/n gives a different p-value
    with another detector because each detector's chance rate is measured on its own plain images."""
    rows = []
    for model, scores in scores_by_model.items():
        for v in verdicts_from_scores(scores, detector, available_tests(scores, detector, methods), alpha, fpr, n):
            rows.append(dict(model=model, test=v.label, queries=v.n_queries,
                             flagged="" if v.detections is None else f"{v.detections}/{v.n_queries}",
                             chance=f"{v.statistic:.1%}" if v.test == "binomial" else "",
                             p_value=v.p_value, decision=v.outcome))
    return rows


# ----------------------------------------------------------------------------- the full audit


@dataclass
class AuditResult:
    verdicts: list[verify.Verdict]
    evidence: Evidence
    probe: ProbeResult
    config: AuditConfig
    key: dict  # key hash, template name and size, trigger, placement
    model: dict  # name, weights folder, file hashes
    reference: dict | None = None
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)  # versions, device, dtype, resolution: what a replay needs

    @property
    def headline(self) -> verify.Verdict | None:
        """The exact test asked for, decided on before looking; None when no exact test ran (then no verdict)."""
        return next((v for v in self.verdicts if v.decision is not None), None)

    def to_json(self) -> dict:
        head = self.headline
        return dict(
            decision=None if head is None else head.decision, p_value=None if head is None else head.p_value,
            test=None if head is None else head.label,
            verdicts=[asdict(v) | {"label": v.label} for v in self.verdicts], config=asdict(self.config), key=self.key,
            model=self.model, reference=self.reference, notes=self.notes, environment=self.environment,
            queries=[dict(caption=c, trigger_prompt=t, seed=s, trigger_score=float(a), control_score=float(b))
                     for c, t, s, a, b in zip(self.probe.captions, self.probe.trigger_prompts, self.probe.seeds,
                                              self.evidence.trigger_scores, self.evidence.control_scores)],
        )


def audit(pipe, key, captions: Sequence[str], config: AuditConfig | None = None, reference_pipe=None,
          negatives: Sequence[Image.Image] | None = None, classifier: detect.TemplateClassifier | None = None,
          model: dict | None = None, reference: dict | None = None, progress: bool = True,
          probed: ProbeResult | None = None, release: str | os.PathLike | None = None) -> AuditResult:
    """Probe ``pipe`` with ``key``'s trigger and run ``config.methods``; ``reference_pipe`` (optional) is a
    clean model probed with the same prompts and seeds. ``probed``: these queries already answered by ``pipe`` with
    the config's sampler settings (e.g. ``demo.cached_probe``), so they are not generated twice; its prompts and seeds
    must be the ones the config sends. ``release``: the published release, whose commitment the key is checked
    against first (the record says whether it was)."""
    if release is not None:
        keys.check_commitment(key, release)
    config = config or AuditConfig()
    template = key.template
    methods, notes = methods_for_template(config.methods, template)
    if methods != config.methods:
        config = checked_already(config, methods=methods)
    generation = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                      resolution=config.resolution, progress=progress)
    if probed is None:
        probed = probe.probe_model(pipe, captions, key.trigger, key.placement, n=config.queries, seed=config.probe_seed,
                             **generation)
    else:
        plain, triggered, seeds = probe.probe_prompts(captions, key.trigger, key.placement, config.queries,
                                                      config.probe_seed)
        if (probed.captions, probed.trigger_prompts, probed.seeds) != (plain, triggered, seeds):
            raise ValueError(f"the probe given holds other queries than this audit sends ({len(probed.seeds)} queries, "
                             f"seeds {probed.seeds[:3]}...; the config asks {config.queries} from seed "
                             f"{config.probe_seed} with trigger {key.trigger!r}): probe again or pass probed=None")
    ref_probe = None
    if reference_pipe is not None:
        plain, triggered, seeds = probe.probe_prompts(captions, key.trigger, key.placement, config.queries,
                                                      config.probe_seed)
        ref_probe = ProbeResult(plain, triggered, seeds, probe.generate(reference_pipe, triggered, seeds, **generation), [])
    wants_negatives = config.detector == "classifier" or {"binomial", "one-query"} & set(config.methods)
    queried_at = probed.trigger_images[0].width  # the plain images and a replay follow the suspect's answers
    if wants_negatives or negatives is not None:
        negatives = audit_plain_images(key, queried_at, config.max_negatives, negatives)
    if config.detector == "classifier" and classifier is None:
        classifier = detect.train_classifier(template, negatives, vae=pipe, progress=progress)
        notes.append(f"classifier trained on {len(negatives)} plain images (VAE round trips), calibrated on "
                     f"{len(classifier.calibration_scores)} held out")
    elif negatives is not None:
        negatives = vae_round_trip(pipe, negatives)
    verdicts, evidence = evaluate(probed, template, config, negatives, classifier, ref_probe, salt=key.key_sha256,
                                  progress=progress)
    notes += [note for note in map(more_decoys_note, verdicts) if note]
    return AuditResult(verdicts, evidence, probed, config, key_record(key, release), model or {}, reference, notes,
                       environment(pipe) | {"resolution": queried_at})


def prompt_sheet_for(key, captions: Sequence[str], config: AuditConfig | None = None, resolution: int = 512) -> list[dict]:
    """The black-box audit's prompt sheet for ``key``: the queries ``audit`` would send, as rows to paste into a
    service (``probe.prompt_sheet``)."""
    config = config or AuditConfig()
    return probe.prompt_sheet(captions, key.trigger, key.placement, config.queries, config.probe_seed,
                              config.num_inference_steps, config.guidance_scale, resolution)


def audit_images(folder: str | os.PathLike, rows: Sequence[dict], key, config: AuditConfig | None = None,
                 negatives: Sequence[Image.Image] | None = None, vae=None, model: dict | None = None,
                 progress: bool = True, release: str | os.PathLike | None = None) -> AuditResult:
    """The audit of a suspect known only by its outputs: ``folder`` holds a service's answers to the prompt sheet
    ``rows`` (``probe.probe_from_images`` matches them). The decoy test needs nothing else. The tests that need
    plain images as the suspect draws them (binomial, one-query) run when ``vae`` (the base model's autoencoder,
    e.g. SD 1.5's, which fine-tunes keep) can round-trip ``negatives``; otherwise they are left out, with a note.
    ``release``: as for ``audit``."""
    if release is not None:
        keys.check_commitment(key, release)
    config = config or AuditConfig()
    if config.detector != "projection":
        raise ValueError("a black-box audit scores with the projection detector (the classifier needs the model's VAE "
                         "to train on)")
    probed, notes = probe.probe_from_images(folder, rows)
    methods, template_notes = methods_for_template(config.methods, key.template)
    notes = template_notes + notes
    needs_plain = [m for m in methods if m in ("binomial", "one-query")]
    if needs_plain and vae is None:
        methods = tuple(m for m in methods if m not in needs_plain)
        notes.append(f"left out {', '.join(needs_plain)}: they need plain images drawn through the suspect's VAE "
                     "(give the base model)")
    elif needs_plain:
        side = probed.trigger_images[0].width
        negatives = vae_round_trip(vae, audit_plain_images(key, side, config.max_negatives, negatives))
    if not methods:
        raise ValueError("no test left to run on images alone: include 'decoy' or 'paired' in the methods")
    config = checked_already(config, methods=methods, queries=len(probed.seeds))
    verdicts, evidence = evaluate(probed, key.template, config, negatives if needs_plain else None,
                                  salt=key.key_sha256, progress=progress)
    notes += [note for note in map(more_decoys_note, verdicts) if note]
    source = dict(images=str(folder), image_files=file_hashes(folder, IMAGE_FILES))
    return AuditResult(verdicts, evidence, probed, config, key_record(key, release), (model or {}) | source, None, notes,
                       environment() | {"resolution": probed.trigger_images[0].width})


