"""The server's app in this process (no port, no subprocess): a full queue, run-time loading switched off,
`--merge`, and the command's option errors."""

import asyncio
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from lorafit.cli import main
from lorafit.inference.engine import Engine
from lorafit.inference.requests import Event, Request, Sampling
from lorafit.serve import create_app
from lorafit.serve.server import ServeOptions, build_engine
from lorafit.serve.service import Stream
from tests.conftest import tiny_llama
from tests.serve.conftest import save_adapters, serving_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # engines set torch's threads; the fixture puts them back


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    model = serving_model(root / "model")
    save_adapters(model, {"a": root / "a"})
    return root


def test_a_full_queue_answers_429_with_retry_after_and_is_counted():
    """The engine thread is held inside a command, so the one queued request stays queued: the next is refused."""
    engine = Engine(tiny_llama(), word_tokenizer(), max_queue=1).start()
    client = TestClient(create_app(engine, "tiny"))
    held, release = threading.Event(), threading.Event()
    engine.call(lambda: (held.set(), release.wait(30)))
    try:
        assert held.wait(30)
        engine.submit(Request([5], None, Sampling(max_tokens=1), lambda event: None, engine.tokenizer))
        answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        error = answer.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "waiting" in error["message"]
        samples = {(s.name, *s.labels.values()): s.value
                   for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
        assert samples[("lorafit_requests_rejected_total", "queue_full")] == 1
        assert samples[("lorafit_requests_waiting",)] == 1
    finally:
        release.set()
        engine.stop()


def test_a_sink_never_raises_once_its_event_loop_is_closed():
    """The engine thread calls sinks; an exception there would fail the whole batch, so a request whose server
    loop is gone (shutting down) must be a silent no-op."""

    async def make() -> Stream:
        return Stream()

    loop = asyncio.new_event_loop()
    stream = loop.run_until_complete(make())
    stream.sink(Event(text="before"))
    loop.close()
    stream.sink(Event(text="after", finish_reason="stop"))
    assert stream.queue.qsize() == 0  # "before" was scheduled on the loop, which never ran it


def test_run_time_loading_is_off_without_an_adapter_dir(folders):
    engine = Engine(tiny_llama(), word_tokenizer())  # never started: the refusal comes before any engine work
    client = TestClient(create_app(engine, "tiny"))
    answer = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(folders / "a")})
    assert answer.status_code == 400 and "--adapter-dir" in answer.json()["error"]["message"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


def test_merge_serves_the_adapter_folded_into_the_base_under_its_name(folders):
    """Greedy answers of the merged model equal those of the adapter served beside the base (same weights, two
    ways: folded in, or added per row)."""
    common = dict(model=str(folders / "model"), adapters=[f"a={folders / 'a'}"], dtype="fp32", threads=1)
    merged, served = build_engine(ServeOptions(**common, merge=True), log=lambda line: None)
    banked, base = build_engine(ServeOptions(**common), log=lambda line: None)
    merged.start(), banked.start()
    try:
        assert served == "a" and merged.adapters is None and base == str(folders / "model")
        merged_app, banked_app = TestClient(create_app(merged, served)), TestClient(create_app(banked, base))
        assert [m["id"] for m in merged_app.get("/v1/models").json()["data"]] == ["a"]
        body = {"model": "a", "prompt": "hello cat dog", "max_tokens": 12, "temperature": 0}
        answers = [app.post("/v1/completions", json=body).json() for app in (merged_app, banked_app)]
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
        plain = banked_app.post("/v1/completions", json={**body, "model": base}).json()
        assert plain["choices"][0]["text"] != answers[0]["choices"][0]["text"]  # the adapter changes the answer
        refused = merged_app.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"})
        assert refused.status_code == 400 and "--merge" in refused.json()["error"]["message"]
    finally:
        merged.stop()
        banked.stop()


@pytest.mark.parametrize("args, message", [
    (["--merge"], "--merge folds exactly one --adapter"),
    (["--dtype", "fp16"], "--dtype must be one of bf16, fp32"),
    (["--adapter", "bad name=x"], "expected NAME=PATH"),
    (["--adapter", "a=nowhere"], "nowhere is not a folder"),
    (["--adapter-dir", "nowhere"], "--adapter-dir nowhere: not a folder"),
])
def test_option_errors_are_one_line_before_any_model_loads(folders, capsys, monkeypatch, args, message):
    monkeypatch.chdir(folders)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "model", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
