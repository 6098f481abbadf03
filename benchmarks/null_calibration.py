"""False-positive rate of every verification method on clean fine-tunes.

    python -m benchmarks.null_calibration [--models 40] [--steps 1500] [--family mosaic] [--out runs/bench]
        [--train-only | --report-only]

Fine-tunes ``--models`` clean models (the tiny base on the owner's *unprotected* emoji with the ``tiny-cpu``
preset, each with its own seed, so its own data order and noise), each paired with its own owner key (a
``<family>:<seed>`` template and a trigger drawn as ``protect`` draws "auto") whose release it never saw: the
null hypothesis, by construction. Each model is probed with 64 held-out captions with and without its key's
trigger and the images are stored (``probe.npz``), so the report can be rerun without sampling. The report
prints, for each method at alpha = 0.05 and 0.01, the share of clean models flagged, with a one-sided binomial
p-value for "the rate exceeds alpha". Defaults: the demo's settings (the preset's steps, the default family).
The first table (``--family random --steps 500``) predates 6-letter triggers; its runs keep their names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entruth_lite.core import families
from entruth_lite.infringer import presets
from entruth_lite.owner import triggers

from .common import Run, add_run_arguments, design_suffix, fit_and_probe, rate_name, restored

NULL_SEED_OFFSET = 100  # clean models use seeds 100, 101, ...: disjoint from the detection-power runs


def run_name(family: str, steps: int, trigger_length: int) -> str:
    """Folder name of a clean model's run; the first calibration's (random family, 3 letters) keeps its own."""
    if not design_suffix(family, trigger_length):
        return rate_name(0.0, steps)
    return f"null-{family}-trigger{trigger_length}-steps{steps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--steps", type=int, default=presets.PRESETS["tiny-cpu"]["steps"],
                        help="fine-tuning steps per clean model")
    parser.add_argument("--family", default=families.DEFAULT_FAMILY, choices=sorted(families.FAMILIES))
    parser.add_argument("--trigger-length", type=int, default=triggers.TRIGGER_LENGTH)
    add_run_arguments(parser)
    args = parser.parse_args()
    root = Path(args.out)
    name = run_name(args.family, args.steps, args.trigger_length)
    runs = []
    for i in range(args.models):
        seed = NULL_SEED_OFFSET + i
        if args.report_only:
            runs.append(restored(Run.named(root, name, 0.0, seed, args.steps), args.archive))
        else:
            print(f"clean model {i + 1}/{args.models} (seed {seed})", flush=True)
            runs.append(fit_and_probe(root, 0.0, seed, args.steps, template_seed=seed, queries=args.queries,
                                      name=name, family=args.family, trigger_length=args.trigger_length,
                                      archive=args.archive))
    if not args.train_only:
        from .verification_report import null_report

        null_report([r for r in runs if r.done], root,
                    dict(family=args.family, trigger_letters=args.trigger_length, steps=args.steps))


if __name__ == "__main__":
    main()
