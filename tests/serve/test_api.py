"""`lorafit serve` as a real process, spoken to with the official openai client: models, completions, chat,
streaming, usage, errors, adapters loaded and unloaded at run time, disconnects, metrics, and a loopback soak."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import CONTEXT, save_adapters, serving, serving_model

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: adapters a and b at start-up; inside the --adapter-dir c, a method result, a
    pickled adapter and a link to d, which lies outside; max 2 adapters in memory (a third evicts one)."""
    root = tmp_path_factory.mktemp("serve")
    model = serving_model(root / "model")
    save_adapters(model, {"a": root / "a", "b": root / "b", "c": root / "dir" / "c", "d": root / "outside" / "d"})
    (root / "dir" / "method").mkdir()
    (root / "dir" / "method" / "method_config.json").write_text(json.dumps({"method": {"name": "houlsby"}}))
    (root / "dir" / "link").symlink_to(root / "outside" / "d")
    (root / "dir" / "pickled").mkdir()  # PEFT's old format: weights as a pickle, which may run code on load
    (root / "dir" / "pickled" / "adapter_config.json").write_text((root / "a" / "adapter_config.json").read_text())
    (root / "dir" / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    args = [model, "--adapter", f"a={root / 'a'}", "--adapter", f"b={root / 'b'}", "--adapter-dir", root / "dir",
            "--max-adapters", "2", "--max-batch", "4", "--threads", "1", "--dtype", "fp32", "--api-key", KEY]
    with serving(args, root / "server.log") as running:
        running.root, running.model = root, str(model)
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, model, prompt="hello cat", **kwargs):
    return client.completions.create(model=model, prompt=prompt, **{"max_tokens": 8, "temperature": 0, **kwargs})


def streamed(client, model, prompt="hello cat", **kwargs) -> tuple[str, list]:
    """(the text, every chunk) of a streamed completion."""
    chunks = list(complete(client, model, prompt, stream=True, **kwargs))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def metrics(server) -> dict:
    """{(name, labels...): value} of every sample of /metrics."""
    text = httpx2.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, *s.labels.values()): s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(server, client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {server.model, "a", "b"}
    assert cards[server.model].parent is None and cards["a"].parent == cards["b"].parent == server.model
    assert cards["a"].max_model_len == CONTEXT


def test_completions_answer_with_usage_and_each_adapter_answers_differently(server, client):
    answers = {name: complete(client, name) for name in (server.model, "a", "b")}
    for answer in answers.values():
        assert answer.object == "text_completion" and answer.choices[0].finish_reason == "length"
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (2, 8, 10)
    texts = [a.choices[0].text for a in answers.values()]
    assert len(set(texts)) == 3
    assert complete(client, "a").choices[0].text == answers["a"].choices[0].text  # greedy: the same again


def test_chat_goes_through_the_chat_template(server, client):
    """The chat answer is the completion of the template's text (`role content ` per message, then `assistant`)."""
    messages = [{"role": "system", "content": "dog"}, {"role": "user", "content": "hello cat"}]
    chat = client.chat.completions.create(model="b", messages=messages, max_completion_tokens=6, temperature=0)
    plain = complete(client, "b", "system dog user hello cat assistant", max_tokens=6)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens == 6 and chat.usage.completion_tokens == 6


def test_a_stream_gives_the_whole_answers_text_and_usage(server, client):
    for model in (server.model, "a"):
        text, chunks = streamed(client, model, max_tokens=12, stream_options={"include_usage": True})
        whole = complete(client, model, max_tokens=12)
        assert text == whole.choices[0].text and len(chunks) > 3
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    pieces = list(client.chat.completions.create(model="a", messages=[{"role": "user", "content": "cat"}],
                                                 max_tokens=5, temperature=0, stream=True))
    whole = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "cat"}], max_tokens=5,
                                           temperature=0)
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].usage is None
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == whole.choices[0].message.content


