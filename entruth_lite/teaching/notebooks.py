"""Run the collection's notebooks headless (``make demo`` / ``make test``) and keep them output-free in git."""

from __future__ import annotations

import ast
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..core.models import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SMOKE_ENV = "ENTRUTH_SMOKE"
RUNS_ENV = "ENTRUTH_RUNS"
CLASS_ENV = "ENTRUTH_CLASS"
from ..core.progress import HEADLESS_ENV  # set by run_notebook: no browser will ever draw a widget


def smoke_mode() -> bool:
    """True when notebooks should shrink steps and counts (env ``ENTRUTH_SMOKE=1``)."""
    return os.environ.get(SMOKE_ENV, "0") not in ("", "0", "false", "False")


def class_mode() -> bool:
    """True when notebooks should use the models as recorded in the class pack (``classroom``) instead of training
    and sampling them (env ``ENTRUTH_CLASS=1``, ``make class``)."""
    return os.environ.get(CLASS_ENV, "0") not in ("", "0", "false", "False")


def quiet_libraries() -> None:
    """Silence library chatter that is not the lesson, for every notebook in one place: diffusers' and
    transformers' loading bars and their info and warning logs (such as the image-processor fallback when
    torchvision is absent). Errors still show; the package's own progress bars (tqdm) are untouched."""
    # imported here, not at the top: diffusers is slow to import; transformers is slow to import
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def interact(function, **controls):
    """``ipywidgets.interact(function, **controls)`` in a live notebook. In a headless run (``make demo``, ``make
    test``) the function runs once with each control's value (a widget's ``value``, a list's first item, any other
    value as is) and no interactive widget is made: nobody can move a slider there, and nbclient can block on an
    ``interact`` widget's messages (jupyter/nbclient#312), which would hang the run."""
    if os.environ.get(HEADLESS_ENV, "0") == "1":
        values = {name: control.value if hasattr(control, "value") else
                  control[0] if isinstance(control, list) else control for name, control in controls.items()}
        return function(**values)
    # imported here, not at the top: Jupyter packages, needed only for notebooks
    import ipywidgets

    return ipywidgets.interact(function, **controls)


def runs_dir(default: str = "../runs") -> Path:
    """Where a notebook writes its artefacts: ``$ENTRUTH_RUNS`` if set, else ``default`` (``default/smoke`` in
    smoke mode, so a quick test run never overwrites the full demo's models)."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV])
    return Path(default) / "smoke" if smoke_mode() else Path(default)


SHIPPED_RESULTS = REPO_ROOT / "benchmarks" / "results"


def benchmark_results(name: str, bench: Path = REPO_ROOT / "runs" / "bench") -> Path:
    """A benchmark's table: the reader's own run under ``bench`` when there is one, else the copy the repository
    ships in ``benchmarks/results`` (so a fresh clone or Colab shows the measured numbers without hours of
    training). ``name`` is the path under ``bench``, e.g. ``"robustness.csv"``."""
    for path in (Path(bench) / name, SHIPPED_RESULTS / Path(name).name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no benchmark results {name!r}: neither {Path(bench) / name} nor "
                            f"{SHIPPED_RESULTS / Path(name).name} exists")


def list_notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The collection's notebooks, in their numbered order."""
    return sorted(p for p in Path(folder).glob("*.ipynb") if not p.name.startswith("."))


def notebooks_with_outputs(folder: Path = NOTEBOOK_DIR) -> list[str]:
    """Names of notebooks that carry outputs or execution counts (they must be committed stripped)."""
    dirty = []
    for path in list_notebooks(folder):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        if any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code"):
            dirty.append(path.name)
    return dirty


SCRIPT = re.compile(r"<script.*?</script>|&lt;script.*?&lt;/script&gt;", re.S)
UNREADABLE = {  # what a student should never meet in an output, and how to spot it
    "a raw dict": re.compile(r"\{'\w+': "),
    "a raw dataclass": re.compile(r"\b[A-Z]\w+\(\w+="),
    "a raw float (10 or more decimals)": re.compile(r"(?<![\w.])\d+\.\d{10,}"),
    "a number rounded to 0.00 in a table": re.compile(r">\s*0\.00\s*<"),
}


def unreadable_outputs(path: Path) -> list[str]:
    """Where an executed notebook shows a student raw numbers (``UNREADABLE``): 'cell N: what' for each."""
    import nbformat  # imported here, not at the top: Jupyter packages, needed only for notebooks

    found = []
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for output in [o for o in cell.get("outputs", []) if o.get("name") != "stderr"]:  # not warnings, bars
            texts = [output.get("text", "")] + [SCRIPT.sub("", output.get("data", {}).get(kind, ""))
                                                 for kind in ("text/plain", "text/html")]  # a script is not shown
            found += [f"cell {index}: {what}" for what, pattern in UNREADABLE.items()
                      if any(pattern.search(text) for text in texts)]
    return sorted(set(found), key=found.index)


