"""What the sync and async clients share: settings from the environment, request building, answer parsing.

No I/O happens here, so both clients send byte-identical requests and read answers the same way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from prefixserve_client.errors import ConnectionError, PrefixServeError, ValidationError, error_from_response
from prefixserve_client.types import StreamEvent

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
ENV_URL = "PREFIXSERVE_URL"
ENV_API_KEY = "PREFIXSERVE_API_KEY"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"

# the contract's id part: `<tenant>/<name>`, each [A-Za-z0-9][A-Za-z0-9._-]{0,63}
_ID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def resolve_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "prefixserve-client/0.1", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def check_part(part: str, what: str) -> str:
    """Refuse a bad tenant/name/key id before it reaches a URL (no `..`, no slashes, no surprises)."""
    if not _ID_PART.match(part):
        raise ValidationError(
            f"{what} {part!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
            code="invalid_id",
        )
    return part


def split_prefix_id(prefix_id: str) -> tuple[str, str]:
    parts = prefix_id.split("/")
    if len(parts) != 2:
        raise ValidationError(f"prefix id {prefix_id!r} must look like <tenant>/<name>", code="invalid_id")
    return check_part(parts[0], "tenant"), check_part(parts[1], "name")


def prefix_path(prefix_id: str) -> str:
    tenant, name = split_prefix_id(prefix_id)
    return f"/v1/prefixes/{tenant}/{name}"


# what PUT /v1/tenants/{tenant} accepts; a value of None sends null, which resets it to its default
TENANT_SETTINGS = ("weight", "max_concurrent", "requests_per_minute", "tokens_per_minute")


def tenant_path(tenant: str) -> str:
    return f"/v1/tenants/{check_part(tenant, 'tenant')}"


def tenant_settings_body(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Body of PUT /v1/tenants/{tenant}: only the settings given, None kept (null resets to the default)."""
    unknown = sorted(set(settings) - set(TENANT_SETTINGS))
    if unknown:
        raise ValidationError(
            f"unknown tenant setting(s) {', '.join(unknown)}: use {', '.join(TENANT_SETTINGS)}",
            code="invalid_settings",
        )
    return {name: settings[name] for name in TENANT_SETTINGS if name in settings}


def key_path(tenant: str, key_id: str | None = None) -> str:
    path = f"/v1/tenants/{check_part(tenant, 'tenant')}/keys"
    return path if key_id is None else f"{path}/{quote(key_id, safe='')}"


