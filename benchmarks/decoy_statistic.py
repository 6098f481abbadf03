"""Which statistic should the decoy test rank? Chosen on one half of the stored runs, reported on the other.

    python -m benchmarks.decoy_statistic [--decoys 999999] [--out runs/bench] [--results benchmarks/results]
        [--rescore-all]

Any statistic computed the same way for the released template and every decoy keeps the decoy test exact, so the
choice is about power only, and power must be judged on runs the choice did not see. Every stored probe in the run
folders is used as it is found: fine-tunes on a protected release (the detection-power runs of the collection's key
design, the memorization sweep's runs of that design, and the last snapshot of each frontier run) and clean models
(the null-calibration runs, clean power runs, and the frontier's base model, which never saw any release). Each run
goes to the *choose* or the *report* half by a hash of its folder name (``half_of``), fixed before any run was
scored.

For each probe: the released template's and up to ``--decoys`` decoys' projection and unit scores of the trigger,
control and plain images (the owner's, through the base VAE), every candidate statistic of them, and its p-value by
the audit's sequential rule (``verify.SequentialDecoyCount``: stop once 20 decoys reach it; floor 1 / (decoys + 1)), all
candidates from one stream of decoys. With enough decoys the floor no longer ties the strong candidates, so the
choice sees how far each one separates a guilty model from its decoys. Candidates: the audit's
``decoys.STATISTIC_NAMES`` (functions of the per-query trigger-minus-control differences of projection scores, and
the same functions of unit scores), and ``plain-count``, the number of trigger images over the template's own
plain-image threshold (1 % of plain images above it), which reads plain images per decoy. The chosen statistic is
the one detecting the most protected models at alpha = 0.01 on the choose half (ties: the larger mean -log10 p);
the report half's table is the result, and ``decoy_statistic_null.csv`` every candidate's false positives on the
clean models. Per-run counts are cached (``decoy-counts-*.json`` in each run); a run the shipped per-run table
already holds at the same ``--decoys`` has only its unit candidates counted, the rest read from that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from entruth_lite.core import data, families
from entruth_lite.core.progress import tqdm
from entruth_lite.owner import decoys, detect, keys, probe, verify

from . import null_calibration
from .common import FPR, NULL_FORMATS, design_suffix, false_positive_row, plain_negatives, write_table

ALPHA = 0.01
QUERY_COUNTS = (4, 8, 16, 32, 64)  # query_budget reads the same counts


def half_of(name: str) -> str:
    """'choose' or 'report', from a hash of the run's name: fixed before anything was scored."""
    return ("choose", "report")[hashlib.sha256(f"decoy-statistic|{name}".encode()).digest()[0] % 2]


def _plain_count(trigger: np.ndarray, plain: np.ndarray, differences: np.ndarray) -> np.ndarray:
    """Trigger images at or over each template's own threshold (the score 1 % of plain images exceed), ties
    broken by the mean difference (a fixed function of the same scores, so still one statistic)."""
    k = min(int(np.floor(FPR * plain.shape[1])), plain.shape[1] - 1)
    threshold = np.nextafter(np.sort(plain, axis=1)[:, plain.shape[1] - k - 1], np.inf)
    return (trigger >= threshold[:, None]).sum(axis=1) + 1e-3 * np.tanh(differences.mean(axis=1))


