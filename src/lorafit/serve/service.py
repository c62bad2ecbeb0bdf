"""What the API's routes ask of the engine: generate (whole or streamed), load and unload adapters by name.

The engine loop runs on another thread (the main one, in `lorafit serve`). A request's events come back through
`Stream`: the engine thread calls its sink, which hands each event to the event loop. A request ends for the
engine when its client goes away: a stream's generator is closed (Starlette cancels it on disconnect) and a whole
answer has a watcher that sees the disconnect; both cancel the request, which frees its slot at the engine's next
step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..inference.adapters import AdapterError
from ..inference.engine import Engine, QueueFull
from ..inference.generate import render
from ..inference.requests import BadRequest, Event, Request
from .confine import check_name, confine
from .openai import COMPLETIONS_MAX_TOKENS, ApiError, Job, answer_body, bad, chunk, new_id, parse, sse, usage

RETRY_AFTER = "1"  # seconds a client told "queue full" (429) waits before trying again


class Stream:
    """The events of one engine request, handed from the engine thread to the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        """Called on the engine thread; never raises (an exception there would fail the whole batch)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is stopping and nobody waits for this request
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The request's events until (and with) the one that ends it."""
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason:
                return


class Service:
    """The engine as the routes see it: `base` and the adapters by name (`adapters`, kept on the event loop's
    thread, changed only after the engine has done the load or unload), requests checked, queued and relayed."""

    def __init__(self, engine: Engine, base: str, adapters: dict[str, Path], roots: list[Path]):
        self.engine, self.base, self.adapters, self.roots = engine, base, adapters, roots
        self.rejected = {"queue_full": 0}  # read by the metrics

    # --- generating ---

    async def answer(self, body: dict, http: HttpRequest, chat: bool) -> Response:
        """The route of /v1/completions (chat False) and /v1/chat/completions (chat True)."""
        job = parse(body, chat, self.engine.max_len)
        adapter = self.adapter_of(job.model)
        ids = self.prompt_ids(job)
        self.fit(job, len(ids))
        stream = Stream()
        request = Request(ids, adapter, job.sampling, stream.sink, self.engine.tokenizer)
        self.submit(request, job)
        rid, model = new_id(chat), job.model or self.base
        if job.stream:
            return StreamingResponse(self.chunks(job, rid, model, stream, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole(job, rid, model, stream, request, http)

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 for a name this server does not serve."""
        if model is None or model == self.base:
            return None  # with --merge, the base is the merged model, served under the adapter's name
        if model in self.adapters:
            return model
        raise ApiError(404, f"The model `{model}` does not exist: this server serves {self.base!r} and the "
                            f"adapters {sorted(self.adapters)} (GET /v1/models)", param="model",
                       code="model_not_found")

    def prompt_ids(self, job: Job) -> list[int]:
        """Token ids of the prompt: chat messages through the chat template, a completion prompt as it is."""
        tokenizer = self.engine.tokenizer
        if job.chat:
            try:
                text = render(tokenizer, job.messages)
            except Exception as err:  # a template may raise anything (jinja's raise_exception): the messages' fault
                raise bad(f"the model's chat template refused these messages: {err}", "messages") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(job.prompt, str):
            return tokenizer(job.prompt)["input_ids"]
        vocab = self.engine.model.get_input_embeddings().num_embeddings
        outside = [t for t in job.prompt if not 0 <= t < vocab]
        if outside:
            raise bad(f"prompt: token ids {outside[:5]} are outside the vocabulary (0 to {vocab - 1})", "prompt")
        return job.prompt

    def fit(self, job: Job, prompt_tokens: int) -> None:
        """Pick max_tokens when the client did not; refuse one that cannot fit the context after the prompt."""
        room = self.engine.max_len - prompt_tokens
        if room < 1:
            return  # the engine refuses the prompt itself, saying how long it is
        if not job.max_tokens_given:
            job.sampling.max_tokens = room if job.chat else min(COMPLETIONS_MAX_TOKENS, room)
        elif job.sampling.max_tokens > room:
            raise bad(f"this model's context is {self.engine.max_len} tokens and the prompt takes {prompt_tokens}: "
                      f"{job.max_tokens_field} may be at most {room}, got {job.sampling.max_tokens}",
                      job.max_tokens_field)

    def submit(self, request: Request, job: Job) -> None:
        if not self.engine.looping:
            raise ApiError(503, "the engine has stopped; restart the server", kind="server_error")
        try:
            self.engine.submit(request)
        except BadRequest as err:
            raise bad(str(err), "messages" if job.chat else "prompt") from None
        except QueueFull as err:
            self.rejected["queue_full"] += 1
            raise ApiError(429, str(err), kind="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": RETRY_AFTER}) from None

    async def chunks(self, job: Job, rid: str, model: str, stream: Stream, request: Request) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
        try:
            if job.chat:
                yield chunk(job, rid, model, text="", role=True)  # OpenAI's first chunk names the role
            async for event in stream.events():
                if event.error:
                    yield sse(self.failure(job.model, event.error).body())
                    break
                if event.finish_reason in ("stop", "length"):
                    yield chunk(job, rid, model, event.text or None, event.finish_reason)
                    if job.include_usage:
                        yield chunk(job, rid, model, counts=usage(event.prompt_tokens, event.completion_tokens))
                elif event.text:
                    yield chunk(job, rid, model, event.text)
            yield sse("[DONE]")
        finally:  # also when the client went away (Starlette cancels this generator): free the slot
            request.cancel()

    async def whole(self, job: Job, rid: str, model: str, stream: Stream, request: Request,
                    http: HttpRequest) -> Response:
        """The whole answer, once the request ends; if the client goes away first, its request is cancelled."""
        watcher = asyncio.create_task(_watch(http, stream))
        pieces = []
        try:
            async for event in stream.events():
                pieces.append(event.text)
        finally:
            watcher.cancel()
            request.cancel()
        if event.error:
            raise self.failure(job.model, event.error)
        return JSONResponse(answer_body(job, rid, model, "".join(pieces), event.finish_reason,
                                   usage(event.prompt_tokens, event.completion_tokens)))

    def failure(self, model: str | None, message: str) -> ApiError:
        """The error for a request the engine failed: its adapter was unloaded meanwhile (404), or a server fault."""
        if model is not None and model != self.base and model not in self.adapters:
            return ApiError(404, f"The model `{model}` was unloaded before this request ran ({message})",
                            param="model", code="model_not_found")
        return ApiError(500, f"generation failed: {message}", kind="server_error")

    # --- adapters at run time ---

    async def load(self, body: dict) -> str:
        """Register and load the adapter folder body["lora_path"] as body["lora_name"] (vLLM's endpoint)."""
        if self.engine.adapters is None:
            raise bad("this server serves one merged model (--merge); it loads no adapters")
        name = check_name(body.get("lora_name"))
        if name == self.base or name in self.adapters:
            raise bad(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        path = confine(body.get("lora_path"), self.roots)

        def register() -> None:  # on the engine thread; it loads now, so a bad folder fails here, not later
            if name in self.engine.adapters.paths:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
            self.engine.adapters.register(name, path, load=True, busy=self.engine.busy_adapters())

        try:
            await asyncio.wrap_future(self.engine.call(register))
        except (ValueError, OSError) as err:  # AdapterError and the adapter reader's errors name the file
            raise bad(str(err), "lora_path") from None
        self.adapters[name] = path
        return name

    async def unload(self, body: dict) -> str:
        """Forget adapter body["lora_name"]; requests running with it finish first (vLLM's endpoint)."""
        name = body.get("lora_name")
        if name == self.base:
            raise bad("the base model cannot be unloaded", "lora_name")
        if not isinstance(name, str) or name not in self.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        del self.adapters[name]  # first: no new request takes it while the engine unloads it
        engine = self.engine
        await asyncio.wrap_future(engine.call(lambda: engine.adapters.unregister(name, engine.busy_adapters())))
        return name


async def _watch(http: HttpRequest, stream: Stream) -> None:
    """End `stream` when the client disconnects (the body is read: what comes next is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    stream.queue.put_nowait(Event(finish_reason="cancelled"))
