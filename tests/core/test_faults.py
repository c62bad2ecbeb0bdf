"""The kill points: nothing happens unless LORAFIT_KILL_AT names the point (and step); then a SIGKILL."""

import os
import signal

import pytest

from lorafit.core import faults


@pytest.fixture
def kills(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    return sent


def test_a_kill_point_does_nothing_when_unset_or_not_named(monkeypatch, kills):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.kill_point("checkpoint:before-rename", 6)
    monkeypatch.setenv(faults.ENV, "checkpoint:before-rename@3,step@6")
    faults.kill_point("checkpoint:before-rename", 6)
    faults.kill_point("checkpoint:after-weights", 3)
    assert kills == []


def test_a_named_kill_point_sends_sigkill_to_this_process(monkeypatch, kills):
    monkeypatch.setenv(faults.ENV, "step@4, checkpoint:before-latest")
    faults.kill_point("step", 4)
    faults.kill_point("checkpoint:before-latest", 9)  # no @step: any step
    assert kills == [(os.getpid(), signal.SIGKILL)] * 2
