"""`prefix-serve` (also `python -m server`): every setting is a flag here and a PREFIXSERVE_* env variable."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from server.host_memory import retain_freed_memory
from server.host_threads import set_forward_threads
from server.settings import Settings

SECRET_FIELDS = {"admin_key"}  # env only: a key on the command line shows in `ps`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-serve",
        description="Serve many prefix-tuned tasks from one frozen GPT-2, BART or Llama-family backbone.",
        epilog="Every flag has an environment twin PREFIXSERVE_<FLAG> (e.g. PREFIXSERVE_MAX_NUM_SEQS). "
        "The admin key is read from PREFIXSERVE_ADMIN_KEY only.",
    )
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        kind: Any = str
        annotation = field.annotation
        if annotation in (int, float):
            kind = annotation
        description = (field.description or "").replace("%", "%%")  # argparse formats help with %
        help_text = f"{description} (env PREFIXSERVE_{name.upper()}, default {field.default!r})"
        parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    return parser


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def serve(settings: Settings) -> None:
    import uvicorn

    from server.app import create_app
    from server.drain import DrainingServer
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if settings.retain_host_memory:  # before the model loads: its tensors take the same allocator
        logging.getLogger("prefixserve").info("%s", retain_freed_memory(os.environ))
    logging.getLogger("prefixserve").info("%s", set_forward_threads(settings.torch_threads, os.environ))
    app = create_app(settings)
    logging.getLogger("prefixserve").info("%s", _http_stack())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        # uvloop and httptools (uvicorn[standard]) when importable: the per-request cost of the HTTP stack
        # is mostly theirs, and asyncio's loop with the pure-Python h11 parser costs several times more
        loop="auto",
        http=_http_protocol(settings.body_timeout),
    )
    DrainingServer(config, app, settings.drain_timeout).run()


def _http_protocol(head_timeout: float) -> Any:
    """httptools' protocol with bounded request heads (http_head.py); without httptools, uvicorn's h11 (whose
    parser refuses heads over 16 KiB itself)."""
    import importlib.util

    if importlib.util.find_spec("httptools") is None:
        return "auto"
    from server.http_head import bounded_head

    return bounded_head(head_timeout)


def _http_stack() -> str:
    """Which event loop and HTTP parser uvicorn picks ("auto"), for the start-up log."""
    import importlib.util

    found = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name) is not None]
    if len(found) == 2:
        return "HTTP: uvloop event loop, httptools parser"
    return (
        f"HTTP: {' and '.join(found) or 'neither uvloop nor httptools'} installed; "
        "pip install 'uvicorn[standard]' for the faster event loop and parser"
    )


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_args(argv)
    except Exception as exc:  # pydantic validation: say which flag is wrong
        print(f"prefix-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    serve(settings)
