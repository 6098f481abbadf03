"""How long ``make test``'s pytest takes, per group of tests: where the suite's minutes go.

    python -m benchmarks.suite_time [--xml runs/bench/suite.xml] [--report-only] [-- PYTEST ARGS]

Runs the suite once (pytest with a JUnit XML report; extra arguments after ``--`` go to pytest, e.g. ``-n 2``) and
prints the wall time, and per test file the summed test time, the number of tests and the slowest test; with
``--report-only``, reads an XML written before. Writes ``suite_time.csv`` next to the XML. Run it on a quiet
machine: other jobs on the two cores slow every test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .common import write_table


def test_times(xml: Path) -> list[dict]:
    """One row per test case of a JUnit XML report: its file (group), name and seconds."""
    rows = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x, or tests.test_x.TestClass
        group = next((p for p in parts if p.startswith("test_")), parts[-1] or "?")
        rows.append(dict(group=group, test=case.get("name", ""), seconds=float(case.get("time", 0.0))))
    return rows


def by_group(rows: list[dict]) -> list[dict]:
    """Per group: tests, summed seconds, the slowest test; largest first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    table = [dict(group=group, tests=len(cases), seconds=sum(c["seconds"] for c in cases),
                  slowest=max(cases, key=lambda c: c["seconds"])["test"],
                  slowest_seconds=max(c["seconds"] for c in cases)) for group, cases in groups.items()]
    return sorted(table, key=lambda row: -row["seconds"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xml", type=Path, default=Path("runs/bench/suite.xml"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(ours)
    if not args.report_only:
        args.xml.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={args.xml}",
                        *pytest_args], check=False)
        print(f"pytest wall time: {time.time() - started:.0f} s")
    table = by_group(test_times(args.xml))
    total = sum(row["seconds"] for row in table)
    write_table(table, args.xml.with_name("suite_time.csv"), dict(seconds=".1f", slowest_seconds=".1f"))
    print(f"{sum(r['tests'] for r in table)} tests, {total:.0f} s summed over tests (tests run side by side sum to "
          "more than the wall time)")


if __name__ == "__main__":
    main()
