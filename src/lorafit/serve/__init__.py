"""`lorafit serve`: an OpenAI-compatible HTTP server (as vLLM serves it) in front of the serving engine
(lorafit.inference.engine), many adapters on one base.

app.py builds the ASGI app (FastAPI), service.py relays requests to the engine, openai.py holds the API's request
and answer shapes, confine.py keeps run-time adapter loads inside --adapter-dir, metrics.py answers Prometheus,
server.py loads the model and runs it all under uvicorn (the CLI command calls it).
"""

from .app import create_app

__all__ = ["create_app"]
