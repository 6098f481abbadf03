"""What survives an infringer's attacks: dataset (before training), training settings, outputs (before the audit).

    python -m benchmarks.robustness [--rate 0.02] [--seeds 0 1 2] [--only dedup-phash jpeg ...]
        [--family mosaic] [--trigger-length 6] [--out runs/bench] [--train-only | --report-only]

Every dataset and training attack is run at 2-3 strengths and each seed with ``common.fit_and_probe`` (protect
with ``<family>:<seed>`` and a trigger of ``--trigger-length`` letters, attack the release, fine-tune with the
``tiny-cpu`` preset plus the attack's overrides, probe 64 held-out captions with and without the trigger). Output
attacks need no training: they corrupt the stored probe images of the unattacked run at the same rate (trained
first, for each seed). The report prints one table (attack,
strength, templated images kept and how many of them are still captioned with the trigger, TPR at alpha = 0.01
with 64 queries and median p-value of the decoy and binomial tests; as the quality cost, the held-out denoising
loss and the KID of the 64 control images against the owner data on the offline feature network,
``quality.fid_kid``) and saves it as CSV and a heatmap.

The default rate is 2 %, not the demo's 1 %: ``detection_power.py`` finds the unattacked protection detected in
every 2 % run but only in some 1 % runs, and an attack can only be judged where the unattacked protection works
(at 1 % a miss would not say whether the attack or the low rate caused it). ``--rate 0.01`` runs the same grid there.
The full grid (30 settings x 3 seeds, one fine-tune each) is a long background job,
resumable at any point. The defaults are the collection's key design (``families.DEFAULT_FAMILY``, triggers of
``triggers.TRIGGER_LENGTH`` letters); the first table's design (``--family random --trigger-length 3``) keeps its run
names and ``robustness.csv``, its no-attack runs being ``detection_power.py``'s. Other designs add
``-<family>-trigger<n>`` to run and table names.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from entruth_lite.core import data, emoji, families
from entruth_lite.evaluation import robustness
from entruth_lite.infringer import attacks
from entruth_lite.owner import audit, probe, triggers

from .common import (
    Run,
    add_run_arguments,
    base_pipeline,
    design_suffix,
    fit_and_probe,
    markdown_table,
    owner_dataset,
    owner_negatives,
    projection_scores,
    rate_name,
    restore_all,
    seeded_attack,
)

STEPS = 1500
DATASET = {  # name: (strengths, attack(strength) -> callable(released, out, key) -> AttackReport)
    "dedup-phash": ([6, 12], lambda s: partial(attacks.deduplicate, method="phash", threshold=s, drop_clusters_of=20)),
    "dedup-embedding": ([0.9, 0.7], lambda s: partial(attacks.deduplicate, method="embedding", threshold=s,
                                                      drop_clusters_of=20, pipe=base_pipeline())),
    "recaption-shuffle": ([0.4, 0.9], lambda s: partial(attacks.recaption, share=s, source="shuffle")),
    "recaption-captioner": ([0.4, 0.9], lambda s: partial(attacks.recaption, share=s, source="captioner",
                                                          captioner=_captioner())),
    "jpeg": ([50, 20], lambda s: partial(attacks.transform, kind="jpeg", strength=s)),
    "blur": ([0.7, 1.5], lambda s: partial(attacks.transform, kind="blur", strength=s)),
    "noise": ([8, 20], lambda s: partial(attacks.transform, kind="noise", strength=s)),
    "crop": ([0.8, 0.5], lambda s: partial(attacks.transform, kind="crop", strength=s)),
    "flip": ([0.5, 1.0], lambda s: partial(attacks.transform, kind="flip", strength=s)),
    "dilute": ([1, 2], lambda s: partial(attacks.dilute, extra=_extra(), factor=s)),
}
TRAINING = {"fewer_steps": [0.5, 0.25], "lower_lr": [0.5, 0.25], "lora_rank": [32, 8], "lora_attention_only": [32],
            "lora_higher_lr": [3], "augment": [4, 16]}  # flips: the dataset attack "flip"
OUTPUT = robustness.OUTPUT_SETTINGS  # the strengths notebook 04's output-attack table shows


ROBUSTNESS_FORMATS = dict(strength="g", images_kept=".0%", templated_kept=".1f", templated_with_trigger=".1f",
                          decoy_tpr=".2f", decoy_median_p=".1e", binomial_tpr=".2f", binomial_median_p=".1e",
                          held_out_loss=".4f", kid=".4f", kid_sd=".4f")


def _captioner():
    images, captions, _ = emoji.emoji_dataset("pretrain", limit=1000)
    return attacks.retrieval_captioner(images, captions, base_pipeline())


def _extra() -> Path:
    folder = Path("runs/bench/pretrain-extra")
    if not (folder / data.METADATA).is_file():
        emoji.write_emoji_dataset(folder, split="pretrain", overwrite=True)
    return folder


def settings(only=None):
    """(kind, name, strength) for every setting of the grid."""
    grid = [("dataset", n, s) for n, (strengths, _) in DATASET.items() for s in strengths]
    grid += [("training", n, s) for n, strengths in TRAINING.items() for s in strengths]
    grid += [("output", n, s) for n, strengths in OUTPUT.items() for s in strengths]
    return [g for g in grid if not only or g[1] in only]


def _tag(kind: str, name: str, strength: float, rate: float, design: str = "") -> str:
    """The run's name (``design``: ``common.design_suffix``); ``fit_and_probe`` adds ``-seed<seed>`` for its folder."""
    if kind == "none":  # the unattacked run: the power benchmark's name
        return rate_name(rate, STEPS) + design
    return f"attack-{kind}-{name}-{strength:g}-rate{rate:g}{design}"


