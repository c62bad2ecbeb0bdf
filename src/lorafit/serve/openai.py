"""The OpenAI API's shapes, as vLLM serves them: request bodies checked into what the engine needs, and the
bodies, stream chunks and errors of the answers.

Checking happens here, once, at the edge: a value the engine would choke on (a token id outside the vocabulary,
a stop list that is not a list) is a 400 that names the field, never a 500 or a failed batch.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..inference.requests import BadRequest, Sampling

# Fields this server does not implement, with the values that mean "not asked for". Another value is refused
# (400) rather than silently ignored: a client asking for logprobs or tools must not get an answer without them.
UNSUPPORTED = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class Job:
    """One checked generation request."""

    chat: bool  # /v1/chat/completions (messages through the chat template) or /v1/completions (a raw prompt)
    model: str | None  # the base's or an adapter's name as the client sent it; None: the base
    prompt: str | list[int] | None  # completions: text, or token ids
    messages: list[dict] | None  # chat: [{"role", "content"}], content as text
    sampling: Sampling  # max_tokens is a placeholder while max_tokens_given is False
    max_tokens_given: bool  # False: the server picks (COMPLETIONS_MAX_TOKENS, or the rest of the context)
    max_tokens_field: str  # the field the client set it with: max_tokens or (chat) max_completion_tokens
    stream: bool  # answer as server-sent events
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage counts


def parse(body: dict, chat: bool, max_len: int) -> Job:
    """The Job a request body asks for; ApiError 400 naming the field for anything out of shape."""
    for key, allowed in UNSUPPORTED.items():
        if not any(_same(body.get(key), value) for value in allowed):
            why = "this server returns one choice per request" if key in ("n", "best_of") else "not supported here"
            raise bad(f"{key}={body[key]!r}: {why}", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {model!r}", "model")
    budget = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(budget)
    sampling = Sampling(max_tokens=1 if max_tokens is None else max_tokens, temperature=_number(body, "temperature"),
                        top_p=_number(body, "top_p"), seed=body.get("seed"), stop=_stop(body.get("stop")),
                        ignore_eos=False if body.get("ignore_eos") is None else body["ignore_eos"])  # vLLM's
    try:
        sampling.check(max_len)
    except BadRequest as err:  # its message starts with the field's name
        field, message = str(err).split()[0], str(err)
        if field == "max_tokens":
            field, message = budget, message.replace("max_tokens", budget, 1)
        raise bad(message, field) from None
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad(f"stream_options must be an object, got {options!r}", "stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad(f"stream must be true or false, got {stream!r}", "stream")
    return Job(chat=chat, model=model, prompt=None if chat else _prompt(body.get("prompt")),
               messages=_messages(body.get("messages")) if chat else None, sampling=sampling,
               max_tokens_given=max_tokens is not None, max_tokens_field=budget, stream=bool(stream),
               include_usage=bool(stream and options and options.get("include_usage")))


def _same(a, b) -> bool:
    """a == b, where True is not 1 (JSON's true is not the number 1)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _number(body: dict, key: str) -> float:
    """temperature or top_p: OpenAI's default 1 when absent or null; a bool is not a number here."""
    value = body.get(key)
    if value is None:
        return 1.0
    if isinstance(value, bool):
        raise bad(f"{key} must be a number, got {value!r}", key)
    return value


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, list):
        raise bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    return stop


def _prompt(prompt) -> str | list[int]:
    """A completion prompt: a string, token ids, or a list holding one of those (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise bad("prompt must be one string or one list of token ids (one prompt per request)", "prompt")


def _messages(messages) -> list[dict]:
    """Chat messages as the chat template takes them: each {"role", "content"} with the content as text (text parts
    joined; other parts, such as images, refused)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": message["role"], "content": content or ""})
    return out


# --- answers ---

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(chat: bool, text: str | None, finish: str | None, delta: bool, role: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    message = {"role": "assistant"} if role or not delta else {}
    if text is not None:
        message["content"] = text
    return {"index": 0, "delta" if delta else "message": message, "logprobs": None, "finish_reason": finish}


def answer_body(job: Job, rid: str, model: str, text: str, finish: str, counts: dict) -> dict:
    """The whole (not streamed) answer."""
    return {"id": rid, "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [_choice(job.chat, text, finish, delta=False)], "usage": counts}


def chunk(job: Job, rid: str, model: str, text: str | None = None, finish: str | None = None, role: bool = False,
          counts: dict | None = None) -> str:
    """One server-sent event of a stream. With include_usage every chunk carries "usage": null but the last, which
    has no choices and the counts (OpenAI's stream_options)."""
    body = {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [] if counts else [_choice(job.chat, text, finish, delta=True, role=role)]}
    if job.include_usage:
        body["usage"] = counts
    return sse(body)


def sse(body: dict | str) -> str:
    """A server-sent event: `data: <json>` and a blank line (json.dumps escapes newlines: one line of data)."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


def model_card(name: str, created: int, parent: str | None, max_len: int) -> dict:
    """An entry of /v1/models. As vLLM: an adapter names its base as `parent`."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lorafit", "root": name,
            "parent": parent, "max_model_len": max_len}