@dataclass
class GenerateRequest:
    """Body and headers of POST /v1/generate. `X-Prefix-Id` lets a proxy route by prefix without the body."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def num_completions(self) -> int:
        """How many completions the answer holds (`n`), so a stream is known to be whole."""
        n = self.body.get("n", 1)
        return n if isinstance(n, int) and n >= 1 else 1


def generate_request(
    prefix: str | None, prompt: str, stream: bool, sampling: Mapping[str, Any]
) -> GenerateRequest:
    """The request for `generate` / `stream_generate`. Every keyword given (None ones left out) goes into
    the body as is, so the server — which knows its options — refuses an unknown one by name (422)."""
    if prefix is not None:
        split_prefix_id(prefix)
    if "stream" in sampling:
        raise ValidationError(
            "stream is not a generate() option: call stream_generate() to stream", code="invalid_request"
        )
    body: dict[str, Any] = {"prefix": prefix, "prompt": prompt}
    body.update({k: v for k, v in sampling.items() if v is not None})
    if stream:
        body["stream"] = True
    headers = {"X-Prefix-Id": prefix} if prefix is not None else {}
    if stream:
        headers["Accept"] = "text/event-stream"
    return GenerateRequest(body, headers)


def upload_request(prefix_id: str, path: str | os.PathLike[str], public: bool) -> dict[str, Any]:
    """httpx keyword arguments for PUT /v1/prefixes/{id}.

    `path` is a native prefix file (sent as application/octet-stream), or a PEFT adapter directory holding
    adapter_model.safetensors and adapter_config.json (sent as multipart parts adapter_model and
    adapter_config). A path to a PEFT adapter_model.safetensors with its config beside it counts as the directory.
    """
    source = Path(path)
    if source.is_file() and source.name == PEFT_WEIGHTS and (source.parent / PEFT_CONFIG).is_file():
        source = source.parent
    params = {"public": "true"} if public else {}
    if source.is_dir():
        weights, config = source / PEFT_WEIGHTS, source / PEFT_CONFIG
        missing = [p.name for p in (weights, config) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{source} is a directory but not a PEFT adapter: missing {', '.join(missing)} "
                "(pass a native prefix file, or the directory PEFT's save_pretrained wrote)"
            )
        files = {
            "adapter_model": (PEFT_WEIGHTS, weights.read_bytes(), "application/octet-stream"),
            "adapter_config": (PEFT_CONFIG, config.read_bytes(), "application/json"),
        }
        return {"files": files, "params": params}
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} does not exist; pass a native prefix file or a PEFT adapter directory"
        )
    return {
        "content": source.read_bytes(),
        "headers": {"Content-Type": "application/octet-stream"},
        "params": params,
    }


def list_params(tenant: str | None, limit: int | None, cursor: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if tenant is not None:
        params["tenant"] = check_part(tenant, "tenant")
    if limit is not None:
        params["limit"] = str(limit)
    if cursor:
        params["cursor"] = cursor
    return params


def raise_for_error(response: httpx.Response) -> None:
    """Raise the typed error for a non-2xx answer. The body must already be read."""
    if response.is_success:
        return
    raise error_from_response(response.status_code, response.content, response.headers)


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise PrefixServeError(
            f"the server answered {response.status_code} with a body that is not JSON: {response.text[:200]!r}",
            status=response.status_code,
            code="invalid_response",
        ) from exc


def transport_error(exc: httpx.HTTPError, base_url: str) -> ConnectionError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return ConnectionError(
        f"request to {base_url} {kind}: {exc or type(exc).__name__} (is prefix-serve running there? "
        f"set {ENV_URL} or --url)",
        code="connection_error",
    )


DONE = object()  # the `data: [DONE]` sentinel


class SSEDecoder:
    """Server-sent events, fed one line at a time: returns a decoded event at each blank line."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, line: str) -> Any:
        line = line.rstrip("\r")
        if line == "":
            return self._flush()
        if line.startswith(":"):
            return None  # a comment / keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def _flush(self) -> Any:
        if not self._data:
            self._event = None
            return None
        data, event = "\n".join(self._data), self._event
        self._data, self._event = [], None
        if data.strip() == "[DONE]":
            return DONE
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise PrefixServeError(
                f"the stream sent an event that is not JSON: {data[:200]!r}", code="invalid_response"
            ) from exc
        if isinstance(payload, dict) and (event == "error" or "error" in payload):
            # an error after the 200 header went out: the status in the body, if any, else a server error
            status = payload.get("status")
            raise error_from_response(status if isinstance(status, int) else 500, payload)
        if not isinstance(payload, dict):
            raise PrefixServeError(
                f"the stream sent {data[:200]!r}, not a JSON object", code="invalid_response"
            )
        return StreamEvent.from_dict(payload)

    def close(self) -> Any:
        """At the end of the stream: flush an event that had no trailing blank line."""
        return self._flush()


class StreamState:
    """Checks that a stream ended properly: a final event with finish_reason for each of the
    `num_completions` completions (`n`), then [DONE]."""

    def __init__(self, num_completions: int = 1) -> None:
        self.decoder = SSEDecoder()
        self.num_completions = num_completions
        self.finished: set[int] = set()  # indices of the completions whose final event came
        self.is_done = False

    @property
    def is_finished(self) -> bool:
        return len(self.finished) >= self.num_completions

    def feed(self, line: str) -> StreamEvent | None:
        item = self.decoder.feed(line)
        return self._accept(item)

    def _accept(self, item: Any) -> StreamEvent | None:
        if item is DONE:
            self.is_done = True
            return None
        if isinstance(item, StreamEvent):
            if item.is_final:
                self.finished.add(item.index)
            return item
        return None

    def close(self) -> StreamEvent | None:
        event = self._accept(self.decoder.close())
        if not (self.is_done or self.is_finished):
            raise ConnectionError(
                "the stream ended before its final event; the server closed the connection",
                code="stream_interrupted",
            )
        return event


def iter_sse(lines: Iterable[str], num_completions: int = 1) -> Iterator[StreamEvent]:
    """Events of an SSE generation stream, stopping at [DONE]."""
    state = StreamState(num_completions)
    for line in lines:
        event = state.feed(line)
        if event is not None:
            yield event
        if state.is_done:
            return
    last = state.close()
    if last is not None:
        yield last
