"""How far apart are a random family's members after the VAE? The ceiling on the decoy test's power.

    python -m benchmarks.template_family [--families random mosaic] [--members 20] [--decoys 999] [--out runs/bench]

The decoy test ranks the released template among decoys from its family. Even a model that reproduced the
template perfectly can only be detected if, on its images, the template outscores every decoy: a family whose
members look alike after the VAE caps the test's power at every rate, whatever the model memorized. For each
member (seeds 0..members-1), ``detect.family_spread`` inserts a few of the owner's emoji into it, round-trips them
through the tiny model's VAE (the most a latent model can learn of the template), and scores them with the member
and with 999 of its decoys: ``own`` is the member's mean score (1 = the surround survives exactly), ``max_ratio`` the best
decoy's score over ``own`` (>= 1: this member cannot rank first even when perfectly memorized, so its
p-value stays above the floor 1 / (K + 1)), and
``decoys_at_or_above`` how many decoys reach ``own``. No training; minutes on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from entruth_lite.core import emoji, families
from entruth_lite.owner import detect

from .common import base_pipeline, write_table

FOREGROUNDS = 8  # held-out emoji inserted into each member


def member_rows(family: str, seed: int, decoys: int, foregrounds) -> list[dict]:
    """One row per detector for the member ``<family>:<seed>``."""
    member, vae = families.random_template(seed, 32, family), base_pipeline().vae
    rows = []
    for method in ("projection", "ncc"):
        spread = detect.family_spread(member, foregrounds, vae, decoys, method)
        rows.append(dict(family=family, seed=seed, method=method, own=spread.own,
                         q99_ratio=float(np.quantile(spread.decoy_scores, 0.99) / spread.own),
                         max_ratio=spread.max_ratio, decoys_at_or_above=spread.decoys_at_or_above))
    return rows


def summarize(table):
    """One row per family and detector: retention after the VAE and the closest decoys."""
    return table.groupby(["family", "method"], sort=False).agg(
        members=("seed", "count"), own_median=("own", "median"), own_min=("own", "min"),
        max_ratio_median=("max_ratio", "median"), max_ratio_worst=("max_ratio", "max"),
        members_with_a_decoy_at_or_above=("decoys_at_or_above", lambda n: int((n > 0).sum()))).reset_index()


def main() -> None:
    from tqdm.auto import tqdm

    from .common import markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(families.FAMILIES), choices=list(families.FAMILIES))
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--decoys", type=int, default=999)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    foregrounds = [emoji.render_emoji(path) for path, _ in emoji.emoji_splits().probe[:FOREGROUNDS]]
    rows = []
    for family in args.families:
        for seed in tqdm(range(args.members), desc=family):
            rows.extend(member_rows(family, seed, args.decoys, foregrounds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = write_table(rows, out / "template_family.csv", dict(own=".3f", q99_ratio=".3f", max_ratio=".3f"))
    print("\n" + markdown_table(summarize(table), dict(own_median=".3f", own_min=".3f", max_ratio_median=".3f",
                                                        max_ratio_worst=".3f")))


if __name__ == "__main__":
    main()
