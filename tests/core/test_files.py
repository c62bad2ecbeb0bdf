"""Atomic writes: the old file or the new one, never a temp file left over, and modes that follow the umask."""

import os

import pytest
import torch
from safetensors.torch import save_file

from lorafit.core.files import atomic_write, temp_dir, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_file_the_umask_mode_not_a_private_one(tmp_path, umask, mask):
    umask(mask)
    write_json(tmp_path / "results.json", {"a": 1})
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_writer_that_replaces_the_temp_file_does_not_make_it_private(tmp_path, umask):
    umask(0o022)
    atomic_write(tmp_path / "adapter_model.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors writes 0600


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_temp_folder_takes_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert temp_dir(tmp_path, ".tmp-").stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    write_json(tmp_path / "results.json", {"a": 1})

    def fail(tmp):
        with open(tmp, "w") as file:
            file.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "results.json", fail)
    assert (tmp_path / "results.json").read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
