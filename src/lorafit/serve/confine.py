"""Where an adapter loaded at run time (POST /v1/load_lora_adapter) may come from: only folders inside the
directories the operator named with --adapter-dir.

A client names a path on the server's disk; without this, an API key would be a key to every readable folder.
The path is resolved (symlinks followed) before it is compared, so neither `..` nor a link leads out; the two
files an adapter folder holds must resolve inside too. Weights are read as safetensors only (the adapter reader
refuses anything else), so a folder cannot smuggle in pickled code.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

from ..core.adapter_io import CONFIG_FILE, WEIGHTS_FILE
from .openai import ApiError

NAME = re.compile(r"[A-Za-z0-9][\w.:@+-]{0,127}")  # an adapter's name: a model id in URLs, logs and metric labels


def check_name(name, field: str = "lora_name") -> str:
    """`name` if it can be a model id; else ApiError 400."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ApiError(400, f"{field} must be 1 to 128 letters, digits or ._:@+- (starting with a letter or digit), "
                            f"got {name!r}", param=field)
    return name


def roots_of(adapter_dirs) -> list[Path]:
    """The --adapter-dir folders, resolved once at start-up; ValueError for one that is not a folder."""
    roots = []
    for folder in adapter_dirs:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise ValueError(f"--adapter-dir {folder}: not a folder")
        roots.append(path)
    return roots


def confine(raw, roots: list[Path]) -> Path:
    """The resolved adapter folder `raw` names, when it lies inside one of `roots`; else ApiError 400.

    An absolute path must lie inside a root; a relative one is looked up in each root in turn."""
    if not roots:
        raise ApiError(400, "loading adapters at run time is off: start the server with --adapter-dir DIR to allow "
                            "adapter folders inside DIR", param="lora_path")
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise ApiError(400, f"lora_path must be a folder path, got {raw!r}", param="lora_path")
    if ".." in PurePath(raw).parts:
        raise ApiError(400, f"lora_path {raw!r}: '..' is not allowed; name a folder inside an --adapter-dir",
                       param="lora_path")
    given = Path(raw)
    for candidate in [given] if given.is_absolute() else [root / given for root in roots]:
        folder = candidate.resolve()
        root = next((r for r in roots if folder.is_relative_to(r)), None)
        if root is None or not folder.is_dir():
            continue
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if (folder / name).exists() and not (folder / name).resolve().is_relative_to(root):
                raise ApiError(400, f"lora_path {raw!r}: {name} links outside the --adapter-dir", param="lora_path")
        return folder
    raise ApiError(400, f"lora_path {raw!r} is not an adapter folder inside the server's --adapter-dir folders "
                        "(a relative path is looked up in each)", param="lora_path")
