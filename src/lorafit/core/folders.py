"""Folders replaced as a whole: written beside the old one and swapped in at once, and read from one version.

A crash or a failed write leaves the old folder or the new one, never a mix, and a reader that goes through
`read_folder` never sees one version's file beside another's (an adapter's weights with another's config).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # Linux's renameat2: swap two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at `a` and `b` atomically (Linux renameat2); False where the system cannot."""
    name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None) if name else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def publish_folder(folder: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """`with publish_folder(folder) as tmp:` write the folder's files into `tmp`; on leaving, it replaces `folder`.

    The new folder is swapped in whole (one atomic exchange on Linux), so a reader sees the old folder or the new
    one. It holds what was written into `tmp`, plus the old folder's files named in `keep` that were not written
    anew. On an error nothing changes.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        yield tmp
        if folder.is_dir():
            for name in keep:
                if (folder / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(folder / name, tmp / name)
        tmp.chmod(0o777 & ~_umask())
        if not folder.exists():
            os.rename(tmp, folder)
        elif not _exchange(tmp, folder):  # elsewhere: two renames, with a moment where `folder` is absent
            aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-old-"))
            os.rename(folder, aside / "old")
            os.rename(tmp, folder)
            tmp = aside
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder's temp after an error, or the old folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_folder(folder: Path, names: tuple[str, ...], attempts: int = 20) -> dict[str, bytes]:
    """The bytes of files `names` of `folder`, all from one version of it while `publish_folder` replaces it.

    The folder is opened once and the files are read relative to that handle, so a swap between two reads cannot
    pair one version's file with another's; a version removed while being read is read again from the new one.
    FileNotFoundError names the first missing file when the folder itself lacks it.
    """
    for attempt in range(attempts):
        try:
            handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # between the two renames of a swap where the system has no exchange
            if attempt == attempts - 1:
                raise
            time.sleep(0.001)
            continue
        try:
            return {name: _read_at(handle, name) for name in names}
        except FileNotFoundError:
            if attempt == attempts - 1 or not _swapped(folder, handle):
                raise
        finally:
            os.close(handle)
    raise AssertionError("unreachable")


def _read_at(handle: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=handle)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _swapped(folder: Path, handle: int) -> bool:
    """True when `folder` now names another folder than the one `handle` opened (a newer version)."""
    try:
        return os.stat(folder).st_ino != os.fstat(handle).st_ino
    except FileNotFoundError:
        return True  # between the two renames of a swap without exchange


def publish_tensors(folder: Path, weights_file: str, tensors: dict[str, torch.Tensor],
                    json_files: dict[str, object]) -> dict:
    """Publish `folder` holding `tensors` as the safetensors file `weights_file` and `json_files` ({name: value}),
    as a whole (`publish_folder`). Returns {"path", "file_bytes", "tensor_bytes"}: the safetensors file is the
    tensors' bytes plus a small JSON header."""
    with publish_folder(Path(folder)) as tmp:
        save_file(tensors, str(tmp / weights_file), metadata={"format": "pt"})
        for name, value in json_files.items():
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
        file_bytes = (tmp / weights_file).stat().st_size
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"path": str(folder), "file_bytes": file_bytes, "tensor_bytes": tensor_bytes}
