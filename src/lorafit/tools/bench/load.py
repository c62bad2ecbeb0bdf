"""Load for a serving benchmark: N concurrent clients streaming chat completions from an OpenAI-compatible server,
and what they measured (tokens/s, time to first token, inter-token latency).

The clients are threads with the standard library's HTTP client: no client library's parsing sits between the
server's bytes and the clock, and every server in the comparison is read the same way.
"""

from __future__ import annotations

import http.client
import json
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

TOPICS = ["the sea", "a mountain", "coffee", "rain", "a library", "the moon", "bicycles", "bread", "winter",
          "a lighthouse", "trains", "gardens", "chess", "rivers", "music", "the desert"]
PROMPTS = [f"Write two sentences about {topic}." for topic in TOPICS]


@dataclass
class Result:
    """One request as its client saw it."""

    ok: bool
    tokens: int = 0
    ttft: float = float("nan")  # seconds from sending to the first piece of text
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive pieces
    error: str = ""


def stream_chat(url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None,
                timeout: float = 600) -> Result:
    """Send one streamed greedy chat completion (with the `extra` body fields) and time its pieces."""
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return Result(ok=False, error=f"HTTP {response.status}: {response.read()[:200]!r}")
        return _read_events(response, started)
    except OSError as err:
        return Result(ok=False, error=f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def _read_events(response, started: float) -> Result:
    """Read server-sent events to [DONE]: piece times, and the token count from `usage` (else the pieces)."""
    times, usage = [], None
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"].get("completion_tokens")
        choices = event.get("choices") or [{}]
        if (choices[0].get("delta") or {}).get("content"):
            times.append(time.perf_counter())
    if not times:
        return Result(ok=False, error="no text came back")
    gaps = [b - a for a, b in zip(times, times[1:])]
    return Result(ok=True, tokens=usage or len(times), ttft=times[0] - started, gaps=gaps)


def run_clients(url: str, requests: list[tuple[str, str]], clients: int, max_tokens: int,
                extra: dict | None = None) -> tuple[list[Result], float]:
    """`clients` threads take (model, prompt) pairs from `requests` in order until none are left; returns the
    results in request order and the wall time of the whole load."""
    todo: queue.Queue = queue.Queue()
    for i, request in enumerate(requests):
        todo.put((i, request))
    results: list[Result | None] = [None] * len(requests)

    def client() -> None:
        while True:
            try:
                i, (model, prompt) = todo.get_nowait()
            except queue.Empty:
                return
            results[i] = stream_chat(url, model, prompt, max_tokens, extra)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - started


def wait_ready(url: str, proc: subprocess.Popen, path: str = "/health", timeout: float = 300) -> None:
    """Poll `path` until the server answers 200; RuntimeError if its process ends or time runs out."""
    where = urlparse(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection(where.hostname, where.port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")
