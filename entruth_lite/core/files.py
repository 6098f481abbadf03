"""Folders that appear whole or not at all: every output (a release, a key, a dataset, a fine-tune's weights) is
built under a temporary name beside its target and renamed into place, and the next write finishes or undoes what
a killed one left behind. Nothing the user owns is deleted before its replacement is in place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

MARKER = ".entruth-lite"  # in every folder written whole here: what lets overwrite replace it, and nothing else


def staged_siblings(out: Path, kind: str) -> list[Path]:
    """Folders a write of ``out`` leaves beside it while it runs: ``.<name>.tmp-*`` (being built) or
    ``.<name>.old-*`` (the previous ``out``, set aside until the new one is in place)."""
    out = Path(out)
    return sorted(out.parent.glob(f".{out.name}.{kind}-*")) if out.parent.is_dir() else []


def recover_folder(out: Path) -> list[str]:
    """Finish what a killed write of ``out`` left behind, and say what was done: a half-built folder is deleted;
    a set-aside previous version is put back when ``out`` is missing (the new one never arrived) and deleted
    when ``out`` is in place (the new one did). Every write of a folder calls this first."""
    out, notes = Path(out), []
    for old in staged_siblings(out, "old"):
        if not out.exists() and (old / "old").exists():
            os.replace(old / "old", out)
            notes.append(f"restored {out} from {old.name} (a write of it was interrupted)")
        shutil.rmtree(old, ignore_errors=True)
    for tmp in staged_siblings(out, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        notes.append(f"removed {tmp.name}, left by an interrupted write of {out}")
    return notes


def check_replaceable(out: Path, ours: Sequence[str] = (MARKER,)) -> None:
    """Refuse to replace an existing ``out`` that this tool did not write: ``overwrite`` replaces only a folder that
    holds one of the files ``ours`` names (the marker every folder written whole here carries, or what earlier
    versions' outputs are known by) or nothing at all. The message names what was found instead."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"refusing to replace {out}: it is a file, not a folder entruth-lite wrote")
    if any((out / name).is_file() for name in ours):
        return
    found = sorted(p.name for p in out.iterdir())
    if found:
        raise FileExistsError(
            f"refusing to replace {out}: entruth-lite did not write it (it has no {ours[0]}, and holds "
            f"{found[0]!r}{f' and {len(found) - 1} more' if len(found) > 1 else ''}); nothing was changed. Choose a "
            "new folder, or move that folder away yourself")


def adopt(folder: Path) -> None:
    """Mark an existing folder as this tool's output: for what an earlier version wrote before the marker existed,
    where the caller can tell (the demo's own run folders, an emoji split with its credit file)."""
    if Path(folder).is_dir() and not (Path(folder) / MARKER).is_file():
        (Path(folder) / MARKER).write_text(json.dumps({"written_by": "entruth-lite"}) + "\n", encoding="utf-8")


def atomic_folder(out: Path, overwrite: bool, private: bool = False, ours: Sequence[str] | None = (MARKER,)) -> Path:
    """Make a temporary sibling folder of ``out`` to build in (renamed into place by ``commit_folder``), after
    finishing or undoing what an interrupted earlier write left (``recover_folder``; what it did is warned about).
    The folder gets the marker (``MARKER``) and the permissions of any new folder (the umask's), or owner-only ones
    when ``private`` (an owner key). With ``overwrite``, an existing ``out`` is replaced only if one of ``ours`` is
    in it (``check_replaceable``; None: a sub-folder of an output, replaced without the check)."""
    out = Path(out)
    check_writable_parent(out)
    for note in recover_folder(out):
        warnings.warn(note, stacklevel=3)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new folder or replace it (overwrite=True; CLI: "
                              "--overwrite)")
    if ours is not None:
        check_replaceable(out, ours)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # mkdtemp makes it owner-only
    if not private:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    (tmp / MARKER).write_text(json.dumps({"written_by": "entruth-lite"}) + "\n", encoding="utf-8")
    return tmp


def check_writable_parent(out: Path) -> None:
    """Create ``out``'s parent, or say plainly why it cannot be written (before any work is done)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"cannot create the folder {out.parent} for {out}: {error.strerror}") from error
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {out.parent} (needed for {out}): permission denied")


def set_aside(out: Path) -> Path | None:
    """Move an existing ``out`` to ``.<name>.old-*/old`` (``recover_folder`` puts it back if no new ``out``
    arrives); None when there is nothing to move."""
    out = Path(out)
    if not out.exists():
        return None
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / "old")
    return trash


def commit_folder(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` into place; a previous ``out`` is deleted only once the new one is there."""
    trash = set_aside(out)
    os.replace(tmp, out)
    if trash is not None:
        shutil.rmtree(trash)


def atomic_write(target: Path, write) -> None:
    """Build ``target`` in a temporary sibling folder with ``write(tmp)``, then rename it into place."""
    tmp = atomic_folder(target, overwrite=True, ours=None)  # a sub-folder of an output this run writes
    try:
        write(tmp)
        commit_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
