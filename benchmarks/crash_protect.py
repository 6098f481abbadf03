"""What a user's crash leaves: ``protect`` killed from outside (a real SIGKILL, no cleanup code runs) at random
moments and between every pair of its renames, then the same ``protect`` run again without ``overwrite``.

After every kill the next plain run must leave a release with its matching key (made now, or finished from the
interrupted run's staged key), or refuse with a message that says what to do; no file of the user's (the source
dataset, a file beside the outputs) may change. Two scenarios: a first protect into new folders, and a protect with
``overwrite`` over an earlier pair. ``python -m benchmarks.crash_protect [--random-kills 50]`` prints one row a trial
and the totals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from entruth_lite.core import data
from entruth_lite.owner import keys, protect

from .common import write_table

# (scenario, rename): the child stops just before its n-th os.replace and the parent kills it there; 0 = just before
# the set-aside earlier release is deleted. A first protect renames twice (release, key); one over an earlier pair
# four times (set the old release aside, release in, set the old key aside, key in).
RENAME_POINTS = [("new", 1), ("new", 2), ("over", 1), ("over", 2), ("over", 3), ("over", 4), ("over", 0)]
CHILD = """
import os, shutil, sys, time
pause_at = int(sys.argv[1])
calls = {"n": 0}
real_replace, real_rmtree = os.replace, shutil.rmtree

def wait_for_the_kill():
    print("paused", flush=True)
    time.sleep(120)

def replace(a, b):
    calls["n"] += 1
    if calls["n"] == pause_at:
        wait_for_the_kill()
    return real_replace(a, b)

def rmtree(path, *args, **kwargs):
    if pause_at == 0 and ".old-" in str(path):
        wait_for_the_kill()
    return real_rmtree(path, *args, **kwargs)

if pause_at >= 0:
    os.replace, shutil.rmtree = replace, rmtree
from entruth_lite.owner import protect
print("ready", flush=True)
protect.protect(sys.argv[2], "mosaic:3", sys.argv[3], sys.argv[4], count=3, seed=7, overwrite=True)
print("finished", flush=True)
"""


def hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def owner_data(root: Path) -> Path:
    images = [Image.new("RGB", (32, 32), (12 * i, 200 - 6 * i, 90)) for i in range(20)]
    return data.save_imagefolder(images, [f"an emoji of colour {i}" for i in range(20)], root / "owner")


def start(pause_at: int, owner: Path, out: Path, key_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(pause_at), str(owner), str(out), str(key_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def next_run(owner: Path, out: Path, key_dir: Path) -> tuple[str, str]:
    """The same protect again, without overwrite: (outcome, message)."""
    try:
        protect.protect(owner, "mosaic:3", out, key_dir, count=3, seed=7)
        return "made", ""
    except FileExistsError as error:
        message = str(error)
        if "already hold a complete release and its key" in message:
            return ("finished" if "interrupted protect" in message else "complete"), message
        return ("refused" if "--overwrite" in message else "unclear"), message


def check(root: Path, owner: Path, before: dict, outcome: str) -> bool:
    """The invariants after the next run: a matching pair (or a refusal that says what to do), the user's files as
    they were, no staged folder left behind."""
    out, key_dir = root / "release", root / "key"
    if outcome == "unclear":
        return False
    if outcome != "refused":
        try:
            keys.load_key(key_dir, release=out)
        except (FileNotFoundError, ValueError):
            return False
    staged = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return (hash_tree(owner) == before["owner"] and (root / "notes.txt").read_text() == before["notes"]
            and not staged)


def trial(root: Path, owner: Path, scenario: str, pause_at: int | None, delay: float) -> dict:
    out, key_dir = root / "release", root / "key"
    for folder in [out, key_dir] + [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]:
        shutil.rmtree(folder, ignore_errors=True)
    if scenario == "over":
        protect.protect(owner, "mosaic:1", out, key_dir, count=2, seed=0)
    before = {"owner": hash_tree(owner), "notes": (root / "notes.txt").read_text()}
    child = start(-1 if pause_at is None else pause_at, owner, out, key_dir)
    ready = child.stdout.readline().strip() == "ready"  # imports done: protect starts now
    if pause_at is None:
        time.sleep(delay)
        killed = ready and child.poll() is None
    else:
        killed = ready and child.stdout.readline().strip() == "paused"
    if child.poll() is None:
        kill(child)
    child.wait()
    outcome, message = next_run(owner, out, key_dir)
    return dict(kind="random" if pause_at is None else "between renames", scenario=scenario,
                point="" if pause_at is None else str(pause_at), delay=round(delay, 2), killed=killed,
                outcome=outcome, ok=check(root, owner, before, outcome), message=message[:120])


def trials(root: Path, random_kills: int = 50, seed: int = 0, points=RENAME_POINTS) -> list[dict]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    owner = owner_data(root) if not (root / "owner" / data.METADATA).is_file() else root / "owner"
    (root / "notes.txt").write_text("the user's own file, beside the outputs")
    child = start(10**6, owner, root / "timing", root / "timing-key")  # never pauses: how long protect itself takes
    child.stdout.readline()
    started = time.time()
    child.wait()
    duration = time.time() - started
    shutil.rmtree(root / "timing", ignore_errors=True)
    shutil.rmtree(root / "timing-key", ignore_errors=True)
    rng = random.Random(seed)
    rows = [trial(root, owner, scenario, point, 0.0) for scenario, point in points]
    rows += [trial(root, owner, rng.choice(["new", "over"]), None, rng.uniform(0, duration))
             for _ in range(random_kills)]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/crash-protect")
    args = parser.parse_args(argv)
    rows = trials(Path(args.out), args.random_kills, args.seed)
    write_table(rows, Path(args.out) / "crash_protect.csv")
    outcomes = {o: sum(r["outcome"] == o for r in rows) for o in sorted({r["outcome"] for r in rows})}
    print(json.dumps(dict(trials=len(rows), all_ok=all(r["ok"] for r in rows), outcomes=outcomes,
                          killed_mid_run=sum(r["killed"] for r in rows))))


if __name__ == "__main__":
    main()
