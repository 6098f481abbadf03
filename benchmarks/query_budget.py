"""How many images must an owner ask a service for? The decoy test's p-value against the number of queries.

    python -m benchmarks.query_budget [--rates 0.005 0.01 0.02] [--seeds 0 1 2] [--queries 4 8 16 32 64]
        [--decoys 999999] [--statistic unit-top-eighth] [--out runs/bench] [--results benchmarks/results]
        [--table query_budget.csv]

Reads the stored probes of the detection-power runs at the collection's key design (``benchmarks.detection_power
--family mosaic --trigger-length 6``; nothing is trained here) and runs the audit's decoy test
(``decoys.rank_released``: up to ``--decoys`` decoys, the sequential rule) on the first n queries of each, for each
n. Writes ``query_budget.csv`` (one row per rate, seed and n: p-value, decoys drawn, seconds) and prints, per rate
and n, the seeds detected at alpha = 0.01 and the worst seed's p-value. Each row is cached in its run's folder.
Where ``benchmarks.decoy_statistic`` already ranked the same decoys (same run, decoy count and n; the stream is the
audit's, so the p-value is the audit's), its counts are read instead (``seconds`` is then empty).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from entruth_lite.owner import decoys, keys, probe, verify

from . import decoy_statistic
from .common import Run, design_suffix, rate_name, write_table

ALPHA = 0.01


def budget_row(run: Run, queries: int, max_decoys: int, statistic: str) -> dict:
    """The decoy test on the first ``queries`` of one run's stored probe, computed once."""
    cache = run.folder / "query-budget" / f"{statistic}-{max_decoys}-{queries}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    counts = decoy_statistic.cached_counts(run.folder, run.probe_file, max_decoys)
    if counts is not None and f"{statistic}@{queries}" in counts:  # the statistic search drew these decoys already
        count = counts[f"{statistic}@{queries}"]
        return dict(rate=run.rate, seed=run.seed, queries=queries, statistic=statistic, max_decoys=max_decoys,
                    p_value=count.p_value, drawn=count.drawn, at_least=count.at_least, seconds=float("nan"))
    key = keys.load_key(run.key)
    start = time.perf_counter()
    ranking = decoys.rank_released(probe.load_probe(run.probe_file), key.template, key.key_sha256, max_decoys,
                                   statistic_name=statistic, alpha=ALPHA, n=queries, progress=False)
    verdict = ranking.verdict
    row = dict(rate=run.rate, seed=run.seed, queries=queries, statistic=statistic, max_decoys=max_decoys,
               p_value=verdict.p_value, drawn=verdict.draws, at_least=verdict.at_least,
               seconds=time.perf_counter() - start)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(row) + "\n")
    return row


def summarize(table):
    """Per rate and query count: seeds, how many the decoy test detected at ``ALPHA``, the median and worst p."""
    return verify.summarize_query_budget(table, ALPHA)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queries", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--decoys", type=int, default=999_999)
    parser.add_argument("--statistic", default=decoys.DEFAULT_STATISTIC, choices=list(decoys.STATISTIC_NAMES))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--table", default="query_budget.csv",
                        help="the results file (another name keeps a subset, e.g. at a million decoys, beside it)")
    args = parser.parse_args(argv)
    import pandas as pd

    rows = []
    for rate in args.rates:
        for seed in args.seeds:
            run = Run.named(Path(args.out), rate_name(rate, args.steps) + design_suffix("mosaic", 6), rate, seed,
                            args.steps)
            if not run.done:
                print(f"no stored probe at {run.folder}: run benchmarks.detection_power first", flush=True)
                continue
            for queries in args.queries:
                rows.append(budget_row(run, queries, args.decoys, args.statistic))
                print(rows[-1], flush=True)
    table = write_table(rows, Path(args.results) / args.table, dict(p_value=".1e", seconds=".1f"))
    if table is not None:
        write_table(summarize(pd.DataFrame(rows)).to_dict("records"),
                    Path(args.out) / f"{Path(args.table).stem}-summary.csv",
                    dict(median_p=".1e", worst_p=".1e"))


if __name__ == "__main__":
    main()
