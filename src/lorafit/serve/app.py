"""The HTTP server of `lorafit serve`: OpenAI's API, as vLLM serves it, in front of one serving engine.

    GET  /v1/models                  the base model and every adapter (an adapter's `parent` is the base)
    POST /v1/completions             a raw prompt; `model` is the base's or an adapter's name
    POST /v1/chat/completions        messages through the model's chat template
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}: a folder inside an --adapter-dir, at run time
    POST /v1/unload_lora_adapter     {"lora_name"}
    GET  /health, GET /metrics, GET / (the playground page)

The engine loop runs on the main thread (lorafit.inference.engine), the app on another; the app only checks
requests, queues them and relays the events the engine sends back (lorafit.serve.service). A request the server
cannot take gets an OpenAI-shaped error (400, 401, 404, 413, 429), not a 500, and the server stays up; a client
that goes away frees its slot.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.exceptions import HTTPException

from ..inference.engine import Engine
from . import metrics
from .confine import roots_of
from .openai import ApiError, model_card
from .service import Service

MAX_BODY = 1 << 20  # bytes of a request body: a long prompt fits many times over, a flood does not
PLAYGROUND = Path(__file__).with_name("playground.html")
PLACEHOLDER = ("<!doctype html><title>lorafit serve</title><p>lorafit serve is running. The playground page is not "
               "installed; the OpenAI-compatible API is at <code>/v1</code> (see <code>/v1/models</code>).</p>")


async def read_json(http: Request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes (counted as they arrive, whatever the
    Content-Length says), 400 for anything but a JSON object."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}")
    data = bytearray()
    async for piece in http.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError too
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def create_app(engine: Engine, model_name: str, adapter_dirs=(), api_key: str | None = None, *,
               max_body: int = MAX_BODY) -> FastAPI:
    """The ASGI app serving `engine` (started or not yet) as `model_name` and its adapters by their names.

    adapter_dirs: the only folders /v1/load_lora_adapter may read from (none: run-time loading is off).
    api_key: when set, every /v1 route wants `Authorization: Bearer <api_key>`.
    """
    service = Service(engine, model_name, _adapter_paths(engine), roots_of(adapter_dirs))
    app = FastAPI(title="lorafit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(_api(service, api_key, max_body))
    app.include_router(_operations(engine, metrics.registry_for(engine, model_name, service.rejected)))
    _error_handlers(app)
    return app


def _api(service: Service, api_key: str | None, max_body: int) -> APIRouter:
    """The /v1 routes: OpenAI's (models, completions, chat) and vLLM's (load and unload an adapter)."""

    async def authorized(http: Request) -> None:
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if api_key and not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                                 api_key.encode())):
            raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    created = int(time.time())

    @v1.get("/models")
    async def models() -> dict:
        base, max_len = service.base, service.engine.max_len
        cards = [model_card(base, created, None, max_len)]
        cards += [model_card(name, created, base, max_len) for name in service.adapters]
        return {"object": "list", "data": cards}

    @v1.post("/completions")
    async def completions(http: Request) -> Response:
        return await service.answer(await read_json(http, max_body), http, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(http: Request) -> Response:
        return await service.answer(await read_json(http, max_body), http, chat=True)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(http: Request) -> Response:
        name = await service.load(await read_json(http, max_body))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(http: Request) -> Response:
        name = await service.unload(await read_json(http, max_body))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return v1


def _operations(engine: Engine, registry: CollectorRegistry) -> APIRouter:
    """What operators and browsers ask for, without a key (as vLLM): /health, /metrics, the playground at /."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        alive = engine.looping
        return JSONResponse({"status": "ok" if alive else "engine stopped", "waiting": len(engine.waiting),
                             "running": len(engine.running)},
                            status_code=200 if alive else 503)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8") if PLAYGROUND.is_file() else PLACEHOLDER)

    return router


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body, {"error": {"message", "type", "param", "code"}}: clients (the openai package)
    read the message from there."""

    def reply(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def api_error(_, err: ApiError) -> JSONResponse:
        return reply(err)

    async def http_error(_, err: HTTPException) -> JSONResponse:  # an unknown route, a wrong method
        return reply(ApiError(err.status_code, str(err.detail), headers=dict(err.headers or {})))

    async def invalid(_, err: RequestValidationError) -> JSONResponse:
        return reply(ApiError(400, f"invalid request: {err.errors()}"))

    async def bug(_, err: Exception) -> JSONResponse:  # logged by the server; the client gets a 500, not a hang-up
        return reply(ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, bug)


def _adapter_paths(engine: Engine) -> dict[str, Path]:
    """The adapters the engine knows now: read on its thread once it runs (before that, nothing else touches it)."""
    if engine.adapters is None:
        return {}

    def read() -> dict[str, Path]:
        return dict(engine.adapters.paths)

    return engine.call(read).result() if engine.looping else read()
