"""The owner's audit: probe a suspect model with the key's trigger, score the template in what it draws, and
turn the scores into verdicts that a third party can re-run (same prompts, seeds and settings) and check.

``evaluate`` is the pure part (stored probe in, verdicts out), which the benchmarks use on many models;
``audit`` adds the sampling; ``render_report`` writes one self-contained HTML file.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from . import detect, probe, verify
from .probe import ProbeResult
from .templates import Template, decoy_templates, random_seed_of, random_template

DETECTORS = ("projection", "classifier")
METHODS = ("paired", "decoy", "binomial", "one-query", "reference")
METHOD_NOTES = {
    "paired": "Wilcoxon signed-rank, trigger vs the same prompt and seed without the trigger, on the suspect only. "
              "Null: the trigger does not make the suspect's images more template-like. Supporting only: a trigger "
              "moves even a clean model's images; on 40 clean fine-tunes it flagged 4 (projection) and 8 "
              "(classifier) at alpha 0.05.",
    "decoy": "Rank of the released template among decoy templates from the same random family that were never "
             "released (statistic: mean trigger-minus-control projection score). Null: the suspect never saw the "
             "release, so the released template is exchangeable with the decoys.",
    "binomial": "Trigger images over the detector threshold set on plain images at the target false-positive "
                "rate; binomial test against the rate's 95% upper confidence bound. Supporting only: conservative "
                "on 40 clean fine-tunes (at most 1 flagged at alpha 0.05), but its null is 'trigger images score "
                "like plain images', and a clean model whose trigger draws some other frame breaks it (tests: 40 % "
                "of such models flagged at alpha 0.01; the decoy test, 0 %).",
    "one-query": "The single most template-like trigger image, conformal p-value against plain images, "
                 "Bonferroni-corrected for picking the best of n, so it can only reach alpha with at least "
                 "n / alpha plain images.",
    "reference": "Mann-Whitney U, suspect vs a clean reference model on the same trigger prompts and seeds. "
                 "Supporting only: one reference model is not the population of clean models (5 (projection) "
                 "and 4 (classifier) of 40 clean fine-tunes flagged at alpha 0.01).",
}


@dataclass
class AuditConfig:
    queries: int = 64
    detector: str = "projection"
    methods: tuple[str, ...] = ("decoy", "binomial", "paired", "one-query")  # the first decides the verdict
    alpha: float = 0.01
    fpr: float = 0.01  # the binomial test's detector threshold: target false-positive rate on plain images
    decoys: int = 9999  # the decoy test's smallest p-value is 1 / (decoys + 1)
    probe_seed: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    max_negatives: int = 512  # plain images used as negatives (VAE round trips), at most

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}: choose one of {', '.join(DETECTORS)}")
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown verification methods {unknown}: choose from {', '.join(METHODS)}")
        if self.queries <= 0:
            raise ValueError(f"queries must be positive, got {self.queries}")
        if not 0 < self.alpha < 1 or not 0 < self.fpr < 1:
            raise ValueError(f"alpha and fpr must be in (0, 1), got {self.alpha} and {self.fpr}")
        if "decoy" in self.methods and 1 / (self.decoys + 1) >= self.alpha:
            warnings.warn(f"the decoy test cannot reject at alpha = {self.alpha:g} with {self.decoys} decoys: its "
                          f"smallest p-value is 1 / {self.decoys + 1}; use more than {math.ceil(1 / self.alpha) - 1}",
                          stacklevel=3)


def methods_for_template(methods: Sequence[str], template: Template) -> tuple[tuple[str, ...], list[str]]:
    """The methods to run against ``template``, and a note when they changed. The decoy test needs a template
    from the random family; without it no exact test is left, and the binomial test (conservative on clean
    fine-tunes, unlike the paired and reference tests, though a trigger that draws some other frame can fool it)
    takes the verdict."""
    methods = tuple(methods)
    if "decoy" not in methods or template.family == "random":
        return methods, []
    return ("binomial",) + tuple(m for m in methods if m not in ("decoy", "binomial")), [
        f"decoy test skipped: template {template.name!r} is not from the random family, so no exact test is "
        "available; the binomial test decides the verdict (a trigger that draws some other frame can fool it)"]


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


def decoy_differences(probed: ProbeResult, template: Template, k: int = 999, salt: str = "", work_size: int = 64,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (trigger - control) projection scores for the released template, shape (n,), and for K decoys
    from its family, shape (K, n); all templates drawn at one working size (at most ``work_size`` px) so every
    template is scored the same way. The decoy test ranks the means of the rows."""
    from tqdm.auto import tqdm

    size = min(template.size[0], work_size)
    released = random_template(random_seed_of(template), size)
    trig = detect.image_array(probed.trigger_images, released.size)
    ctrl = detect.image_array(probed.control_images, released.size)

    def differences(t: Template) -> np.ndarray:
        return detect.template_scores(trig, t) - detect.template_scores(ctrl, t)

    decoys = decoy_templates(released, k, salt)
    return differences(released), np.stack([differences(d) for d in tqdm(decoys, desc="decoys", disable=not progress)])


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
                progress: bool = True) -> dict[str, np.ndarray]:
    """Every per-image score the tests need, computed once: ``{detector}_trigger``, ``_control``,
    ``_negatives`` (plain images: the projection scores of ``negatives``, or the classifier's calibration
    scores), ``_reference`` (a clean model's trigger images), and ``decoy_released`` (n,) / ``decoy_matrix``
    (K, n) when ``decoys`` > 0. Tests on any number of queries are then cheap (``verdicts_from_scores``)."""
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
        out["decoy_released"], out["decoy_matrix"] = decoy_differences(probed, template, decoys, salt, progress=progress)
    return out


