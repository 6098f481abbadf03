"""Plotting helpers for the notebooks (matplotlib; nothing here computes results)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image


def show_images(images: Sequence[Image.Image], titles: Sequence[str] | None = None, cols: int = 8,
                scale: float = 1.3, suptitle: str | None = None):
    """A grid of small images with optional titles; returns the figure."""
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
    import matplotlib.pyplot as plt
    import numpy as np

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


def show_image(image: Image.Image, title: str | None = None, width: float = 8.0) -> None:
    """Show one image in a notebook with matplotlib, pixels kept sharp (tiny images are upscaled)."""
    import matplotlib.pyplot as plt

    plt.figure(figsize=(width, width * image.height / image.width))
    plt.imshow(image, interpolation="nearest")
    plt.axis("off")
    if title:
        plt.title(title)
    plt.show()