def candidate_statistics(trigger: np.ndarray, control: np.ndarray, plain: np.ndarray | None = None,
                         unit: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every candidate's value for each template (rows: one per template), from projection scores; ``plain-count``
    only with ``plain``, and the ``unit-`` statistics only with ``unit``: the (trigger, control) unit scores."""
    differences = trigger - control
    out = {name: function(differences) for name, function in decoys.STATISTICS.items()}
    if plain is not None:
        out["plain-count"] = _plain_count(trigger, plain, differences)
    if unit is not None:
        out.update(unit_statistics(*unit))
    return out


def unit_statistics(trigger: np.ndarray, control: np.ndarray) -> dict[str, np.ndarray]:
    """The ``unit-`` candidates' values for each template, from (trigger, control) unit scores."""
    return {decoys.UNIT + name: function(trigger - control) for name, function in decoys.STATISTICS.items()}


def _counts_file(folder: Path, probe_file: Path, k: int, only: str = "") -> Path:
    return folder / f"decoy-counts-{probe_file.stem}-{k}{'-' + only if only else ''}.json"


def cached_counts(folder: Path, probe_file: Path, k: int) -> dict[str, verify.SequentialDecoyCount] | None:
    """What ``statistics_of_run`` stored for this probe and ``k``, every candidate and the unit ones alone merged
    (None if it has not run): what ``query_budget`` reads instead of drawing the same decoys again."""
    found = {}
    for cache in (_counts_file(folder, probe_file, k), _counts_file(folder, probe_file, k, "unit")):
        if cache.is_file():
            found.update({name: verify.SequentialDecoyCount(**fields)
                          for name, fields in json.loads(cache.read_text()).items()})
    return found or None


def statistics_of_run(folder: Path, probe_file: Path, root: Path, k: int, progress: bool = True,
                      unit_only: bool = False) -> dict[str, verify.SequentialDecoyCount]:
    """Each candidate's sequential decoy count (``verify.SequentialDecoyCount``, the audit's rule) at each of
    ``QUERY_COUNTS``, from one stream of up to ``k`` decoys drawn in the audit's chunks. The stream runs until every
    candidate has stopped, so only the strongest statistics of a guilty model pay for all ``k``; plain images are
    scored only while ``plain-count`` still runs. ``unit_only``: the ``unit-`` candidates alone (what a table of
    the others at the same ``k`` lacks). Cached in the run's folder."""
    key = keys.load_key(folder / "key")
    probed = probe.load_probe(probe_file)
    n = len(probed.trigger_images)
    query_counts = sorted({q for q in QUERY_COUNTS if q < n} | {n})  # a smaller probe: its own size
    candidates = [decoys.UNIT + name for name in decoys.STATISTICS]
    if not unit_only:
        candidates += [*decoys.STATISTICS, "plain-count"]
    wanted = [f"{name}@{q}" for name in candidates for q in query_counts]
    stored = cached_counts(folder, probe_file, k) or {}
    if all(name in stored for name in wanted):
        return {name: stored[name] for name in wanted}
    size = decoys.working_size(key.template)
    trigger, control = decoys.probe_arrays(probed, size)
    plain = None if unit_only else data.image_array(plain_negatives(root, key), (size, size))

    def values_of(seeds: list[int], with_plain: bool) -> dict[str, np.ndarray]:
        members = families.member_arrays(key.template.family, seeds, size)
        unit = detect.projection_scores(detect.projection_weights(*members, unit=True),
                                        np.concatenate([trigger, control]))
        if not unit_only:
            scores = detect.projection_scores(detect.projection_weights(*members),
                                              np.concatenate([trigger, control] + ([plain] if with_plain else [])))
        out = {}
        for queries in query_counts:
            unit_pair = (unit[:, :queries], unit[:, n:n + queries])
            values = unit_statistics(*unit_pair) if unit_only else candidate_statistics(
                scores[:, :queries], scores[:, n:n + queries], scores[:, 2 * n:] if with_plain else None, unit_pair)
            out.update({f"{name}@{queries}": value for name, value in values.items()})
        return out

    released = values_of([families.random_seed_of(key.template)], True)
    counts = {name: verify.SequentialDecoyCount(float(value[0]), k) for name, value in released.items()}
    seeds = families.decoy_seeds(key.template, key.key_sha256)
    chunk, drawn = decoys.FIRST_CHUNK, 0
    with tqdm(total=k, desc=f"decoys ({folder.name})", unit="decoy", disable=not progress, mininterval=5) as bar:
        while not all(count.done for count in counts.values()):
            take = min(chunk, k - drawn)
            with_plain = any(not count.done for name, count in counts.items() if name.startswith("plain-count@"))
            for name, value in values_of(list(itertools.islice(seeds, take)), with_plain).items():
                counts[name].update(value)
            drawn, chunk = drawn + take, min(2 * chunk, decoys.LARGEST_CHUNK)
            bar.update(take)
    _counts_file(folder, probe_file, k, "unit" if unit_only else "").write_text(
        json.dumps({name: dataclasses.asdict(count) for name, count in counts.items()}))
    return counts


def stored_runs(root: Path) -> list[dict]:
    """Every stored probe of the collection's key design, with whether its model saw the release."""
    runs = []
    design = design_suffix("mosaic", 6)
    for folder in sorted(Path(root).glob(f"rate*-steps1500{design}-seed*")):  # detection_power's run folders
        if (folder / "probe.npz").is_file():
            guilty = not folder.name.startswith("rate0-")
            runs.append(dict(run=folder.name, folder=folder, probe=folder / "probe.npz", guilty=guilty))
    for folder in sorted(Path(root).glob(f"mem-*{design}*-rate*-seed*")):  # memorization_sweep's, all protected
        if (folder / "probe.npz").is_file():
            runs.append(dict(run=folder.name, folder=folder, probe=folder / "probe.npz", guilty=True))
    for folder in sorted(Path(root).glob(f"{null_calibration.run_name('mosaic', 1500, 6)}-seed*")):
        if (folder / "probe.npz").is_file():
            runs.append(dict(run=folder.name, folder=folder, probe=folder / "probe.npz", guilty=False))
    for folder in sorted(Path(root).glob("frontier-*")):
        snapshots = sorted((folder / "probes").glob("step-*.npz")) if (folder / "done.json").is_file() else []
        if snapshots:
            runs.append(dict(run=folder.name, folder=folder, probe=snapshots[-1], guilty=True))
            runs.append(dict(run=f"{folder.name}/base", folder=folder, probe=folder / "probes" / "base.npz",
                             guilty=False))
    return runs


def shipped_rows(table: Path, k: int) -> dict[str, list[dict]]:
    """The per-run table's rows of the candidates that are not ``unit-`` ones, counted at ``k`` decoys, by run: the
    same decoys and rule, so only the unit candidates need drawing again."""
    import pandas as pd

    if not table.is_file():
        return {}
    rows = pd.read_csv(table)
    rows = rows[(rows["max_decoys"] == k) & ~rows["statistic"].str.startswith(decoys.UNIT)]
    return {run: group.to_dict("records") for run, group in rows.groupby("run")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoys", type=int, default=999_999,
                        help="the most decoys a run may draw (the audit's default)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--rescore-all", action="store_true",
                        help="do not read the shipped per-run table: count every candidate (the runs' own "
                        "decoy-counts caches are still read)")
    args = parser.parse_args(argv)
    root = Path(args.out)
    shipped = {} if args.rescore_all else shipped_rows(Path(args.results) / "decoy_statistic_runs.csv", args.decoys)
    rows = []
    for run in stored_runs(root):
        known = shipped.get(run["run"], [])
        rows.extend(known)
        counts = statistics_of_run(run["folder"], run["probe"], root, args.decoys, unit_only=bool(known))
        for name, count in counts.items():
            statistic, queries = name.split("@")
            rows.append(dict(run=run["run"], half=half_of(run["run"]), guilty=run["guilty"], statistic=statistic,
                             queries=int(queries), max_decoys=args.decoys, p_value=count.p_value,
                             decoys_drawn=count.drawn))
        print(f"{run['run']}: scored", flush=True)
    write_table(rows, Path(args.results) / "decoy_statistic_runs.csv", dict(p_value=".2e"))
    write_table(summarize(rows), Path(args.results) / "decoy_statistic.csv", dict(median_p=".1e", mean_log10_p=".2f"))
    write_table(null_summary(rows), Path(args.results) / "decoy_statistic_null.csv", NULL_FORMATS)


def null_summary(rows: list[dict], queries: int = max(QUERY_COUNTS)) -> list[dict]:
    """Every candidate's false positives on the clean models of both halves (exactness does not depend on the
    choice) that have ``queries`` queries (``common.false_positive_row``; smaller probes, e.g. a frontier's base
    model, are left out)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    clean = table[~table["guilty"].astype(bool) & (table["queries"] == queries)]
    return [dict(statistic=statistic, queries=queries, max_decoys=int(group["max_decoys"].max()))
            | false_positive_row(group["p_value"]) for statistic, group in clean.groupby("statistic", sort=False)]


def summarize(rows: list[dict]):
    """Per half, statistic and query count: protected models detected at ``ALPHA``, clean models flagged, and the
    mean -log10 p of the protected ones; ``chosen`` marks the statistic the choose half picks."""
    import pandas as pd

    table = pd.DataFrame(rows)
    out = []
    for (half, statistic, queries), group in table.groupby(["half", "statistic", "queries"]):
        guilty, clean = group[group["guilty"]], group[~group["guilty"]]
        out.append(dict(half=half, statistic=statistic, queries=queries, max_decoys=int(group["max_decoys"].max()),
                        protected=len(guilty),
                        detected=int((guilty["p_value"] < ALPHA).sum()), clean=len(clean),
                        clean_flagged=int((clean["p_value"] < ALPHA).sum()),
                        median_p=float(guilty["p_value"].median()) if len(guilty) else float("nan"),
                        mean_log10_p=float(-np.log10(guilty["p_value"]).mean()) if len(guilty) else float("nan")))
    summary = pd.DataFrame(out)
    choose = summary[(summary["half"] == "choose") & (summary["queries"] == max(QUERY_COUNTS))]
    best = choose.sort_values(["detected", "mean_log10_p"], ascending=False)["statistic"].iloc[0] if len(choose) else None
    summary["chosen"] = summary["statistic"] == best
    return summary.to_dict("records")


if __name__ == "__main__":
    main()