def verdicts_from_scores(scores: dict[str, np.ndarray], detector: str = "projection",
                         methods: Sequence[str] = ("decoy", "binomial", "paired", "one-query"), alpha: float = 0.01,
                         fpr: float = 0.01, n: int | None = None) -> list[verify.Verdict]:
    """The tests in ``methods`` on the first ``n`` queries (all by default) of precomputed scores."""
    trig, ctrl = scores[f"{detector}_trigger"][:n], scores[f"{detector}_control"][:n]
    negatives = scores.get(f"{detector}_negatives")
    verdicts = []
    for method in methods:
        if method in ("binomial", "one-query") and negatives is None:
            raise ValueError(f"the {method} test needs plain negative images (the owner's unaltered images)")
        if method == "paired":
            verdict = verify.paired_test(trig, ctrl, alpha)
        elif method == "binomial":
            verdict = verify.binomial_test(trig, verify.calibrate_threshold(negatives, fpr), negatives, alpha)
        elif method == "one-query":
            verdict = verify.one_query_test(trig, negatives, alpha)
        elif method == "decoy":
            if "decoy_matrix" not in scores:
                raise ValueError("the decoy test needs decoy scores (score_probe with decoys > 0)")
            released, matrix = scores["decoy_released"][:n], scores["decoy_matrix"][:, :n]
            verdict = verify.decoy_test(float(released.mean()), matrix.mean(axis=1), len(trig), alpha)
            verdict.method = "decoy-rank (projection)"  # whatever the detector: decoys are scored by projection
            verdicts.append(verdict)
            continue
        elif method == "reference":
            if f"{detector}_reference" not in scores:
                raise ValueError("the reference test needs a probe of a clean reference model (--reference)")
            verdict = verify.reference_test(trig, scores[f"{detector}_reference"][:n], alpha)
        else:
            raise ValueError(f"unknown verification method {method!r}: choose from {', '.join(METHODS)}")
        verdict.method = f"{verdict.method} ({detector})"
        verdicts.append(verdict)
    return verdicts


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
                         reference.trigger_images if reference is not None else None,
                         config.decoys if "decoy" in config.methods else 0, salt, progress)
    verdicts = verdicts_from_scores(scores, config.detector, config.methods, config.alpha, config.fpr)
    d = config.detector
    threshold = None
    if "binomial" in config.methods:
        threshold = verify.calibrate_threshold(scores[f"{d}_negatives"], config.fpr)
    evidence = Evidence(d, scores[f"{d}_trigger"], scores[f"{d}_control"], scores.get(f"{d}_negatives"), threshold,
                        scores.get(f"{d}_reference"),
                        float(scores["decoy_released"].mean()) if "decoy_released" in scores else None,
                        scores["decoy_matrix"].mean(axis=1) if "decoy_matrix" in scores else None)
    return verdicts, evidence


