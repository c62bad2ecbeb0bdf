"""Data-parallel training under torchrun (lorafit.training.distributed): shards, exactness, FSDP2, resume, errors.

The unit tests check the pieces in this process. The slow ones start real `torchrun` runs of a tiny model on the
CPU with gloo, two processes of one thread each, and compare what they write:
- 2 processes (DDP, through `lorafit train --nproc 2`) against 1 process: per-step loss within 1e-5 relative and
  the final adapter within 1e-5, with LoRA dropout 0; and every other method, and a classifier, the same way;
- FSDP2 against DDP, the same way, and its adapter against the gathered checkpoint;
- with LoRA dropout 0.1, a run whose rank 1 is SIGKILLed at step 4, resumed on 2 processes, against a run on two
  "nodes" on loopback (torchrun --nnodes 2): the same bits;
- a checkpoint of the 2-process run resumed on 1 process: within 1e-5 of the 2-process run.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.core.config import ConfigError
from lorafit.training import distributed
from lorafit.training.config import load_run_config
from lorafit.training.distributed import World, launch_local, loss_terms, peer_failure, shard
from lorafit.training.loop import step_seed
from lorafit.training.recipe import train
from tests.conftest import (
    CLI_ENV,
    TINY_WORDS,
    run_cli,
    tiny_bert,
    tiny_job,
    tiny_run_args,
    tiny_run_config,
    tiny_tokenizer,
)

# --- the pieces ---


def _batch(rows: int, width: int = 32, seed: int = 0) -> dict:
    """A right-padded LM batch with prompt tokens masked, rows of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (rows,), generator=gen)
    ids = torch.randint(1, 50, (rows, width), generator=gen)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :2] = -100  # a two-token prompt
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _token_losses(batch: dict) -> torch.Tensor:
    """A stand-in per-token loss (any function of the tokens): the value at each labelled next-token position."""
    targets = batch["labels"][:, 1:]
    return torch.where(targets != -100, (batch["input_ids"][:, :-1] % 7).float() + 1, 0.0).sum(), \
        (targets != -100).sum()


@pytest.mark.parametrize("rows,size", [(8, 2), (5, 2), (7, 3), (2, 3)])
def test_shards_are_disjoint_and_their_weighted_losses_average_to_the_batch_loss(rows, size):
    batch = _batch(rows)
    total, count = _token_losses(batch)
    seen, weighted = 0, 0.0
    for rank in range(size):
        part, weight = shard(batch, World(rank, size))
        if weight == 0:  # an empty shard stands in with the first row, weighted 0
            assert torch.equal(part["input_ids"], batch["input_ids"][:1, :part["input_ids"].shape[1]])
            continue
        rows_here = part["input_ids"].shape[0]
        width = part["input_ids"].shape[1]
        assert torch.equal(part["input_ids"], batch["input_ids"][seen:seen + rows_here, :width])
        assert batch["attention_mask"][seen:seen + rows_here, width:].sum() == 0  # only padding was dropped
        seen += rows_here
        part_total, part_count = _token_losses(part)
        weighted += weight * (part_total / part_count).item()
    assert seen == rows
    assert weighted / size == pytest.approx((total / count).item(), rel=1e-6)


def test_one_process_takes_the_whole_batch():
    batch = _batch(4)
    part, weight = shard(batch, World())
    assert part is batch and weight == 1.0
    assert loss_terms({"input_ids": batch["input_ids"], "labels": torch.tensor([0, 1, 0, 2])}) == 4  # classifier rows


def test_every_step_and_rank_draws_its_own_seed():
    seeds = {step_seed(0, step, rank) for step in range(100) for rank in range(8)}
    assert len(seeds) == 800 and step_seed(1, 0, 0) not in seeds


def test_nproc_refuses_inside_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="started by torchrun already"):
        launch_local(2, ["train", "x.yaml"])


def test_a_failed_collective_reads_as_a_lost_peer_and_other_errors_do_not():
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    assert "another process of this run died" in peer_failure(lost)
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_fsdp_refuses_a_quantized_base_and_compile(tmp_path):
    job, model = tiny_job(tmp_path)
    with pytest.raises(ConfigError, match="FSDP2 cannot shard"):
        tiny_run_config(job, model, tmp_path / "out", "--train.parallel", "fsdp", "--model.quantize", "nf4")
    with pytest.raises(ConfigError, match="eager blocks"):
        tiny_run_config(job, model, tmp_path / "out", "--train.parallel", "fsdp", "--train.compile", "true")
    with pytest.raises(ConfigError, match="parallel: must be one of ddp, fsdp"):
        tiny_run_config(job, model, tmp_path / "out", "--train.parallel", "zero3")