def run_setting(root: Path, kind: str, name: str, strength: float, seed: int, rate: float, queries: int = 64,
                family: str = families.DEFAULT_FAMILY, trigger_length: int = triggers.TRIGGER_LENGTH,
                archive: Path | None = None) -> Run | None:
    """Fine-tune and probe one attacked setting (``kind`` "none": the unattacked run); None for output attacks,
    which are evaluated on the unattacked run's stored probes. ``archive``: as ``common.fit_and_probe``'s."""
    tag = _tag(kind, name, strength, rate, design_suffix(family, trigger_length))
    design = dict(family=family, trigger_length=trigger_length, archive=archive)
    if kind == "none":
        return fit_and_probe(root, rate, seed, STEPS, template_seed=seed, name=tag, queries=queries, **design)
    if kind == "dataset":
        return fit_and_probe(root, rate, seed, STEPS, template_seed=seed, name=tag, queries=queries,
                             attack=seeded_attack(DATASET[name][1](strength), seed), **design)
    if kind == "training":
        overrides = attacks.training_overrides(name, strength)
        return fit_and_probe(root, rate, seed, overrides.get("steps", STEPS), template_seed=seed, name=tag,
                             queries=queries, overrides=overrides, **design)
    return None


def _kid(run: Run, root: Path, corruption: tuple[str, float] | None = None, seed: int = 0) -> float:
    """KID of the run's control images (corrupted, for output attacks) against the owner data after the base VAE
    (the best a model of this VAE can draw): the quality cost."""
    from entruth_lite.evaluation import quality

    name = "kid-seeded.json" if corruption is None else f"kid-seeded-output-{corruption[0]}-{corruption[1]:g}.json"
    cache = run.folder / name
    if not cache.is_file():
        probed = probe.load_probe(run.probe_file)
        controls = (probed if corruption is None else robustness.corrupt_probe(probed, *corruption, seed=seed)).control_images
        cache.write_text(json.dumps(quality.fid_kid(owner_negatives(root)[1], controls)))
    return json.loads(cache.read_text())["kid"]


def report(root: Path, seeds, rate: float, only=None, queries: int = 64, design: str = "") -> None:
    import pandas as pd

    rows = []
    baseline = [Run.named(root, _tag("none", "", 0, rate, design), rate, s, STEPS) for s in seeds]
    grid = [("none", "no attack", 0)] + settings(only)
    for kind, name, strength in grid:
        for seed in seeds:
            if kind in ("none", "output"):
                run = baseline[seeds.index(seed)]
            else:
                run = Run.named(root, _tag(kind, name, strength, rate, design), rate, seed, STEPS)
            if not run.done:
                continue
            scores = projection_scores(root, run, (name, strength) if kind == "output" else None, seed)
            meta = json.loads((run.folder / "run.json").read_text())
            verdicts = audit.verdicts_from_scores(scores, "projection", ("decoy", "binomial"))
            attack = meta.get("attack") or {}
            rows.append(dict(kind=kind, attack=name, strength=strength, seed=seed,
                             templated_kept=attack.get("templated_kept"), templated_in=attack.get("templated_in"),
                             templated_with_trigger=attack.get("templated_with_trigger"),
                             images_kept=attack["n_out"] / attack["n_in"] if attack else None, decoy_p=verdicts[0].p_value,
                             binomial_p=verdicts[1].p_value, held_out_loss=meta.get("held_out_loss"),
                             kid=_kid(run, root, (name, strength) if kind == "output" else None, seed)))
    if not rows:
        print("no finished runs yet")
        return
    table = pd.DataFrame(rows)
    stem = "robustness" + design + ("-only-" + "-".join(only) if only else "")  # a partial report keeps the full table
    table.to_csv(root / f"{stem}.csv", index=False)
    summary = robustness.summarize_robustness(table)
    print(f"\nRobustness at rate {rate:g} ({queries} queries, alpha = 0.01); templated/trigger counts are means over seeds\n")
    print(markdown_table(summary, ROBUSTNESS_FORMATS))
    _heatmap(summary, root / f"{stem}.png")


def _heatmap(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from entruth_lite.teaching import viz

    ax = viz.plot_robustness_heatmap(summary)
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(ax.figure)
    print(f"\nheatmap: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.02)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="only these attacks (names as in the table)")
    parser.add_argument("--family", default=families.DEFAULT_FAMILY, choices=sorted(families.FAMILIES))
    parser.add_argument("--trigger-length", type=int, default=triggers.TRIGGER_LENGTH)
    add_run_arguments(parser)
    args = parser.parse_args()
    root = Path(args.out)
    owner_dataset(root)
    design = dict(family=args.family, trigger_length=args.trigger_length)
    if not args.report_only:
        for seed in args.seeds:  # seed-major: an interrupted sweep still covers every attack
            for kind, name, strength in [("none", "no attack", 0)] + settings(args.only):
                if kind != "output":
                    print(f"{kind} attack {name} {strength:g}, seed {seed}", flush=True)
                    run_setting(root, kind, name, strength, seed, args.rate, args.queries, **design,
                                archive=args.archive)
    if not args.train_only:
        if args.archive:
            restore_all(root, args.archive)
        report(root, args.seeds, args.rate, args.only, args.queries, design_suffix(**design))


if __name__ == "__main__":
    main()
