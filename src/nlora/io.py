"""Atomic file writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nlora.errors import ConfigError


def write_file_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary sibling file (given its path), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    write_file_atomic(path, write)


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON: a NaN or infinity is an error here, never a file other readers reject."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` write into a temporary sibling folder, then move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_leftovers(folder: Path, name: str = "*") -> list[Path]:
    """Temporary folders ``write_dir_atomic`` left in ``folder`` (for ``name``), if killed."""
    pattern = f".{glob.escape(name) if name != '*' else '*'}.*.tmp"
    return sorted(p for p in folder.glob(pattern) if p.is_dir() and not p.is_symlink())


def prepare_output_folder(out: Path) -> list[Path]:
    """Make ``out`` ready for ``write_dir_atomic``: refuse a symbolic link, a file or a folder
    with something in it; first remove the temporary folders an interrupted write into it left
    (beside it, or inside it for per-task subfolders). Returns what was removed."""
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; give a folder path that is not one")
    removed = []
    if out.parent.is_dir():
        removed += _atomic_leftovers(out.parent, out.name)
    if out.is_dir():
        removed += _atomic_leftovers(out)
    for leftover in removed:
        shutil.rmtree(leftover)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose another --out")
    return removed