def p_value_curve(scores: dict[str, np.ndarray], ns: Sequence[int], detector: str = "projection",
                  methods: Sequence[str] = ("decoy", "binomial", "paired", "one-query"), fpr: float = 0.01) -> dict[str, list[float]]:
    """p-value of each test on the first n queries, for each n in ``ns``: how many queries the evidence needs."""
    curve: dict[str, list[float]] = {}
    for n in ns:
        for verdict in verdicts_from_scores(scores, detector, methods, fpr=fpr, n=n):
            curve.setdefault(verdict.method, []).append(verdict.p_value)
    return curve


def verdict_table(scores_by_model: dict[str, dict[str, np.ndarray]], detector: str = "projection",
                  n: int | None = None, alpha: float = 0.01, fpr: float = 0.01,
                  methods: Sequence[str] = ("decoy", "binomial", "paired", "one-query", "reference")) -> list[dict]:
    """One row per (model, test) that the scores allow: what the notebook's table and widget show."""
    rows = []
    for model, scores in scores_by_model.items():
        usable = [m for m in methods if (m != "decoy" or ("decoy_matrix" in scores and detector == "projection"))
                  and (m != "reference" or f"{detector}_reference" in scores)
                  and (m not in ("binomial", "one-query") or f"{detector}_negatives" in scores)]
        for v in verdicts_from_scores(scores, detector, usable, alpha, fpr, n):
            rows.append(dict(model=model, test=v.method, queries=v.n_queries, flagged=v.detections,
                             p_value=v.p_value, decision=v.decision))
    return rows


# ----------------------------------------------------------------------------- the full audit


def file_hashes(folder: str | os.PathLike | None) -> dict[str, str]:
    """SHA-256 of every weight and config file under ``folder`` (relative name -> digest)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".json", ".txt")}


@dataclass
class AuditResult:
    verdicts: list[verify.Verdict]
    evidence: Evidence
    probe: ProbeResult
    config: AuditConfig
    key: dict  # key hash, template name, trigger, placement
    model: dict  # name, weights folder, file hashes
    reference: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> verify.Verdict:
        """The first method asked for: the one decided on before looking (the others are supporting)."""
        return self.verdicts[0]

    def to_json(self) -> dict:
        return dict(
            decision=self.headline.decision, p_value=self.headline.p_value, method=self.headline.method,
            verdicts=[asdict(v) for v in self.verdicts], config=asdict(self.config), key=self.key,
            model=self.model, reference=self.reference, notes=self.notes,
            queries=[dict(caption=c, trigger_prompt=t, seed=s, trigger_score=float(a), control_score=float(b))
                     for c, t, s, a, b in zip(self.probe.captions, self.probe.trigger_prompts, self.probe.seeds,
                                              self.evidence.trigger_scores, self.evidence.control_scores)],
        )


def held_out_captions(model: str) -> list[str]:
    """The default probe captions: for the tiny model, the emoji split's held-out probe captions."""
    if model != "tiny":
        raise ValueError("give the probe captions (held-out captions like the dataset's, one per line) for a model "
                         "other than the tiny one")
    from .data import emoji_splits

    return [caption for _, caption in emoji_splits().probe]


def plain_images_of(key) -> list[Image.Image]:
    """The owner's unaltered images: the key's source dataset minus the files it templated."""
    from .data import load_imagefolder

    if not key.source or not Path(key.source).is_dir():
        raise FileNotFoundError(f"the key's source dataset {key.source!r} is not available; pass negatives (plain images)")
    dataset = load_imagefolder(key.source)
    altered = set(key.files)
    return [dataset.image(i) for i, name in enumerate(dataset.file_names) if name not in altered]


