"""How often each verification method detects a model fine-tuned on a protected dataset.

    python -m benchmarks.detection_power [--rates 0.05 0.02 0.01 0.005] [--seeds 0 1 2] [--steps 1500]
        [--family random] [--trigger-length 3] [--out runs/bench] [--report-only]

For each alteration rate and seed: protect the owner's emoji with a ``<family>:<seed>`` template, fine-tune
the tiny base with the ``tiny-cpu`` preset (full fine-tune, lr 1e-3), probe with 64 held-out captions with and
without the trigger, and store the images. Clean models at the same settings (rate 0) are trained too: they are
the negatives for AUC and the reference for the reference test. The report prints TPR at alpha = 0.01 and the
median p-value for n = 8, 16, 32, 64 queries, the AUC of each detector, and saves a plot. The defaults are the
first table's key design (``random`` family, 3-letter triggers); another design (``--family mosaic
--trigger-length 6``: the collection's) adds ``common.design_suffix`` to the run names, so its 2 % runs are the
robustness benchmark's no-attack runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entruth_lite.core import families

from .common import (
    LEGACY_FAMILY,
    LEGACY_TRIGGER_LENGTH,
    Run,
    add_run_arguments,
    design_suffix,
    fit_and_probe,
    rate_name,
    restored,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05, 0.02, 0.005, 0.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--family", default=LEGACY_FAMILY, choices=sorted(families.FAMILIES))
    parser.add_argument("--trigger-length", type=int, default=LEGACY_TRIGGER_LENGTH)
    add_run_arguments(parser)
    args = parser.parse_args()
    root = Path(args.out)
    design = design_suffix(args.family, args.trigger_length)
    runs = []
    for seed in args.seeds:  # seed-major: an interrupted sweep still covers every rate
        for rate in args.rates:
            name = rate_name(rate, args.steps) + design
            if args.report_only:
                runs.append(restored(Run.named(root, name, rate, seed, args.steps), args.archive))
            else:
                print(f"rate {rate:g}, seed {seed}", flush=True)
                runs.append(fit_and_probe(root, rate, seed, args.steps, template_seed=seed, queries=args.queries,
                                          name=name, family=args.family, trigger_length=args.trigger_length,
                                          archive=args.archive))
    if not args.train_only:
        from .verification_report import power_report

        power_report([r for r in runs if r.done], root, design=design)


if __name__ == "__main__":
    main()
