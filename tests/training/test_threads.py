"""Library code shares nothing unsafely between threads and leaves process-wide settings to the entry point."""

import threading

import torch

from lorafit.training import loss as loss_module
from lorafit.training.loss import linear_cross_entropy


def _in_threads(work, count: int = 2) -> list:
    """Run work(i) in `count` threads started together; returns their results in order."""
    results, barrier = [None] * count, threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_each_thread_gets_its_own_loss_scratch_buffers():
    def buffer_address(i: int) -> int:
        return loss_module._scratch("product", 4, 8, torch.float32, torch.device("cpu")).data_ptr()

    first, second = _in_threads(buffer_address)
    assert first != second
    here = loss_module._scratch("product", 4, 8, torch.float32, torch.device("cpu")).data_ptr()
    assert here not in (first, second)
    loss_module.release_scratch()  # frees this thread's only; the next call makes a new buffer
    assert "buffers" not in loss_module._local.__dict__


def test_the_chunked_loss_in_two_threads_at_once_equals_each_computed_alone():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=gen)  # (V, H)
    inputs = [(torch.randn(40, 16, generator=gen), torch.randint(0, 300, (40,), generator=gen)) for _ in range(2)]
    alone = [linear_cross_entropy(h, weight, t, chunk=8) for h, t in inputs]

    def loss(i: int) -> torch.Tensor:
        return torch.stack([linear_cross_entropy(*inputs[i][:1], weight, inputs[i][1], chunk=8) for _ in range(20)])

    for i, losses in enumerate(_in_threads(loss)):
        torch.testing.assert_close(losses, alone[i].expand(20), rtol=0, atol=0)


def test_train_runs_in_a_worker_thread_and_leaves_the_allocator_alone(tmp_path, monkeypatch):
    """train() is a library function: it sets no allocator option (the `lorafit train` command does, at its start)
    and installs no signal handler outside the main thread, so a server can run it from a thread."""
    from lorafit.training.cpu import memory
    from lorafit.training.recipe import train
    from tests.conftest import tiny_job, tiny_run_config

    def no_allocator_changes():
        raise AssertionError("a library function reached for the C library's allocator controls")

    monkeypatch.setattr(memory, "c_library", no_allocator_changes)
    job, model = tiny_job(tmp_path)
    cfg = tiny_run_config(job, model, tmp_path / "run", "--train.steps", "2")
    (report,) = _in_threads(lambda i: train(cfg, log=lambda _: None), count=1)
    assert report["steps"] == 2 and report["allocator"] == "the C library's default"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_lorafit_train_keeps_freed_memory_from_its_entry_point(tmp_path):
    """The command, not the library, sets the allocator: its results say so."""
    import json

    from tests.conftest import run_cli, tiny_run_yaml

    done = run_cli("train", str(tiny_run_yaml(tmp_path)))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["allocator"] == "glibc, freed memory kept for reuse"