def audit(pipe, key, captions: Sequence[str], config: AuditConfig | None = None, reference_pipe=None,
          negatives: Sequence[Image.Image] | None = None, classifier: detect.TemplateClassifier | None = None,
          model: dict | None = None, reference: dict | None = None, progress: bool = True) -> AuditResult:
    """Probe ``pipe`` with ``key``'s trigger and run ``config.methods``; ``reference_pipe`` (optional) is a
    clean model probed with the same prompts and seeds."""
    from .templates import vae_round_trip

    config = config or AuditConfig()
    template = key.template
    methods, notes = methods_for_template(config.methods, template)
    if methods != config.methods:
        from dataclasses import replace

        config = replace(config, methods=methods)
    generation = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                      progress=progress)
    probed = probe.probe(pipe, captions, key.trigger, key.placement, n=config.queries, seed=config.probe_seed,
                         **generation)
    ref_probe = None
    if reference_pipe is not None:
        plain, triggered, seeds = probe.probe_prompts(captions, key.trigger, key.placement, config.queries,
                                                      config.probe_seed)
        ref_probe = ProbeResult(plain, triggered, seeds, probe.generate(reference_pipe, triggered, seeds, **generation), [])
    wants_negatives = config.detector == "classifier" or {"binomial", "one-query"} & set(config.methods)
    if wants_negatives and negatives is None:
        negatives = plain_images_of(key)
    if negatives is not None:
        order = np.random.default_rng(0).permutation(len(negatives))[: config.max_negatives]
        negatives = [negatives[i] for i in sorted(order)]
    if config.detector == "classifier" and classifier is None:
        classifier = detect.train_classifier(template, negatives, vae=pipe, progress=progress)
        notes.append(f"classifier trained on {len(negatives)} plain images (VAE round trips), calibrated on "
                     f"{len(classifier.calibration_scores)} held out")
    elif negatives is not None:
        negatives = vae_round_trip(pipe, negatives)
    verdicts, evidence = evaluate(probed, template, config, negatives, classifier, ref_probe, salt=key.key_sha256,
                                  progress=progress)
    key_info = dict(key_sha256=key.key_sha256, template=template.name, trigger=key.trigger, placement=key.placement)
    return AuditResult(verdicts, evidence, probed, config, key_info, model or {}, reference, notes)


def load_suspect(model: str = "tiny", weights: str | os.PathLike | None = None, device: str | None = None):
    """A base pipeline plus the suspect's weights (LoRA or full fine-tune folder; safetensors only)."""
    from .models import load_pipeline
    from .train import load_finetuned

    pipe = load_pipeline(model, device=device)
    return load_finetuned(pipe, weights) if weights is not None else pipe


def model_info(model: str, weights: str | os.PathLike | None) -> dict:
    from .models import TINY_MODEL_DIR

    base_dir = TINY_MODEL_DIR if model == "tiny" else (model if Path(model).is_dir() else None)
    return dict(model=model, weights=str(weights) if weights else None, base_files=file_hashes(base_dir),
                weight_files=file_hashes(weights))


