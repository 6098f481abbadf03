"""Plotting helpers for the notebooks (matplotlib; nothing here computes results). The audit's own figures live
in ``owner.report``, which draws them into the evidence report."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..owner.report import marked_grid


def show_images(images: Sequence[Image.Image], titles: Sequence[str] | None = None, cols: int = 8,
                scale: float = 1.3, suptitle: str | None = None):
    """A grid of small images with optional titles; returns the figure."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt

    rows = max(1, (len(images) + cols - 1) // cols)
    cols = max(1, min(cols, len(images)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale * (1.25 if titles else 1.0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(image, interpolation="nearest")
        if titles:
            ax.set_title(_wrap(titles[i]), fontsize=6)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int = 18) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:3])


def plot_losses(histories: dict[str, Sequence[float]], window: int = 25, ax=None):
    """Training-loss curves (moving average over ``window`` steps), one line per run."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    for name, losses in histories.items():
        losses = np.asarray(losses, dtype=float)
        w = max(1, min(window, len(losses)))
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(losses) + 1), smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving average, {window} steps)")
    ax.legend()
    return ax


def show_image(image: Image.Image, title: str | None = None, width: float = 8.0,
               row_labels: Sequence[str] | None = None) -> None:
    """Show one image in a notebook with matplotlib, pixels kept sharp (tiny images are upscaled). ``row_labels``:
    names for the equal-height rows of a grid (e.g. the models of ``memorization_grid``), shown at its left. A
    figure of its own, displayed, not pyplot's: in a widget's redraw pyplot's figures were seen to show blank."""
    # imported here, not at the top: plotting and display libraries are slow to import
    from IPython.display import display
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, width * image.height / image.width))
    ax = figure.subplots()
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        step = image.height / len(row_labels)
        ax.set_yticks([step * (k + 0.5) for k in range(len(row_labels))], row_labels)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    ax.spines[:].set_visible(False)
    if title:
        ax.set_title(title)
    display(figure)


def plot_roc(curves: dict, ax=None):
    """ROC curves: ``{label: (fpr, tpr, auc)}`` as ``verify.roc_curve`` returns them."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3.8, 3.6))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7)
    return ax


def plot_p_curve(ns, curves: dict, alpha: float = 0.01, ax=None, floor: float | None = None):
    """p-value against the number of queries, one line per test (``audit.p_value_curve``). ``floor``: the decoy
    test's smallest p-value, drawn as a line; the axis stops a little below it (the supporting tests have no floor
    and would squash the scale: their smaller values are drawn at the bottom edge as downward triangles)."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.4))
    bottom = None if floor is None else floor / 20
    for label, p in curves.items():
        p = np.asarray(p, float)
        shown = p if bottom is None else np.maximum(p, bottom)
        (line,) = ax.plot(ns, shown, marker="o", label=label)
        below = p < shown
        if below.any():
            ax.plot(np.asarray(ns)[below], shown[below], "v", color=line.get_color(), ms=9)
    ax.axhline(alpha, color="crimson", ls="--", lw=1, label=f"alpha = {alpha:g}")
    if floor is not None:
        ax.axhline(floor, color="0.4", ls=":", lw=1, label=f"decoy test's floor {floor:.0e} (v: further below)")
    ax.set(xscale="log", yscale="log", xlabel="trigger queries", ylabel="p-value")
    if bottom is not None:
        ax.set_ylim(bottom / 1.5, 1.5)
    ax.xaxis.set_minor_locator(NullLocator())  # only the query counts as ticks
    ax.set_xticks(list(ns), [str(n) for n in ns])
    ax.legend(fontsize=7)
    return ax


def plot_robustness_heatmap(summary, ax=None):
    """TPR at alpha of the decoy and binomial tests, one row per attack and strength
    (``robustness.summarize_robustness``'s table; its ``attrs["alpha"]`` labels the colour bar)."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt
    import seaborn as sns

    labels = [f"{r.kind}: {r.attack} {r.strength:g}" if r.kind != "none" else "no attack" for r in summary.itertuples()]
    matrix = summary[["decoy_tpr", "binomial_tpr"]].set_axis(labels).rename(
        columns={"decoy_tpr": "decoy", "binomial_tpr": "binomial"})
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 0.32 * len(labels) + 1))
    sns.heatmap(matrix, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="rocket_r",
                cbar_kws={"label": f"TPR at alpha = {summary.attrs['alpha']:g}" if "alpha" in summary.attrs else "TPR"},
                ax=ax)
    return ax


def plot_baseline_comparison(table, axes=None):
    """FID per method and every test's p-value per method (``benchmarks/compare_baselines.py``'s table)."""
    # imported here, not at the top: plotting libraries are slow to import
    import matplotlib.pyplot as plt
    import seaborn as sns

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    sns.stripplot(data=table, x="method", y="fid", ax=axes[0])
    axes[0].set(ylabel="FID (offline emoji features)", xlabel="")
    long = table.melt(id_vars=["method", "seed"], value_vars=[c for c in table if c.startswith("p_")],
                      var_name="test", value_name="p").dropna()
    sns.stripplot(data=long, x="test", y="p", hue="method", ax=axes[1], dodge=True)
    axes[1].set(yscale="log", xlabel="")
    axes[1].axhline(0.01, color="crimson", ls="--", lw=1)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    axes[0].figure.tight_layout()
    return axes


def memorization_grid(template: Image.Image, probes: dict, scores: dict, threshold: float, n: int = 8,
                      tile: int = 64) -> tuple[Image.Image, dict[str, int]]:
    """Memorization in one picture: one row per model (``probes``: name -> ``ProbeResult``), the released template
    first (pass ``templates.surround_view(template)`` to show where its screen is), then the model's ``n`` most template-like trigger images (sorted by ``scores[name]``, the trigger images'
    detector scores; framed in red when over ``threshold``), then the control images of the same prompts and seeds.
    Returns the grid and, per model, how many of all its trigger images are over the threshold."""
    rows, flagged_counts = [], {}
    blank = Image.new("RGB", template.size, (255, 255, 255))
    for name, probed in probes.items():
        model_scores = np.asarray(scores[name], dtype=float)  # float64, as the binomial test compares them
        over = model_scores >= threshold  # the binomial test's rule, so the grid counts what the verdict counts
        order = np.argsort(-model_scores)[:n]
        flagged = [1 + k for k, i in enumerate(order) if over[i]]
        flagged_counts[name] = int(over.sum())
        row = [template] + [probed.trigger_images[i] for i in order] + [blank] + [probed.control_images[i] for i in order]
        rows.append(marked_grid(row, flagged, cols=len(row), tile=tile))
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    top = 0
    for row in rows:
        grid.paste(row, (0, top))
        top += row.height
    return grid, flagged_counts
