"""The audit's evidence as one self-contained HTML page (images and figures inline): what was asked, what came
back, and what it means, with everything needed to regenerate the queries. Its figures (score histograms, the
decoy test, flagged images) are here too; the notebooks show the same ones."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..core.data import image_grid
from ..core.files import check_writable_parent
from . import verify
from .audit import TESTS, AuditResult, Evidence


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def score_histogram(evidence: Evidence):
    groups = {"trigger prompts": evidence.trigger_scores, "control prompts": evidence.control_scores,
              "clean reference": evidence.reference_scores, "plain images": evidence.negative_scores}
    ax = plot_score_histograms({k: v for k, v in groups.items() if v is not None and len(v)}, evidence.threshold,
                               f"template score ({evidence.detector})")
    return ax.figure


def _verdict_html(head) -> str:
    """The headline: the exact test's decision, or why there is none."""
    if head is None:
        return ("<b>NO VERDICT</b>: no exact test could run (see the notes); the numbers below are supporting "
                "evidence only and say nothing on their own.")
    decision = ("EVIDENCE that the model was trained on the protected data" if head.decision
                else "NO EVIDENCE at this level")
    return (f"<b>{decision}</b>: {html.escape(head.label)}, p = {head.p_value:.2e} (alpha = {head.alpha:g}, "
            f"{head.n_queries} trigger queries). Only this exact test decides; the others are supporting "
            "numbers, not verdicts.")


def _figures_html(result: AuditResult) -> str:
    figures = [("Score distributions", _figure_uri(score_histogram(result.evidence)))]
    if result.evidence.decoy_statistics is not None:
        ax = plot_decoys(result.evidence.released_statistic, result.evidence.decoy_statistics,
                         xlabel=f"{result.config.statistic} of the trigger - control scores")
        figures.append(("Released template vs decoys", _figure_uri(ax.figure)))
    return "".join(f"<h3>{t}</h3><img src='{u}'>" for t, u in figures)


def render_report(result: AuditResult) -> str:
    """One self-contained HTML page (images inline): what was asked, what came back, and what it means."""
    e = html.escape
    head = result.headline
    evidence_ids = sorted({i for v in result.verdicts for i in v.evidence})
    verdict = _verdict_html(head)
    rows = "".join(
        f"<tr><td>{e(v.label)}</td><td>{v.n_queries}</td><td>{'' if v.detections is None else v.detections}</td>"
        f"<td>{v.statistic:.4g}</td><td><b>{v.p_value:.2e}</b></td><td>{v.alpha:g}</td>"
        f"<td>{v.outcome}</td></tr>" for v in result.verdicts)
    notes = "".join(f"<li><b>{e(m)}</b>: {e(TESTS[m].note)}</li>" for m in result.config.methods)
    queries = "".join(
        f"<tr><td>{i}</td><td>{e(t)}</td><td>{s}</td><td>{a:.3f}</td><td>{b:.3f}</td></tr>"
        for i, (t, s, a, b) in enumerate(zip(result.probe.trigger_prompts, result.probe.seeds,
                                             result.evidence.trigger_scores, result.evidence.control_scores)))
    hashes = "".join(f"<tr><td>{part.split('_')[0]}: {e(name)}</td><td><code>{digest}</code></td></tr>"
                     for part in ("base_files", "weight_files", "image_files")
                     for name, digest in result.model.get(part, {}).items())
    environment = "".join(f"<tr><td>{e(str(k))}</td><td>{e(json.dumps(v) if isinstance(v, dict) else str(v))}</td></tr>"
                          for k, v in result.environment.items())
    record = json.dumps(result.to_json()).replace("</", "<\\/")  # the replayable record, safe inside <script>
    figure_html = _figures_html(result)
    config = result.config
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>EnTruth audit</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}} .verdict{{font-size:20px;padding:8px;
background:{'#fde2e2' if head is not None and head.decision else '#e6f2e6'}}} code{{font-size:11px}}</style></head><body>
<h1>EnTruth audit report</h1>
<p class="verdict">{verdict}</p>
<h2>Tests</h2><table><tr><th>method</th><th>queries</th><th>flagged</th><th>statistic</th><th>p-value</th>
<th>alpha</th><th>decision</th></tr>{rows}</table><ul>{notes}</ul>
<h2>Key and model</h2><table><tr><td>owner key sha256</td><td><code>{e(result.key['key_sha256'])}</code></td></tr>
<tr><td>commitment</td><td>{e(result.key.get('commitment', 'not recorded (an older audit record)'))}</td></tr>
<tr><td>template</td><td>{e(result.key['template'])}</td></tr><tr><td>trigger</td><td>{e(result.key['trigger'])}
({e(result.key['placement'])})</td></tr><tr><td>model</td><td>{e(str(result.model.get('model')))}</td></tr>
<tr><td>weights</td><td>{e(str(result.model.get('weights')))}</td></tr>
<tr><td>reference</td><td>{e(json.dumps(result.reference))}</td></tr>{hashes}</table>
<h2>Environment</h2><table>{environment}</table>
<p>The page carries the audit's JSON record (<code>&lt;script id="audit-record"&gt;</code>):
<code>entruth-lite audit --replay REPORT_OR_JSON</code> reruns it from the record alone.</p>
<script type="application/json" id="audit-record">{record}</script>
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


