"""Keep finished benchmark runs in the repository, and bring them back on a new machine.

    python -m benchmarks.archive_runs store [--out runs/bench] [--archive benchmarks/results/runs] [PATTERN ...]
    python -m benchmarks.archive_runs restore [--out runs/bench] [--archive benchmarks/results/runs]

A working session's machine is not kept, and a sweep takes longer than a session: ``store`` copies what re-scoring
needs of every finished run whose folder name matches a pattern (``common.archive_run``: the probe, the run's record,
the key; not the model) into the archive, and ``restore`` puts archived runs back under ``--out``, so that
``--report-only`` and the scoring benchmarks (``decoy_statistic``, ``query_budget``) find them, and a resumed sweep
skips them (``--archive`` on a sweep does both as it goes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import Run, archive_run, restore_all

ARCHIVE = Path("benchmarks/results/runs")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["store", "restore"])
    parser.add_argument("patterns", nargs="*", default=["*"], help="run folder names to store (glob)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    args = parser.parse_args(argv)
    if args.action == "store":
        folders = sorted({f for pattern in args.patterns for f in args.out.glob(pattern) if (f / "probe.npz").is_file()})
        for folder in folders:
            archive_run(Run(folder, rate=float("nan"), seed=-1, steps=-1), args.archive)
        print(f"{len(folders)} runs archived in {args.archive}")
    else:
        brought, there = restore_all(args.out, args.archive)
        print(f"{brought} runs restored to {args.out} ({there} were there)")


if __name__ == "__main__":
    main()