# --- real torchrun runs ---

RUN = ("--lora.dropout", "0", "--train.lr", "2e-3", "--train.batch_size", "5", "--eval.compare_base", "false",
       "--eval.limit", "2", "--eval.max_new_tokens", "1")  # 6 steps of 2 micro-batches; checkpoints at 3 and 6
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _config_args(job, model, out, *extra) -> list[str]:
    """CONFIG and options of `lorafit train` for the run `tiny_run_config(job, model, out, *RUN, *extra)` is."""
    config = job / "run.yaml"
    config.write_text("out: unused\n")  # every key comes from the options
    return [str(config), *tiny_run_args(job, model, "--out", str(out), *RUN, *extra)]


def _torchrun(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**CLI_ENV, **ONE_THREAD, **(env or {})},
                          timeout=timeout)


def _two(job, model, out, *extra, env=None) -> subprocess.CompletedProcess:
    done = _torchrun("--standalone", "--nproc-per-node=2", "-m", "lorafit", "train",
                     *_config_args(job, model, out, *extra), env=env)
    return done


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_close_runs(a, b, tolerance=1e-5):
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 6
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lb)) <= tolerance, (la, lb)
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tolerance, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny job and its runs: 'one' (this process, one thread) and 'ddp' (`lorafit train --nproc 2`)."""
    job, model = tiny_job(tmp_path_factory.mktemp("dist"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_run_config(job, model, job / "one", *RUN), log=lambda message: None)
    finally:
        torch.set_num_threads(before)
    done = run_cli("train", *_config_args(job, model, job / "ddp"), "--nproc", "2", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return job, model


@pytest.mark.slow
def test_two_processes_train_what_one_does(runs):
    job, _ = runs
    _assert_close_runs(job / "one", job / "ddp")
    results = json.loads((job / "ddp" / "results.json").read_text())
    trainable_bytes = results["trainable_params"] * 4
    assert results["world_size"] == 2
    assert results["communication"]["allreduce_bytes_per_step"] == trainable_bytes  # LoRA gradients only, fp32
    assert json.loads((job / "one" / "results.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_fsdp2_trains_what_ddp_does_and_saves_a_whole_adapter(runs):
    job, model = runs
    done = _two(job, model, job / "fsdp", "--train.parallel", "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_close_runs(job / "ddp", job / "fsdp")
    gathered = load_file(job / "fsdp" / "checkpoints" / "step-000006" / "trainable.safetensors")
    adapter = _adapter(job / "fsdp")
    assert len(adapter) == len(gathered) > 0
    for key, value in gathered.items():  # model.X.lora.default.lora_A -> base_model.model.model.X.lora_A.weight
        module, _, part = key.rpartition(".lora.default.")
        saved = adapter[f"base_model.model.{module}.{part}.weight"]
        assert saved.numel() > 0 and saved.shape == value.shape and torch.equal(saved, value), key
    assert json.loads((job / "fsdp" / "results.json").read_text())["communication"]["parallel"] == "fsdp"


@pytest.fixture(scope="module")
def nodes(runs):
    """The tiny job on two "nodes" of one process each (torchrun --nnodes 2 on loopback), LoRA dropout 0.1."""
    job, model = runs
    port, agents = _free_port(), []
    for rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   f"--node-rank={rank}", f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "lorafit", "train",
                   *_config_args(job, model, job / "nodes", "--lora.dropout", "0.1")]
        agents.append(subprocess.Popen(command, env={**CLI_ENV, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True))
    for agent in agents:
        _, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-3000:]
    return job / "nodes"


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_resume_draws_and_ends_as_the_uninterrupted_run(runs, nodes):
    """Killed and resumed on one node, with dropout: the two-node run's losses and adapter, bit for bit. So the
    dropout masks depend on (seed, step, rank) alone: not on the launch, the node layout or the resume."""
    job, model = runs
    out = job / "killed"
    done = _two(job, model, out, "--lora.dropout", "0.1", env={"LORAFIT_KILL_AT": "step@4", "LORAFIT_KILL_RANK": "1"})
    assert done.returncode != 0
    assert "rank 0: another process of this run died" in done.stderr  # rank 0's clear message, no hang
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000003"]
    done = _two(job, model, out, "--lora.dropout", "0.1", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(out) == _losses(nodes)
    assert _adapter(out).keys() == _adapter(nodes).keys()
    assert all(torch.equal(value, _adapter(nodes)[key]) for key, value in _adapter(out).items())
    dropped = _adapter(job / "ddp")  # the same run with dropout 0 ends elsewhere: the masks took effect
    assert not all(torch.equal(value, dropped[key]) for key, value in _adapter(out).items())


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    job, model = runs
    shutil.copytree(job / "ddp", job / "ddp-one")
    shutil.rmtree(job / "ddp-one" / "checkpoints" / "step-000006")  # back to the checkpoint at step 3
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_run_config(job, model, job / "ddp-one", *RUN), resume=True, log=lambda message: None)
    finally:
        torch.set_num_threads(before)
    _assert_close_runs(job / "ddp-one", job / "ddp")


METHODS = {  # every method that trains (bitfit on the classifier below), and a classifier: its loss averages rows
    "full": ["--method.name", "full"],
    "adapter": ["--method.name", "adapter", "--method.bottleneck", "8"],
    "prompt": ["--method.name", "prompt", "--method.virtual_tokens", "4"],
    "prefix": ["--method.name", "prefix", "--method.virtual_tokens", "4"],
    "freeze": ["--method.name", "freeze", "--method.top_blocks", "1"],
    "mezo": ["--method.name", "mezo", "--train.lr", "1e-3"],
    "fsdp-bf16": ["--train.parallel", "fsdp", "--train.precision", "bf16"],  # bf16 gathers, fp32 reduction
}
TOLERANCE = {"fsdp-bf16": 2e-2}  # bf16 products: a few bits of 8 differ between one process's shapes and two


@pytest.mark.slow
def test_every_method_a_classifier_and_fsdp_in_bf16_train_on_two_processes_as_on_one(runs, tmp_path):
    job, model = runs
    encoder = tiny_bert().bert
    encoder.config.hidden_dropout_prob = encoder.config.attention_probs_dropout_prob = 0.0  # BERT's own dropout
    encoder.save_pretrained(tmp_path / "encoder")  # draws per rank: off, for an exact comparison
    tiny_tokenizer().save_pretrained(tmp_path / "encoder")
    rows = [{"text": f"{a} {b}", "label": {"cat": "animal", "dog": "animal"}.get(a, "word")}
            for a in TINY_WORDS for b in TINY_WORDS] * 2
    (tmp_path / "classes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    classify = ["--model.name", str(tmp_path / "encoder"), "--model.task", "classification", "--data.train",
                str(tmp_path / "classes.jsonl"), "--data.validation", str(tmp_path / "classes.jsonl"),
                "--data.format", "classification", "--lora.targets", "[query, value]"]
    runs_of = {name: [*tiny_run_args(job, model, *RUN, *extra)] for name, extra in METHODS.items()}
    runs_of["classifier"] = [*tiny_run_args(job, model, *RUN), *classify]
    runs_of["classifier-bitfit"] = [*runs_of["classifier"], "--method.name", "bitfit"]  # Llama has no biases
    spec = {name: {"one": [*args, "--out", str(tmp_path / name / "one")],
                   "two": [*args, "--out", str(tmp_path / name / "two")]} for name, args in runs_of.items()}
    (tmp_path / "spec.json").write_text(json.dumps({"runs": [[n, s["two"]] for n, s in spec.items()]}))
    script = Path(__file__).with_name("dist_methods.py")
    done = _torchrun("--standalone", "--nproc-per-node=2", str(script), str(tmp_path / "spec.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in spec.values():
            train(load_run_config(None, args["one"]), log=lambda message: None)
    finally:
        torch.set_num_threads(before)
    for name in spec:
        one, two = tmp_path / name / "one", tmp_path / name / "two"
        la, lb = _losses(one), _losses(two)
        worst = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
        assert len(la) == len(lb) == 6 and worst <= TOLERANCE.get(name, 1e-5), (name, la, lb)
        assert json.loads((two / "results.json").read_text())["world_size"] == 2
    full = json.loads((tmp_path / "full" / "two" / "results.json").read_text())
    assert full["communication"]["allreduce_bytes_per_step"] == 4 * full["trainable_params"]  # every weight


def test_the_world_is_one_process_outside_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() == World(3, 4, 1) and not distributed.launched().main