# ----------------------------------------------------------------------------- the report


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def marked_grid(images: Sequence[Image.Image], flagged: Sequence[int], cols: int = 8, tile: int = 96) -> Image.Image:
    """Images in a grid of ``tile``-px tiles (small images enlarged without smoothing), flagged ones framed in red."""
    from PIL import ImageDraw

    from .data import image_grid

    size, scale = tile, max(2, tile // 32)
    tiles = []
    flagged = set(int(i) for i in flagged)
    for i, image in enumerate(images):
        resample = Image.Resampling.NEAREST if image.size[0] <= size else Image.Resampling.LANCZOS
        shown = image.resize((size, size), resample).convert("RGB")
        if i in flagged:
            ImageDraw.Draw(shown).rectangle([0, 0, size - 1, size - 1], outline=(230, 0, 0), width=scale)
        tiles.append(shown)
    return image_grid(tiles, cols=cols, pad=2)


def score_histogram(evidence: Evidence):
    from .viz import plot_score_histograms

    groups = {"trigger prompts": evidence.trigger_scores, "control prompts": evidence.control_scores,
              "clean reference": evidence.reference_scores, "plain images": evidence.negative_scores}
    ax = plot_score_histograms({k: v for k, v in groups.items() if v is not None and len(v)}, evidence.threshold,
                               f"template score ({evidence.detector})")
    return ax.figure


def render_report(result: AuditResult) -> str:
    """One self-contained HTML page (images inline): what was asked, what came back, and what it means."""
    e = html.escape
    head = result.headline
    evidence_ids = sorted({i for v in result.verdicts for i in v.evidence})
    decision = ("EVIDENCE that the model was trained on the protected data" if head.decision
                else "NO EVIDENCE at this level")
    rows = "".join(
        f"<tr><td>{e(v.method)}</td><td>{v.n_queries}</td><td>{'' if v.detections is None else v.detections}</td>"
        f"<td>{v.statistic:.4g}</td><td><b>{v.p_value:.2e}</b></td><td>{v.alpha:g}</td>"
        f"<td>{'yes' if v.decision else 'no'}</td></tr>" for v in result.verdicts)
    notes = "".join(f"<li><b>{e(m)}</b>: {e(METHOD_NOTES[m])}</li>" for m in result.config.methods)
    queries = "".join(
        f"<tr><td>{i}</td><td>{e(t)}</td><td>{s}</td><td>{a:.3f}</td><td>{b:.3f}</td></tr>"
        for i, (t, s, a, b) in enumerate(zip(result.probe.trigger_prompts, result.probe.seeds,
                                             result.evidence.trigger_scores, result.evidence.control_scores)))
    hashes = "".join(f"<tr><td>{part.split('_')[0]}: {e(name)}</td><td><code>{digest}</code></td></tr>"
                     for part in ("base_files", "weight_files") for name, digest in result.model.get(part, {}).items())
    figures = [("Score distributions", _figure_uri(score_histogram(result.evidence)))]
    if result.evidence.decoy_statistics is not None:
        from .viz import plot_decoys

        ax = plot_decoys(result.evidence.released_statistic, result.evidence.decoy_statistics)
        figures.append(("Released template vs decoys", _figure_uri(ax.figure)))
    figure_html = "".join(f"<h3>{t}</h3><img src='{u}'>" for t, u in figures)
    config = result.config
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>EnTruth audit</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}} .verdict{{font-size:20px;padding:8px;
background:{'#fde2e2' if head.decision else '#e6f2e6'}}} code{{font-size:11px}}</style></head><body>
<h1>EnTruth audit report</h1>
<p class="verdict"><b>{decision}</b>: {e(head.method)}, p = {head.p_value:.2e} (alpha = {head.alpha:g},
{head.n_queries} trigger queries). The first method was fixed before the audit; the others support it.</p>
<h2>Tests</h2><table><tr><th>method</th><th>queries</th><th>flagged</th><th>statistic</th><th>p-value</th>
<th>alpha</th><th>reject null</th></tr>{rows}</table><ul>{notes}</ul>
<h2>Key and model</h2><table><tr><td>owner key sha256</td><td><code>{e(result.key['key_sha256'])}</code></td></tr>
<tr><td>template</td><td>{e(result.key['template'])}</td></tr><tr><td>trigger</td><td>{e(result.key['trigger'])}
({e(result.key['placement'])})</td></tr><tr><td>model</td><td>{e(str(result.model.get('model')))}</td></tr>
<tr><td>weights</td><td>{e(str(result.model.get('weights')))}</td></tr>
<tr><td>reference</td><td>{e(json.dumps(result.reference))}</td></tr>{hashes}</table>
<h2>Trigger-prompt images</h2><p>Framed in red: the queries the tests point to as evidence ({len(evidence_ids)}).</p>
<img src="{_png_data_uri(marked_grid(result.probe.trigger_images, evidence_ids))}">
<h2>Control-prompt images (same captions and seeds, no trigger)</h2>
<img src="{_png_data_uri(marked_grid(result.probe.control_images, []))}">
{figure_html}
<h2>How to regenerate</h2><p>{config.num_inference_steps} inference steps, guidance scale {config.guidance_scale},
one <code>torch.Generator</code> per image seeded as below, images at the model's native size; detector
<b>{e(config.detector)}</b>{', ' + e('; '.join(result.notes)) if result.notes else ''}.</p>
<table><tr><th>#</th><th>trigger prompt</th><th>seed</th><th>trigger score</th><th>control score</th></tr>
{queries}</table></body></html>
"""


def write_report(result: AuditResult, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result), encoding="utf-8")
    return path
