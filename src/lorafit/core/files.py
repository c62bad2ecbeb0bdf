"""Atomic file writes: a temp file in the same folder, then a rename. A crash leaves the old file or the new one.

Written files take the process umask like any ordinary file: temp files and folders are made with os.open /
os.mkdir (tempfile.mkstemp / mkdtemp make them 0600 / 0700), and a file a writer replaced with its own temp file
(safetensors does, as 0600) gets the mode back before the rename. Otherwise other users of a shared run folder
could not read its adapter or results.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def temp_file(folder: Path, prefix: str, suffix: str = ".tmp") -> Path:
    """An empty new file `folder/<prefix><random><suffix>`, mode 0o666 less the umask."""
    while True:
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def temp_dir(folder: Path, prefix: str) -> Path:
    """A new empty folder `folder/<prefix><random>`, mode 0o777 less the umask."""
    while True:
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue


def umask_modes(folder: Path) -> None:
    """Give the files in `folder` (made by `temp_dir`) the mode the umask gives new files: the folder's own
    mode without the execute bits; for writers that make their files private (safetensors makes them 0600)."""
    mode = Path(folder).stat().st_mode & 0o666
    for path in Path(folder).iterdir():
        if path.is_file():
            os.chmod(path, mode)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename the temp file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(temp_file(path.parent, prefix=f".{path.name}."))
    mode = os.stat(tmp).st_mode & 0o777  # 0o666 less the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors) left it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
