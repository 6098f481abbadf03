"""The package's shape: which module may import which, and no module reaches into another's private names."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "entruth_lite"
BENCHMARKS = PACKAGE.parent / "benchmarks"
OWNER_SIDE = {"protect", "detect", "probe", "verify", "audit", "report"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(sibling modules imported, private names taken from them) anywhere in ``path``, lazy imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, private = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("entruth_lite")):
            module = (node.module or "").removeprefix("entruth_lite").lstrip(".")
            names = [a.name for a in node.names]
            if module:
                modules.add(module.split(".")[0])
            else:  # from . import a, b
                modules.update(names)
            private.update(f"{module}.{n}" for n in names if n.startswith("_"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and node.value.id in {p.stem for p in PACKAGE.glob("*.py")}:
            private.add(f"{node.value.id}.{node.attr}")
    return modules, private


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")) + sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_no_module_takes_another_modules_private_names(path):
    assert imports_of(path)[1] == set()


def test_training_imports_nothing_of_the_owners_side():
    modules, _ = imports_of(PACKAGE / "train.py")
    assert modules & OWNER_SIDE == set(), modules


def test_the_audit_imports_neither_training_nor_plotting():
    modules, _ = imports_of(PACKAGE / "audit.py")
    assert modules & {"train", "viz", "report", "attacks", "baselines"} == set(), modules


def test_imports_flow_one_way():
    """data -> templates/protect -> train | probe/detect -> verify -> audit -> report: nothing imports downstream."""
    order = ["data", "templates", "protect", "detect", "verify", "audit", "report"]
    for i, name in enumerate(order):
        modules, _ = imports_of(PACKAGE / f"{name}.py")
        downstream = set(order[i + 1:])
        assert modules & downstream == set(), f"{name} imports {modules & downstream}"
