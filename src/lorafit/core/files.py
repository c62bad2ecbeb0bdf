"""Writing files safely: atomic writes (a temp file in the same folder, then a rename: a crash leaves the old file
or the new one), a check that a folder can be written before any work starts, and OS errors as one line.

Writers that wrap an OS error in their own exception (safetensors' SafetensorError says "No space left on device
(os error 28)") are re-raised as the OSError they are, naming the file, so every caller sees one kind of error.
Written files take the process umask like any ordinary file: temp files and folders are made with os.open /
os.mkdir (tempfile.mkstemp / mkdtemp make them 0600 / 0700), and a file a writer replaced with its own temp file
(safetensors does, as 0600) gets the mode back before the rename.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error (safetensors) names an errno

# What to do about each errno a user can cause, as the CLI says it (the Python API's words in brackets).
_OS_HINTS = {
    errno.ENOSPC: "no space left on device writing {path}: free space or choose another --out (output folder)",
    errno.EDQUOT: "disk quota exceeded writing {path}: free space or choose another --out (output folder)",
    errno.EROFS: "cannot write {path}: read-only file system; choose another --out (output folder)",
    errno.EACCES: "cannot write {path}: permission denied; choose another --out (output folder) or fix its "
                  "permissions",
    errno.EPERM: "cannot write {path}: operation not permitted; choose another --out (output folder)",
    errno.ENOTDIR: "{path}: a file stands where a folder is needed; choose another path",
    errno.EEXIST: "{path}: exists and is a file, not a folder; choose another path or remove it",
    errno.EISDIR: "{path}: is a folder where a file is needed; choose another path",
    errno.ENOENT: "{path}: not found; check the path",
    errno.ENAMETOOLONG: "{path}: file name too long; choose a shorter path",
}
USER_ERRNOS = frozenset(_OS_HINTS)


def os_error_of(err: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """`err` as an OSError when it is one or wraps one (safetensors' "(os error N)"), else None."""
    if isinstance(err, OSError):
        return err
    found = _WRAPPED_OS_ERROR.search(str(err)) if isinstance(err, SafetensorError) else None
    if found is None:
        return None
    code = int(found.group(1))
    named = re.search(r'at path "([^"]+)"', str(err))
    return OSError(code, os.strerror(code), str(path) if path is not None else (named.group(1) if named else None))


@contextlib.contextmanager
def os_errors_named(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OS error a writer wrapped in its own exception (or one that names no file) as an OSError
    naming `path`.

    torch.save reports a full disk as an opaque RuntimeError ("unexpected pos ..."): a writer's error while the
    disk under `path` has no free byte left is taken for what it almost surely is, ENOSPC.
    """
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:  # a failed write() names no file: name it
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except Exception as err:
        wrapped = os_error_of(err, path)
        if wrapped is None and _no_space_left(Path(path)):
            wrapped = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if wrapped is None:
            raise
        raise wrapped from err


def _no_space_left(path: Path) -> bool:
    existing = next((p for p in [path, *path.absolute().parents] if p.exists()), None)
    try:
        return existing is not None and shutil.disk_usage(existing).free == 0
    except OSError:
        return False


def describe_os_error(err: BaseException) -> str | None:
    """One line for an OS error a user can fix (full disk, read-only folder, a file in the way), also when a
    writer wrapped it (safetensors); None for any other error."""
    err = os_error_of(err)
    if err is None or (err.errno is not None and err.errno not in _OS_HINTS):
        return None
    if err.errno is None:  # raised with a message of its own: FileNotFoundError("--resume: no checkpoint ...")
        return str(err)
    path = err.filename if err.filename is not None else "the output"
    if err.errno == errno.ENOTDIR and err.filename is not None:
        blocker = _file_in_the_way(Path(err.filename))
        path = f"{err.filename} ({blocker} is a file)" if blocker else err.filename
    return _OS_HINTS[err.errno].format(path=path)


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of `path` that exists and is not a folder (why `path` cannot be a folder)."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_writable(folder: str | os.PathLike) -> None:
    """Raise the OSError that writing into `folder` would meet, before any work starts; creates nothing.

    The folder need not exist: its nearest existing ancestor must be a writable folder on a writable file system.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


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
        with os_errors_named(path):
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
