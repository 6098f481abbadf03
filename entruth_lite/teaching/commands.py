"""``entruth-lite notebooks ...``: run, strip, record the class pack, write student copies.

Each handler imports what it runs inside the function (nbclient and a Jupyter kernel, or fine-tuning): the rest
of the command line should not wait for them."""

from __future__ import annotations

import time
from pathlib import Path


def _run(args) -> None:
    from . import notebooks  # heavy: nbclient and a Jupyter kernel

    start = time.time()
    runs = notebooks.run_all(Path(args.out), smoke=args.smoke, only=args.only, recorded=args.recorded)
    print(f"{len(runs)} notebooks in {time.time() - start:.0f} s")  # wall clock: some ran side by side


def _record_class(args) -> None:
    from . import classroom, demo  # heavy: fine-tuning and sampling the lab's models

    pack = demo.record_class(args.runs, args.out or classroom.PACK_DIR)
    print(f"class pack written to {pack.folder}: training {pack.train_seconds()} s, recorded instead of run in class mode")


def _strip(args) -> None:
    from . import notebooks  # heavy: nbformat

    for path in notebooks.list_notebooks():
        if notebooks.strip_outputs(path):
            print(f"stripped {path.name}")


def _student(args) -> None:
    from . import notebooks  # heavy: nbformat

    written = notebooks.write_student_copies(Path(args.out), overwrite=args.overwrite)
    print(f"{len(written)} student notebooks (no solutions) in {args.out}")


def add_notebooks(commands) -> None:
    nb_commands = commands.add_parser("notebooks", help="run, strip or copy the notebooks").add_subparsers(
        dest="nb_command", required=True)
    run = nb_commands.add_parser("run", help="execute the notebooks in order")
    run.add_argument("--out", default="runs/notebooks")
    run.add_argument("--smoke", action="store_true", help="shrink steps and counts (ENTRUTH_SMOKE=1)")
    run.add_argument("--only", nargs="*", help="run only notebooks whose name contains one of these")
    run.add_argument("--class", dest="recorded", action="store_true",
                     help="class mode (ENTRUTH_CLASS=1): the recorded models of data/class instead of training")
    run.set_defaults(func=_run)
    record = nb_commands.add_parser("record-class", help="record the class pack (data/class) at the notebooks' defaults")
    record.add_argument("--runs", default="runs", help="where the full run keeps its models (reused when current)")
    record.add_argument("--out", help="where to write the pack (default: data/class in the repository)")
    record.set_defaults(func=_record_class)
    nb_commands.add_parser("strip", help="remove outputs from the committed notebooks").set_defaults(func=_strip)
    student = nb_commands.add_parser("student", help="copies of the notebooks without solutions, for students")
    student.add_argument("out", help="a folder beside notebooks/ (e.g. student/): the notebooks find ../runs from it")
    student.add_argument("--overwrite", action="store_true", help="replace student notebooks already in OUT")
    student.set_defaults(func=_student)
