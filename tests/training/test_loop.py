"""The training loop saves each step at most once: the last step, when it is also on the save_every schedule,
is not written a second time (the second write is what once deleted step-N before its copy was in place)."""

from lorafit.training import loop
from lorafit.training.recipe import train
from tests.conftest import tiny_job, tiny_run_config


def test_the_last_step_is_saved_once(tmp_path, monkeypatch, one_thread):
    saved = []
    real = loop.save_checkpoint

    def spy(folder, model, optimizer, state, **kwargs):
        saved.append(state["step"])
        return real(folder, model, optimizer, state, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    job, model = tiny_job(tmp_path)
    train(tiny_run_config(job, model, tmp_path / "run", "--eval.compare_base", "false"), log=lambda _: None)
    assert saved == [3, 6]  # steps 6, save_every 3
    train(tiny_run_config(job, model, tmp_path / "run", "--train.steps", "7", "--eval.compare_base", "false"),
          overwrite=True, log=lambda _: None)
    assert saved == [3, 6, 3, 6, 7]  # a last step off the schedule gets its own checkpoint
