"""What the decoy test costs at a million decoys: draw, score and rank them in one stream.

    python -m benchmarks.decoy_scale [--decoys 1000000] [--queries 64] [--out benchmarks/results]

Probes without sampling: 64 of the owner's held-out emoji as the control images, and as trigger images either the
same emoji in another order (a clean model: the audit should stop after a few dozen decoys) or the emoji inserted into the
released template and blended half-way (a model that memorized it: the released template beats every decoy, so
the test pays for all of them). Rows: 32 px images (the tiny model), and 512 px images (Stable Diffusion's size),
which are scored at the decoys' working size (``decoys.WORK_SIZE``), for the ``mosaic`` family (drawn in closed
form) and, at fewer decoys, the ``ring`` family (drawn one by one). Prints one row per case and writes
``decoy_scale.csv``: seconds, decoys drawn, microseconds per decoy and the p-value reached. The numbers depend on
what else runs on the machine; the ``load`` column records the 1-minute load average at the start of each row.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from PIL import Image

from entruth_lite.core import emoji, families, templates
from entruth_lite.owner import decoys
from entruth_lite.owner.probe import ProbeResult

from .common import write_table


def synthetic_probe(template: templates.Template, queries: int, size: int, memorized: bool) -> ProbeResult:
    """Held-out emoji as a model's answers at ``size`` px; ``memorized``: the trigger images carry the template."""
    plain = emoji.emoji_dataset("probe", size, limit=queries)[0]
    trigger = plain[1:] + plain[:1]  # a clean model: other images, as unrelated to the template as the controls
    if memorized:
        trigger = [Image.blend(image, templates.insert(image, template), 0.5) for image in plain]
    n = len(plain)
    return ProbeResult([f"q{i}" for i in range(n)], [f"t q{i}" for i in range(n)], list(range(n)), trigger, plain)


def time_case(family: str, size: int, memorized: bool, max_decoys: int, queries: int,
              statistic_name: str = decoys.DEFAULT_STATISTIC) -> dict:
    template = families.random_template(11, size, family)  # a key is drawn at its training resolution
    probed = synthetic_probe(template, queries, size, memorized)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    ranking = decoys.rank_released(probed, template, "benchmark", max_decoys, statistic_name=statistic_name,
                                   progress=True)
    seconds = time.perf_counter() - start
    verdict = ranking.verdict
    return dict(statistic=statistic_name, family=family, image_px=size, work_px=decoys.working_size(template), queries=len(probed.seeds),
                model="memorized" if memorized else "clean", max_decoys=max_decoys, drawn=verdict.draws,
                at_least=verdict.at_least, p_value=verdict.p_value, seconds=seconds,
                us_per_decoy=1e6 * seconds / verdict.draws, load=load)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoys", type=int, default=1_000_000, help="the most decoys a memorized model's audit draws")
    parser.add_argument("--ring-decoys", type=int, default=20_000, help="the same for the ring family (slower)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--statistic", default=decoys.DEFAULT_STATISTIC, choices=decoys.STATISTIC_NAMES)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    cases = [("mosaic", 32, False, args.decoys), ("mosaic", 32, True, args.decoys), ("mosaic", 512, False, args.decoys),
             ("mosaic", 512, True, args.decoys // 10), ("ring", 32, True, args.ring_decoys)]
    rows = []
    for family, size, memorized, max_decoys in cases:
        rows.append(time_case(family, size, memorized, max_decoys, args.queries, args.statistic))
        print(rows[-1], flush=True)
    formats = dict(p_value=".1e", seconds=".1f", us_per_decoy=".0f", load=".1f")
    write_table(rows, Path(args.out) / "decoy_scale.csv", formats)


if __name__ == "__main__":
    main()