def test_stop_strings_cut_the_answer_and_a_seed_repeats_a_sampled_one(server, client):
    words = complete(client, "a").choices[0].text.split()
    k = next(i for i in range(1, 7) if words[i] not in words[:i])  # the first word not seen before it
    cut = complete(client, "a", stop=[f" {words[k]} ", "nothing"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == " ".join(words[:k])
    assert streamed(client, "a", stop=f" {words[k]} ")[0] == cut.choices[0].text
    sampled = [complete(client, "b", temperature=1.5, top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] != complete(client, "b", temperature=1.5, seed=8).choices[0].text


def test_bad_requests_are_openai_errors_and_the_server_stays_up(server, client):
    cases = [
        (openai.NotFoundError, "model", dict(model="nope")),
        (openai.BadRequestError, "temperature", dict(model="a", temperature=2.5)),
        (openai.BadRequestError, "top_p", dict(model="a", top_p=0)),
        (openai.BadRequestError, "n", dict(model="a", n=2)),
        (openai.BadRequestError, "prompt", dict(model="a", prompt="cat " * CONTEXT)),
        (openai.BadRequestError, "max_tokens", dict(model="a", max_tokens=CONTEXT - 1)),
        (openai.BadRequestError, "prompt", dict(model="a", prompt=[3, 1000])),
        (openai.BadRequestError, "stop", dict(model="a", stop=[""])),
        (openai.BadRequestError, "logprobs", dict(model="a", logprobs=2)),
        (openai.BadRequestError, "seed", dict(model="a", seed=2**64)),
        (openai.BadRequestError, "ignore_eos", dict(model="a", extra_body={"ignore_eos": "yes"})),
    ]
    for error, param, kwargs in cases:
        with pytest.raises(error) as caught:
            complete(client, **kwargs)
        assert caught.value.body["param"] == param, caught.value.body
        assert caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status in [(b'{"model": "a", "prompt": ', 400), (b"[1, 2]", 400), (b"\xff\xfe", 400),
                         (b" " * (1 << 21), 413)]:
        answer = httpx2.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
        assert answer.status_code == status and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert complete(client, "a", extra_body={"ignore_eos": True}).choices[0].finish_reason == "length"


def test_the_api_key_is_required_on_v1(server):
    for key in ("", "wrong", f"{KEY}x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            complete(openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "-", max_retries=0), "a")
        assert caught.value.body["code"] == "invalid_api_key"
    assert httpx2.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert httpx2.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def load(server, name, path):
    return httpx2.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def unload(server, name):
    return httpx2.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def test_adapters_load_and_unload_at_run_time_while_streams_run(server, client):
    """Long streams on a and b run while c is loaded (evicting one of them from memory: 2 slots), answers, streams
    too, and is unloaded mid-stream: every stream ends whole, and c is gone afterwards."""
    results = {}

    def run(key, model):
        results[key] = streamed(client, model, max_tokens=300, stream_options={"include_usage": True})

    threads = [threading.Thread(target=run, args=(key, key)) for key in ("a", "b")]
    for t in threads:
        t.start()
    assert load(server, "c", "c").status_code == 200  # relative: looked up in the --adapter-dir
    assert load(server, "c", "c").status_code == 400  # already loaded
    assert complete(client, "c").usage.completion_tokens == 8
    threads.append(threading.Thread(target=run, args=("c", "c")))
    threads[-1].start()
    while metrics(server).get(("lorafit_requests_total", "c"), 0) < 2:
        time.sleep(0.01)  # until the c stream has started
    assert unload(server, "c").status_code == 200
    for t in threads:
        t.join(60)
    for key in ("a", "b", "c"):
        text, chunks = results[key]
        assert chunks[-1].usage.completion_tokens == 300 and chunks[-2].choices[0].finish_reason == "length", key
    for key in ("a", "b"):  # undisturbed by the loads: the same as alone
        assert results[key][0] == complete(client, key, max_tokens=300).choices[0].text
    with pytest.raises(openai.NotFoundError):
        complete(client, "c")
    assert unload(server, "c").status_code == 404
    assert {m.id for m in client.models.list().data} == {server.model, "a", "b"}


def test_run_time_loads_stay_inside_the_adapter_dir(server):
    root = server.root
    refused = {"outside": root / "outside" / "d", "dotdot": "c/../../outside/d", "link": "link",
               "missing": "nothing-here", "file": root / "dir" / "c" / "adapter_config.json"}
    for name, path in refused.items():
        answer = load(server, name, path)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "lora_path", (name, answer.text)
    method = load(server, "m", "method")
    assert method.status_code == 400 and "not a LoRA adapter" in method.json()["error"]["message"]
    pickled = load(server, "p", "pickled")
    assert pickled.status_code == 400 and "safetensors only" in pickled.json()["error"]["message"]
    assert load(server, "a", "c").status_code == 400 and load(server, "bad name", "c").status_code == 400
    assert unload(server, server.model).status_code == 400


def test_a_client_that_goes_away_mid_stream_frees_its_slot(server):
    before = metrics(server).get(("lorafit_requests_finished_total", "cancelled"), 0)
    body = {"model": "a", "prompt": "hello", "max_tokens": CONTEXT - 10, "stream": True}
    with httpx2.stream("POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30) as answer:
        assert next(answer.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 10
    while metrics(server).get(("lorafit_requests_finished_total", "cancelled"), 0) == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert metrics(server)[("lorafit_requests_running",)] == 0
    assert httpx2.get(f"{server.url}/health", timeout=10).json() == {"status": "ok", "waiting": 0, "running": 0}


def test_metrics_report_the_engine(server, client):
    complete(client, "b")
    seen = metrics(server)
    for name in ("lorafit_requests_waiting", "lorafit_requests_running", "lorafit_tokens_per_second",
                 "lorafit_generated_tokens_total", "lorafit_adapters_resident", "lorafit_batch_slots"):
        assert (name,) in seen, name
    assert seen[("lorafit_threads",)] == 1 and seen[("lorafit_max_model_len",)] == CONTEXT
    assert seen[("lorafit_requests_total", "b")] >= 1 and seen[("lorafit_requests_total", server.model)] >= 1
    assert seen[("lorafit_adapters_resident",)] <= 2 and seen[("lorafit_generated_tokens_total",)] > 0


def test_the_root_serves_the_playground_page_or_its_placeholder(server):
    page = httpx2.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_soak_mixed_adapters_lose_nothing_and_memory_stays_flat(server, client):
    """8 clients, 48 requests over base, a and b (half streamed): none lost, none refused, RSS bounded."""
    models = [server.model, "a", "b"]
    rss_before = server.rss_kib()

    def one(i):
        model = models[i % 3]
        try:
            if i % 2:
                _, chunks = streamed(client, model, f"hello w{i}", stream_options={"include_usage": True})
                counts = chunks[-1].usage
            else:
                counts = complete(client, model, f"hello w{i}").usage
            return "ok" if counts.completion_tokens == 8 else "lost"
        except openai.APIStatusError as err:
            return f"status {err.status_code}"

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(48)))
    seconds = time.perf_counter() - start
    rss_after = server.rss_kib()
    print(f"soak: 48 requests, 8 clients, {seconds:.2f} s; lost {outcomes.count('lost')}, "
          f"non-2xx {sum(o.startswith('status') for o in outcomes)}; RSS {rss_before / 1024:.1f} -> "
          f"{rss_after / 1024:.1f} MiB")
    assert outcomes == ["ok"] * 48
    assert rss_after - rss_before < 64 * 1024  # KiB: a leak of a few KiB per request would still pass; MiBs not
    assert httpx2.get(f"{server.url}/health", timeout=10).json()["running"] == 0