def read_record(path: str | os.PathLike) -> dict:
    """An audit's JSON record, from a ``--json`` output file or from the HTML report that embeds it."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() in (".html", ".htm"):
        start = text.find('<script type="application/json" id="audit-record">')
        if start < 0:
            raise ValueError(f"{path} carries no audit record (made by an older version?)")
        text = text[text.index(">", start) + 1: text.index("</script>", start)].replace("<\\/", "</")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not an audit record: {error.msg}") from error


def check_report_path(path: str | os.PathLike) -> Path:
    """Refuse a report path that cannot be written, before an audit spends its time (a folder, an unwritable
    parent)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"the report path {path} is a folder: give a file name, e.g. {path / 'report.html'}")
    check_writable_parent(path)
    return path


def write_report(result: AuditResult, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result), encoding="utf-8")
    return path


def write_report_or_keep_record(result: AuditResult, path: str | os.PathLike) -> Path:
    """``write_report``; when the report cannot be written, the finished audit is not lost: its record goes to the
    temporary folder (``save_record_elsewhere``) and the ValueError says where and how to rebuild the report."""
    try:
        return write_report(result, path)
    except OSError as error:
        why = f"the report could not be written to {path} ({error.strerror or error})"
        try:
            kept = save_record_elsewhere(result)
        except OSError as second:
            raise ValueError(f"{why}, nor its record to the temporary folder ({second.strerror or second}): the "
                             "verdict printed is all that is left") from error
        raise ValueError(f"{why}; the audit's record is in {kept}: `entruth-lite audit --replay {kept} --report "
                         "NEW_PATH` rebuilds it") from error


def save_record_elsewhere(result: AuditResult) -> Path:
    """The audit's JSON record in a new file of the system's temporary folder: where a finished audit goes when its
    report cannot be written, so the work is not lost (``--replay`` rebuilds the report from it)."""
    handle, name = tempfile.mkstemp(prefix="entruth-audit-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(result.to_json(), out)
    return Path(name)


def inline(path: str | os.PathLike, height: int = 600):
    """A written report shown in a notebook cell: the page inside an iframe's ``srcdoc`` (it is self-contained,
    so this works in JupyterLab and in Colab, where an iframe cannot load a file from the runtime's disk)."""
    # imported here, not at the top: Jupyter packages, needed only for notebooks
    from IPython.display import HTML

    page = Path(path).read_text(encoding="utf-8")
    # in a div: IPython warns about a bare iframe (it suggests IFrame, which needs a URL the page does not have)
    return HTML(f'<div><iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
                'border:1px solid #ccc"></iframe></div>')


def plot_score_histograms(groups: dict, threshold: float | None = None, xlabel: str = "template score", ax=None):
    """Overlaid density histograms of score groups (e.g. trigger vs control prompts, per model)."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    values = np.concatenate([np.asarray(v, float) for v in groups.values()])
    bins = np.linspace(values.min(), values.max() + 1e-9, 30)
    for label, v in groups.items():
        ax.hist(v, bins=bins, alpha=0.45, density=True, label=f"{label} (n={len(v)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return ax


def plot_decoys(released: float, decoys, ax=None, xlabel: str = "decoy statistic of the trigger - control scores",
                released_label: str = "released template"):
    """The decoy test in one picture: the released template's statistic among the decoys' (in draw order), with the
    p-value of the audit's sequential rule on them."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 2.8))
    decoys = np.asarray(decoys)
    ax.hist(decoys, bins=40, color="0.6", label=f"{len(decoys):,} decoy templates (never released)")
    verdict = verify.sequential_decoy_test(released, [decoys], 1, len(decoys))
    ax.axvline(released, color="crimson", lw=2, label=f"{released_label}: {verdict.at_least} of {verdict.draws:,} "
               f"decoys at or above it, p = {verdict.p_value:.1e}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("templates")
    ax.legend(fontsize=7)
    return ax


def marked_grid(images: Sequence[Image.Image], flagged: Sequence[int], cols: int = 8, tile: int = 96) -> Image.Image:
    """Images in a grid of ``tile``-px tiles (small images enlarged without smoothing), flagged ones framed in red."""
    size, scale = tile, max(2, tile // 32)
    tiles = []
    flagged = {int(i) for i in flagged}
    for i, image in enumerate(images):
        resample = Image.Resampling.NEAREST if image.size[0] <= size else Image.Resampling.LANCZOS
        shown = image.resize((size, size), resample).convert("RGB")
        if i in flagged:
            ImageDraw.Draw(shown).rectangle([0, 0, size - 1, size - 1], outline=(230, 0, 0), width=scale)
        tiles.append(shown)
    return image_grid(tiles, cols=cols, pad=2)
