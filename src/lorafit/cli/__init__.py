"""The `lorafit` command. Each subcommand parses its options and calls one library function.

The commands live in run.py (train, eval, sweep, reproduce), use.py (generate, chat, predict, merge, combine),
export.py (export gguf), serve.py (serve) and info.py (fetch, models, inspect, config, plan, analyze, bench);
`main` is the entry point and its error contract.
"""

from __future__ import annotations

import logging
import os

import typer

from . import app as app_module
from .app import app, log

# Each file registers its commands on the app; this order is the order `lorafit --help` lists them in.
# isort: off
from . import run, use, export, serve, info  # noqa: F401, E402
# isort: on

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user-caused failure prints one line, `error: ...`, and exits with 2; a bug keeps its
    traceback. `lorafit --debug ...` or LORAFIT_DEBUG=1 shows the traceback of every error."""
    # bitsandbytes warns on import that an optional CPU kernel package is missing; lorafit never uses that kernel
    # (it dequantizes and multiplies itself), so the warning would only mislead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        code = app(args=argv, prog_name="lorafit", standalone_mode=False)
    except typer.Abort:
        log("Aborted!")
        raise SystemExit(1) from None
    except typer.TyperException as err:  # click's usage errors: an unknown option, a value out of range, ...
        if type(err).__name__ == "NoArgsIsHelpError":
            raise SystemExit(2) from None  # the help is printed already
        ctx = getattr(err, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        _fail(err, f"{err.format_message()}{hint}")
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        _fail(err, message)
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _user_error(err: Exception) -> str | None:
    """The one line for a failure the user can fix (a bad value, file or path, a full disk), else None."""
    from ..core.files import describe_os_error

    # ValueError: ConfigError, DataError, ModelError, AdapterFileError, TargetError, ... all name what to fix
    return str(err) if isinstance(err, ValueError) else describe_os_error(err)


def _fail(err: BaseException, message: str) -> None:
    if app_module.debug or os.environ.get("LORAFIT_DEBUG", "") not in ("", "0"):
        raise err
    log("error: " + " ".join(message.split()))  # one line, whatever the message held
    raise SystemExit(2) from None