def stale_progress_bars(path: Path) -> list[str]:
    """'cell N: what' for each progress-bar widget an executed copy keeps (its first frame: '0%' forever)."""
    import nbformat  # imported here, not at the top: Jupyter packages, needed only for notebooks

    found = []
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = data.get("text/plain", "")
            if "application/vnd.jupyter.widget-view+json" in data and re.search(r"\d+%\|", text):
                found.append(f"cell {index}: {text.split(':')[0].strip()}")
    return found


def strip_outputs(path: Path) -> bool:
    """Remove outputs and execution counts in place; True if the file changed."""
    # imported here, not at the top: Jupyter packages, needed only for notebooks
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(notebook, path)
    return changed


@dataclass
class NotebookRun:
    name: str
    seconds: float
    output: Path


def inject_parameters(notebook, parameters: dict) -> None:
    """Add a cell setting ``parameters`` right after the cell tagged ``parameters`` (as papermill does), so a
    runner can change a notebook's settings without editing it."""
    # imported here, not at the top: Jupyter packages, needed only for notebooks
    import nbformat

    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise ValueError("the notebook has no cell tagged 'parameters' to override")
    source = "# injected parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def run_notebook(path: Path, out_dir: Path, smoke: bool, timeout: int = 3600,
                 parameters: dict | None = None, recorded: bool = False, threads: int | None = None) -> NotebookRun:
    """Execute one notebook in its own folder and write the executed copy to ``out_dir``; ``parameters``
    override the values of its parameters cell; ``recorded``: class mode (``classroom``); ``threads`` caps the
    kernel's math threads (when notebooks run side by side, each gets a share of the cores)."""
    # imported here, not at the top: Jupyter packages, needed only for notebooks
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if parameters:
        inject_parameters(notebook, parameters)
    # the kernel's environment (this process's is left alone: notebooks may run side by side): smoke and class
    # switches, offline hub, and inline figures (a headless MPLBACKEND=Agg would keep figures out of the copy)
    env = os.environ | {SMOKE_ENV: "1" if smoke else "0", CLASS_ENV: "1" if recorded else "0",
                        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                        "MPLBACKEND": "module://matplotlib_inline.backend_inline", HEADLESS_ENV: "1"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.time()
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute(env=env)
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out_dir / path.name)
    return NotebookRun(path.name, time.time() - start, out_dir / path.name)


# Notebooks that may run at the same time (``run_all``): neither writes what the other reads. 01 writes the release
# that 02 trains on, and 03-05 read 02's models and probes, so 02 runs alone between the two groups.
SIDE_BY_SIDE = (("00_quickstart", "00b_diffusion_primer", "01_template_design"),
                ("03_memorization_probing", "04_robustness_attacks", "05_baselines_and_quality"))


def stages(paths: list[Path], side_by_side=SIDE_BY_SIDE) -> list[list[Path]]:
    """``paths`` in order, cut into stages: consecutive notebooks of one ``side_by_side`` group share a stage,
    any other notebook is a stage of its own."""
    group_of = {name: i for i, group in enumerate(side_by_side) for name in group}
    result: list[list[Path]] = []
    for path in paths:
        group = group_of.get(path.stem)
        if result and group is not None and group_of.get(result[-1][-1].stem) == group:
            result[-1].append(path)
        else:
            result.append([path])
    return result


