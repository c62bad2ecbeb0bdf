"""kill -9 at exact points of a `lorafit train` run (LORAFIT_KILL_AT, see lorafit.core.faults), then --resume:
the adapter ends bit-identical to an uninterrupted run's, metrics.jsonl has exactly one row per step (the same
rows), and nothing temporary is left behind.

The run: 8 steps, a checkpoint every 3, so checkpoints at steps 3 and 6 and the final one at 8. The runs to be
killed are children of a fork server that has lorafit imported (a second each, where a fresh `lorafit train`
takes several); one goes through the real command. Every run here uses one thread (OMP_NUM_THREADS=1, or
torch.set_num_threads(1) through tests/conftest.py's `one_thread`), so the same steps give the same bits in every
process.
"""

import json
import multiprocessing
import os
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from lorafit.core.faults import ENV
from lorafit.training.config import load_run_config
from lorafit.training.recipe import train
from tests.conftest import run_cli, tiny_job, tiny_run_config

RUN = ("--train.steps", "8", "--train.save_every", "3", "--eval.compare_base", "false", "--eval.limit", "2")
SCENARIOS = [  # (where the run is killed, the checkpoint the resume continues from)
    ("step@5", "step-000003"),  # between two checkpoints
    ("checkpoint:after-weights@6", "step-000003"),  # inside a checkpoint write: the temp folder half written
    ("checkpoint:before-rename@6", "step-000003"),  # the temp folder complete, not yet renamed into place
    ("checkpoint:before-latest@6", "step-000003"),  # step-6 in place, latest.json still naming step-3
    ("checkpoint:before-rename@8", "step-000006"),  # inside the final save
    ("checkpoint:before-latest@8", "step-000006"),  # the final checkpoint in place, latest.json not yet
]
# Three more kill points drawn at random (seeded, so every run draws the same) from every point a resume can
# continue after: any step from 4 on, any point of the checkpoint writes at steps 6 and 8, and the one at step 3
# that leaves a complete checkpoint behind.
KILLABLE = [f"step@{step}" for step in range(4, 9)] + ["checkpoint:before-latest@3"] + [
    f"checkpoint:{where}@{step}" for where in ("after-weights", "before-rename", "before-latest") for step in (6, 8)]
DRAWN = [(point, None) for point in random.Random(20261203).sample(sorted(set(KILLABLE) - dict(SCENARIOS).keys()), 3)]


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose children fork from a server that has imported lorafit and this module."""
    multiprocessing.set_forkserver_preload(["lorafit.training.recipe", __name__])  # read when the server starts
    return multiprocessing.get_context("forkserver")


def _run_until_killed(config: str, point: str) -> None:
    """In a fork-server child: `lorafit train CONFIG --overwrite` with LORAFIT_KILL_AT=point (it ends in SIGKILL)."""
    os.environ[ENV] = point
    torch.set_num_threads(1)
    train(load_run_config(config), overwrite=True, log=lambda _: None)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def reference(job, one_thread):
    """The uninterrupted run: its adapter tensors and metrics rows."""
    out = job[0] / "reference"
    train(tiny_run_config(*job, out, *RUN), log=lambda _: None)
    return load_file(out / "adapter" / "adapter_model.safetensors"), _metrics(out)


def _metrics(out):
    """metrics.jsonl without the timings (tokens per second differ from run to run)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def _kill(forkserver, config, point, command):
    """Run CONFIG until the kill point, as a fork-server child or (`command`) as the real `lorafit train`."""
    if command:
        killed = run_cli("train", str(config), "--overwrite", env={ENV: point, "OMP_NUM_THREADS": "1"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        return
    child = forkserver.Process(target=_run_until_killed, args=(str(config), point))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("point, resumed_from", SCENARIOS + DRAWN)
def test_a_run_killed_at_any_point_resumes_to_the_same_adapter(job, reference, one_thread, forkserver, tmp_path,
                                                               point, resumed_from):
    out = tmp_path / "run"
    cfg = tiny_run_config(*job, out, *RUN)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    _kill(forkserver, config, point, command=point == "checkpoint:before-latest@8")

    said = []
    train(cfg, resume=True, log=said.append)
    if resumed_from is not None:
        assert f"resumed from {out / 'checkpoints' / resumed_from} at step {int(resumed_from[-6:])}" in said
    adapter, rows = reference
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys()
    for name, tensor in adapter.items():
        assert torch.equal(resumed[name], tensor), name
    assert _metrics(out) == rows and [row["step"] for row in rows] == list(range(1, 9))
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-000006", "step-000008"]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step-000008"
