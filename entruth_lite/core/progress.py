"""Progress bars: ``tqdm.auto``'s, except in a notebook that no browser will draw.

A notebook run headless (``make demo``, ``make test``: the runner sets ``ENTRUTH_HEADLESS=1``) saves a widget bar as
its first frame, so the executed copy would show "0%" forever; there a text bar is used, whose last state is what
the copy keeps."""

from __future__ import annotations

import os

HEADLESS_ENV = "ENTRUTH_HEADLESS"  # set by teaching.notebooks.run_notebook: no browser will ever draw a widget


def tqdm(*args, **kwargs):
    """A ``tqdm`` bar, the text one when headless (``HEADLESS_ENV``), else ``tqdm.auto``'s choice."""
    # imported per call, not at the top: the choice depends on the environment when the bar starts
    if os.environ.get(HEADLESS_ENV, "0") == "1":
        from tqdm.std import tqdm as bar  # the text bar
    else:
        from tqdm.auto import tqdm as bar  # a widget in a live notebook
    return bar(*args, **kwargs)