def run_all(out_dir: Path, smoke: bool, only: list[str] | None = None, recorded: bool = False,
            folder: Path = NOTEBOOK_DIR, side_by_side=SIDE_BY_SIDE) -> list[NotebookRun]:
    """Run the notebooks in order, the independent ones of a stage (``stages``) side by side, each kernel with
    an equal share of the cores: small lessons leave cores idle (imports, plotting, one-image steps), so the
    demo finishes sooner. A failing notebook stops the run once its stage is done, with its error."""
    mode = ("smoke " if smoke else "") + ("class" if recorded else "full")
    paths = [p for p in list_notebooks(folder) if not only or any(key in p.name for key in only)]
    runs = []

    def run(path: Path, threads: int | None) -> NotebookRun:
        print(f"running {path.name} ({mode}) ...\n", end="", flush=True)  # one write: threads share the line
        result = run_notebook(path, out_dir, smoke, recorded=recorded, threads=threads)
        print(f"  done in {result.seconds:.0f} s -> {result.output}\n", end="", flush=True)
        return result

    for stage in stages(paths, side_by_side):
        threads = max(1, (os.cpu_count() or 1) // len(stage)) if len(stage) > 1 else None
        with ThreadPoolExecutor(max_workers=len(stage)) as pool:
            futures = [pool.submit(run, path, threads) for path in stage]
        runs += [future.result() for future in futures]  # raises the first failure, after the whole stage ran
    return runs


SOLUTION_TAG = "solution"
COLAB_BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n*")
YOUR_ANSWER = "# Your answer here (the solution is in the teacher's copy: notebooks/ in the repository)\n"


def is_solution(cell) -> bool:
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def _declared_global(function) -> set[str]:
    """Names a function declares ``global`` (in its own body, not in functions nested in it)."""
    names, todo = set(), list(ast.iter_child_nodes(function))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Global):
            names |= set(node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo += list(ast.iter_child_nodes(node))
    return names


def _scope_names(node) -> tuple[set[str], set[str]]:
    """(names bound, free names read) in ``node``'s scope: a function's parameters and locals stay inside it
    (except the names it declares ``global``, which it binds in the cell; a ``global`` in a function nested in
    another is not followed), and so do a class body's."""
    bound, read = set(), set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):  # bases, keywords and decorators are read where the class is defined
            bound.add(child.name)
            for outer in child.bases + [k.value for k in child.keywords] + child.decorator_list:
                read |= _scope_names(ast.Expression(outer))[1]
            inner_bound, inner_read = _scope_names(ast.Module(body=child.body, type_ignores=[]))
            read |= inner_read - inner_bound
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not isinstance(child, ast.Lambda):
                bound.add(child.name)
            arguments = child.args
            for outer in arguments.defaults + [d for d in arguments.kw_defaults if d is not None] + \
                    getattr(child, "decorator_list", []):  # evaluated where the function is defined
                read |= _scope_names(ast.Expression(outer))[1]
            parameters = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs
                          + [a for a in (arguments.vararg, arguments.kwarg) if a]}
            inner_bound, inner_read = _scope_names(child)
            declared = set() if isinstance(child, ast.Lambda) else _declared_global(child)
            bound |= inner_bound & declared
            read |= inner_read - (inner_bound - declared) - parameters
            continue
        if isinstance(child, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):  # a scope of its own
            inner_bound, inner_read = _scope_names(child)
            read |= inner_read - inner_bound
            continue
        if isinstance(child, ast.Name):
            (bound if isinstance(child.ctx, (ast.Store, ast.Del)) else read).add(child.id)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in child.names}
        inner_bound, inner_read = _scope_names(child)
        bound |= inner_bound
        read |= inner_read
    return bound, read


SIMPLE_STATEMENTS = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return)  # read, then bind


def _names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell binds, names it reads before binding them), statement by statement on its syntax tree (a
    simple statement such as ``x = x + 1`` or ``total += 1`` reads first); IPython magics and shell lines are
    skipped, and a cell magic's cell (``%%bash``) is not Python: it binds and reads nothing here."""
    if source.lstrip().startswith("%%"):
        return set(), set()
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    bound, read = set(), set()
    for statement in tree.body:
        binds, reads = _scope_names(ast.Module(body=[statement], type_ignores=[]))
        if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
            reads.add(statement.target.id)
        read |= reads - bound - (set() if isinstance(statement, SIMPLE_STATEMENTS) else binds)
        bound |= binds
    return bound, read


def names_only_solutions_define(path: Path) -> list[str]:
    """'cell N: name' for every name a later non-solution cell reads that only a solution cell binds: the
    student copy (solutions removed) would stop there with a NameError."""
    import nbformat  # imported here, not at the top: Jupyter packages, needed only for notebooks

    by_solutions, by_lesson, missing = set(), set(), []
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type != "code":
            continue
        bound, read = _names(cell.source)
        if is_solution(cell):
            by_solutions |= bound
        else:
            missing += [f"cell {index}: {name}" for name in sorted((read - by_lesson) & by_solutions)]
            by_lesson |= bound
    return missing


def student_copy(path: Path, out_dir: Path) -> Path:
    """The notebook at ``path`` without its solutions, for a student: every solution code cell becomes an empty
    answer cell in its place, solution text (answers to the end questions) is dropped, outputs are removed."""
    import nbformat  # imported here, not at the top: Jupyter packages, needed only for notebooks

    notebook = nbformat.read(path, as_version=4)
    notebook.cells[0].source = COLAB_BADGE.sub("", notebook.cells[0].source)  # it opens the teacher's copy
    cells = []
    for cell in notebook.cells:
        if is_solution(cell):
            if cell.cell_type == "code":
                cells.append(nbformat.v4.new_code_cell(YOUR_ANSWER))
            continue
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    notebook.cells = cells
    out = Path(out_dir) / Path(path).name
    nbformat.write(notebook, out)
    return out


def write_student_copies(out_dir: Path, folder: Path = NOTEBOOK_DIR, overwrite: bool = False) -> list[Path]:
    """Student copies of every notebook in ``out_dir``; never into the teacher's folder, and never over a file that
    is there unless ``overwrite`` (then only the notebooks of that name are replaced)."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(folder).resolve():
        raise ValueError(f"{out_dir} holds the notebooks with their solutions: write the student copies elsewhere")
    paths = list_notebooks(folder)
    taken = [str(out_dir / p.name) for p in paths if (out_dir / p.name).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{', '.join(taken)} already exist: pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [student_copy(path, out_dir) for path in paths]
