"""Safe writes: atomic files whose modes follow the umask, folders checked before work starts, OS errors as one line."""

import errno
import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lorafit.core.files import atomic_write, check_writable, describe_os_error, os_error_of, temp_dir, write_json


def test_check_writable_creates_nothing_and_names_what_is_in_the_way(tmp_path):
    check_writable(tmp_path / "new" / "deeper")  # a folder that does not exist yet is fine
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError) as err:
        check_writable(tmp_path / "f")
    assert err.value.errno == errno.EEXIST and err.value.filename == str(tmp_path / "f")
    with pytest.raises(NotADirectoryError) as err:
        check_writable(tmp_path / "f" / "out")
    assert describe_os_error(err.value) == (f"{tmp_path / 'f' / 'out'} ({tmp_path / 'f'} is a file): a file stands "
                                            "where a folder is needed; choose another path")


def test_a_read_only_file_system_is_found_before_writing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr("os.statvfs", lambda path: SimpleNamespace(f_flag=__import__("os").ST_RDONLY))
    with pytest.raises(OSError) as err:
        check_writable(tmp_path / "out")
    assert describe_os_error(err.value) == (f"cannot write {tmp_path / 'out'}: read-only file system; choose another "
                                            "--out (output folder)")


def test_safetensors_errors_that_wrap_an_os_error_become_that_os_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SafetensorError) as real:  # what safetensors raises under a file
        save_file({"a": torch.zeros(2)}, str(tmp_path / "f" / "a.safetensors"))
    assert os_error_of(real.value).errno == errno.ENOTDIR
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "w.safetensors", lambda tmp: (_ for _ in ()).throw(full))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "w.safetensors")
    assert describe_os_error(full).startswith("no space left on device writing the output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the temp file is gone


def test_other_errors_are_not_the_users_to_fix():
    assert describe_os_error(OSError(errno.EIO, "Input/output error", "/x")) is None
    assert describe_os_error(SafetensorError("invalid header")) is None
    assert describe_os_error(ValueError("(os error 28)")) is None  # only safetensors' wrapping is unwrapped


def test_a_writer_failing_on_a_disk_with_no_free_byte_is_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as an opaque RuntimeError; with no byte free, it is taken for ENOSPC."""
    from collections import namedtuple

    from lorafit.core.files import os_errors_named

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(OSError) as err, os_errors_named(tmp_path / "ckpt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "ckpt")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(100, 50, 50))
    with pytest.raises(RuntimeError), os_errors_named(tmp_path / "ckpt"):  # space left: a bug, left as it is
        raise RuntimeError("unexpected pos")
    with pytest.raises(OSError) as err, os_errors_named(tmp_path / "x.json"):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a failed write() raises: no file name
    assert err.value.filename == str(tmp_path / "x.json")


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
