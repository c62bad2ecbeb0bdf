"""Dense copies of GGUF models: what transformers converted a .gguf file to, kept so the next load is fast.

transformers converts a GGUF file on every load (parses its metadata, dequantizes the blocks, maps the tensor
names, builds the tokenizer): seconds to minutes, where reading the same model from safetensors takes under a
second. The first dense load of a file saves the conversion (config, weights in the dtype asked for, tokenizer
files) in a folder keyed by what decides its contents: the file's sha256, the dtype, and transformers' version,
since the conversion is transformers' own. Later loads read that folder.

Layout: `<cache_dir()>/converted/<sha256>-<dtype>-transformers-<major.minor>/`, holding `.complete` (written
last: the sha256 and each file's size). The folder is written beside its final name and renamed into place, so
it is either complete or absent; one whose marker is missing, unreadable or names other sizes is not used and is
converted again. LORAFIT_GGUF_CACHE=0 turns the cache off (every load converts the file, as transformers does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from ..core.files import temp_dir, umask_modes
from .presets import _swap_in, cache_dir, sha256_of

MARKER = ".complete"  # written last inside the folder: {"sha256": ..., "files": {name: size}}
SWITCH = "LORAFIT_GGUF_CACHE"  # "0" (or "off", "false", "no"): convert the GGUF file on every load


def enabled() -> bool:
    """Whether dense copies are used: on unless $LORAFIT_GGUF_CACHE says 0 / off / false / no."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def folder_for(sha256: str, dtype: str, version: str) -> Path:
    """Where the dense copy of the GGUF file with this sha256, converted to `dtype` by transformers `version`, lives."""
    major_minor = ".".join(version.split(".")[:2])
    return cache_dir() / "converted" / f"{sha256}-{dtype}-transformers-{major_minor}"


def is_complete(folder: Path, sha256: str) -> bool:
    """True when `folder` holds a finished copy of the file with this sha256: its marker says so, and every file
    the marker lists is there with the size it had when the copy was written (a truncated file fails this)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
        return marker["sha256"] == sha256 and bool(files) and all(
            (folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def dense_copy(gguf_file: Path, dtype: str, version: str, convert: Callable[[Path], None]) -> Path | None:
    """The folder holding the dense copy of `gguf_file`; on first use `convert(folder)` writes it.

    `convert` writes the converted model's files into the empty folder it is given; its errors propagate,
    except an OSError (a full disk, a read-only cache), which is a warning: the copy is skipped and None
    returned, so the caller loads the GGUF file itself.
    """
    sha256 = sha256_of(gguf_file)  # ~0.1 s for 100 MB: a changed file gets a new copy
    final = folder_for(sha256, dtype, version)
    if is_complete(final, sha256):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(final.parent, prefix=f".{final.name}.tmp-")
    except OSError as err:
        return _skipped(gguf_file, err)
    try:
        convert(tmp)
        umask_modes(tmp)  # safetensors makes its files private; the cache is an ordinary folder
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({"sha256": sha256, "files": files}, indent=1) + "\n")
        if not is_complete(final, sha256):  # another process may have finished first: keep its copy
            _swap_in(tmp, final)
    except OSError as err:
        return _skipped(gguf_file, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def discard(folder: Path) -> None:
    """Remove a dense copy that turned out unreadable, so the next load converts the file again."""
    try:
        trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    except OSError:
        return  # a read-only cache: nothing can be rebuilt there either
    with contextlib.suppress(OSError):  # already gone, or replaced by another process
        folder.rename(trash / "old")  # one step: a reader sees the copy or no copy
    shutil.rmtree(trash, ignore_errors=True)


def _skipped(gguf_file: Path, err: OSError) -> None:
    warnings.warn(f"{gguf_file}: could not keep a dense copy under {cache_dir() / 'converted'} ({err}); "
                  f"loading the GGUF file itself (set {SWITCH}=0 to skip the attempt)", stacklevel=3)
    return None
