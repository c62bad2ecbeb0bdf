"""An adapter folder is replaced as a whole: concurrent readers never pair one save's weights with another's
config, and a failed save leaves the previous adapter as it was."""

import errno
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lorafit
from lorafit.core import folders

# Two adapters told apart both ways: alpha 8 goes with weights of 1.0, alpha 32 with weights of 2.0.
PAIRS = {8.0: 1.0, 32.0: 2.0}
BUILD = """
import torch
from torch import nn
import lorafit

def model(alpha, value):
    net = nn.Sequential(nn.Linear(8, 8))
    lorafit.inject(net, lorafit.LoraConfig(r=2, alpha=alpha, targets=["0"]))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.fill_(value)
    return net
"""
WRITER = BUILD + """
import sys, time
folder, seconds = sys.argv[1], float(sys.argv[2])
nets = [model(alpha, value) for alpha, value in {pairs}.items()]
print("ready", flush=True)
end, saves = time.monotonic() + seconds, 0
while time.monotonic() < end:
    lorafit.save_adapter(nets[saves % 2], folder)
    saves += 1
print(saves)
"""


def _model(alpha: float, value: float) -> nn.Module:
    namespace: dict = {}
    exec(BUILD, namespace)  # the same builder the writer process runs
    return namespace["model"](alpha, value)


def test_concurrent_saves_and_loads_never_mix_two_adapters(tmp_path):
    folder = tmp_path / "adapter"
    lorafit.save_adapter(_model(8.0, 1.0), folder)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER.format(pairs=PAIRS)), str(folder), "4"],
                              stdout=subprocess.PIPE, text=True)
    # Wait for the writer's imports: on a slow machine all 20,000 loads could otherwise come before its first save.
    assert writer.stdout.readline().strip() == "ready"
    loads, mixed, seen = 0, 0, set()
    while writer.poll() is None and loads < 20_000:
        cfg, tensors = lorafit.read_adapter(folder)
        values = {float(t.flatten()[0]) for t in tensors.values()}
        mixed += values != {PAIRS[cfg.alpha]}
        seen.add(cfg.alpha)
        loads += 1
    saves = int(writer.communicate(timeout=60)[0])
    assert writer.returncode == 0
    assert mixed == 0, f"{mixed} of {loads} loads paired one adapter's weights with the other's alpha"
    assert loads >= 1000 and saves >= 100 and seen == set(PAIRS)  # both versions were read, many times
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left behind


def test_a_save_that_fails_midway_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    lorafit.save_adapter(_model(8.0, 1.0), folder, side_files={"labels.json": ["a", "b"]})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 64)  # part of the file was written, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(folders, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        lorafit.save_adapter(_model(32.0, 2.0), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    cfg, tensors = lorafit.read_adapter(folder)
    assert cfg.alpha == 8.0 and all(float(t.flatten()[0]) == 1.0 for t in tensors.values())


def test_a_save_replaces_the_whole_folder_side_files_included(tmp_path):
    folder = tmp_path / "adapter"
    lorafit.save_adapter(_model(8.0, 1.0), folder, side_files={"labels.json": ["a", "b"]})
    assert json.loads((folder / "labels.json").read_text()) == ["a", "b"]
    lorafit.save_adapter(_model(32.0, 2.0), folder)  # a causal-LM adapter over a classifier's folder
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert oct(folder.stat().st_mode & 0o777) != oct(0o700)  # the folder takes the umask, as files do


def test_non_finite_tensors_are_refused_naming_the_tensor(tmp_path):
    net = _model(8.0, 1.0)
    with torch.no_grad():
        net[0].lora["default"].lora_B[0, 0] = float("nan")
    lorafit.save_adapter(net, tmp_path / "adapter")
    with pytest.raises(lorafit.AdapterFileError, match=r"0\.lora_B\.weight holds NaN or infinite"):
        lorafit.read_adapter(tmp_path / "adapter")
