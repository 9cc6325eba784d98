"""PrefixServeClient and AsyncPrefixServeClient: the whole prefixserve HTTP API, typed.

Both read PREFIXSERVE_URL (default http://127.0.0.1:8000) and PREFIXSERVE_API_KEY when not given, send
`Authorization: Bearer <key>`, and raise a `PrefixServeError` subclass for every failure (see errors.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from prefixserve_client import _wire
from prefixserve_client._wire import DEFAULT_TIMEOUT
from prefixserve_client.types import (
    CreatedKey,
    GenerateResult,
    ModelInfo,
    PrefixInfo,
    PrefixPage,
    StreamEvent,
    TenantInfo,
)

PathLike = str | os.PathLike[str]


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None) -> None:
        self.base_url = _wire.resolve_url(base_url)
        self.api_key = _wire.resolve_api_key(api_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={'***' if self.api_key else None})"


class PrefixServeClient(_Base):
    """Blocking client. Use as a context manager, or call close().

    >>> with PrefixServeClient() as client:
    ...     print(client.generate("acme/e2e", "name : Blue Spice | area : city centre").text)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_wire.default_headers(self.api_key),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> PrefixServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _wire.transport_error(exc, self.base_url) from exc
        _wire.raise_for_error(response)
        return response

    # generation
    def generate(self, prefix: str | None, prompt: str, **sampling: Any) -> GenerateResult:
        """Generate with a prefix (None: the bare backbone).

        `sampling`: max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, and the decoding
        options n, num_beams, length_penalty, early_stopping, logprobs, repetition_penalty,
        presence_penalty, frequency_penalty. Omitted ones (or None) take the server's defaults (greedy, 64
        tokens); one the server does not know is a ValidationError naming it."""
        request = _wire.generate_request(prefix, prompt, False, sampling)
        response = self._request("POST", "/v1/generate", json=request.body, headers=request.headers)
        return GenerateResult.from_dict(_wire.json_body(response))

    def stream_generate(self, prefix: str | None, prompt: str, **sampling: Any) -> Iterator[StreamEvent]:
        """Like generate(), token by token (each event's `index` says which of the n completions it belongs
        to; they come one after another). Closing the iterator early closes the connection, and the server
        frees the request's slot."""
        request = _wire.generate_request(prefix, prompt, True, sampling)
        try:
            with self._http.stream(
                "POST", "/v1/generate", json=request.body, headers=request.headers
            ) as response:
                if not response.is_success:
                    response.read()
                    _wire.raise_for_error(response)
                yield from _wire.iter_sse(response.iter_lines(), request.num_completions)
        except httpx.HTTPError as exc:
            raise _wire.transport_error(exc, self.base_url) from exc

    # prefixes
    def upload(self, prefix_id: str, path: PathLike, public: bool = False) -> PrefixInfo:
        """Store a native prefix file or a PEFT adapter directory as `prefix_id`; `.created` says 201 vs 200."""
        response = self._request(
            "PUT", _wire.prefix_path(prefix_id), **_wire.upload_request(prefix_id, path, public)
        )
        return PrefixInfo.from_dict(_wire.json_body(response), created=response.status_code == 201)

    def list_prefixes_page(
        self, tenant: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> PrefixPage:
        """One page of prefixes visible to the key, ordered by id."""
        response = self._request("GET", "/v1/prefixes", params=_wire.list_params(tenant, limit, cursor))
        return PrefixPage.from_dict(_wire.json_body(response))

    def list_prefixes(self, tenant: str | None = None, limit: int | None = None) -> Iterator[PrefixInfo]:
        """Every prefix visible to the key, following next_cursor; `limit` is the page size asked for."""
        cursor: str | None = None
        while True:
            page = self.list_prefixes_page(tenant, limit, cursor)
            yield from page.prefixes
            if not page.next_cursor or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    def get_prefix(self, prefix_id: str) -> PrefixInfo:
        return PrefixInfo.from_dict(_wire.json_body(self._request("GET", _wire.prefix_path(prefix_id))))

    def delete_prefix(self, prefix_id: str) -> None:
        self._request("DELETE", _wire.prefix_path(prefix_id))

    # tenants and keys (admin)
    def create_key(self, tenant: str) -> CreatedKey:
        """A new API key for `tenant` (admin key needed). The secret is shown only this once."""
        data = _wire.json_body(self._request("POST", _wire.key_path(tenant)))
        return CreatedKey(str(data["key_id"]), str(data["key"]))

    def revoke_key(self, tenant: str, key_id: str) -> None:
        self._request("DELETE", _wire.key_path(tenant, key_id))

    def set_tenant(self, tenant: str, **settings: Any) -> TenantInfo:
        """Set `tenant`'s weight and quotas (admin key needed): any of weight, max_concurrent,
        requests_per_minute, tokens_per_minute. Settings not given keep their value; one given as None goes
        back to its default (weight 1, no limit). Answers the settings now in force and the usage."""
        body = _wire.tenant_settings_body(settings)
        return TenantInfo.from_dict(
            _wire.json_body(self._request("PUT", _wire.tenant_path(tenant), json=body))
        )

    def get_tenant(self, tenant: str) -> TenantInfo:
        """`tenant`'s settings and current usage: the admin key, or that tenant's own key."""
        return TenantInfo.from_dict(_wire.json_body(self._request("GET", _wire.tenant_path(tenant))))

    # operations
    def health(self) -> dict[str, Any]:
        """GET /healthz: the process is alive (raises otherwise)."""
        return _json_or_status(self._request("GET", "/healthz"))

    def ready(self) -> dict[str, Any]:
        """GET /readyz: model loaded and store reachable (ServerError with 503 otherwise)."""
        return _json_or_status(self._request("GET", "/readyz"))

    def models(self) -> list[ModelInfo]:
        """GET /v1/models (OpenAI shape): the backbone and the prefixes the key may use."""
        data = _wire.json_body(self._request("GET", "/v1/models"))
        return [ModelInfo.from_dict(m) for m in data.get("data", [])]

    def metrics(self) -> str:
        """GET /metrics: Prometheus text."""
        return self._request("GET", "/metrics").text


class AsyncPrefixServeClient(_Base):
    """The same API for asyncio: every method is a coroutine; the two iterators are async iterators.

    >>> async with AsyncPrefixServeClient() as client:
    ...     async for event in client.stream_generate("acme/e2e", "name : Alimentum"):
    ...         print(event.text, end="")
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_wire.default_headers(self.api_key),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncPrefixServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _wire.transport_error(exc, self.base_url) from exc
        _wire.raise_for_error(response)
        return response

    async def generate(self, prefix: str | None, prompt: str, **sampling: Any) -> GenerateResult:
        request = _wire.generate_request(prefix, prompt, False, sampling)
        response = await self._request("POST", "/v1/generate", json=request.body, headers=request.headers)
        return GenerateResult.from_dict(_wire.json_body(response))

    async def stream_generate(
        self, prefix: str | None, prompt: str, **sampling: Any
    ) -> AsyncIterator[StreamEvent]:
        request = _wire.generate_request(prefix, prompt, True, sampling)
        try:
            async with self._http.stream(
                "POST", "/v1/generate", json=request.body, headers=request.headers
            ) as response:
                if not response.is_success:
                    await response.aread()
                    _wire.raise_for_error(response)
                state = _wire.StreamState(request.num_completions)
                async for line in response.aiter_lines():
                    event = state.feed(line)
                    if event is not None:
                        yield event
                    if state.is_done:
                        return
                last = state.close()
                if last is not None:
                    yield last
        except httpx.HTTPError as exc:
            raise _wire.transport_error(exc, self.base_url) from exc

    async def upload(self, prefix_id: str, path: PathLike, public: bool = False) -> PrefixInfo:
        kwargs = _wire.upload_request(prefix_id, path, public)
        response = await self._request("PUT", _wire.prefix_path(prefix_id), **kwargs)
        return PrefixInfo.from_dict(_wire.json_body(response), created=response.status_code == 201)

    async def list_prefixes_page(
        self, tenant: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> PrefixPage:
        response = await self._request("GET", "/v1/prefixes", params=_wire.list_params(tenant, limit, cursor))
        return PrefixPage.from_dict(_wire.json_body(response))

    async def list_prefixes(
        self, tenant: str | None = None, limit: int | None = None
    ) -> AsyncIterator[PrefixInfo]:
        cursor: str | None = None
        while True:
            page = await self.list_prefixes_page(tenant, limit, cursor)
            for prefix in page.prefixes:
                yield prefix
            if not page.next_cursor or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    async def get_prefix(self, prefix_id: str) -> PrefixInfo:
        return PrefixInfo.from_dict(_wire.json_body(await self._request("GET", _wire.prefix_path(prefix_id))))

    async def delete_prefix(self, prefix_id: str) -> None:
        await self._request("DELETE", _wire.prefix_path(prefix_id))

    async def create_key(self, tenant: str) -> CreatedKey:
        data = _wire.json_body(await self._request("POST", _wire.key_path(tenant)))
        return CreatedKey(str(data["key_id"]), str(data["key"]))

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        await self._request("DELETE", _wire.key_path(tenant, key_id))

    async def set_tenant(self, tenant: str, **settings: Any) -> TenantInfo:
        body = _wire.tenant_settings_body(settings)
        response = await self._request("PUT", _wire.tenant_path(tenant), json=body)
        return TenantInfo.from_dict(_wire.json_body(response))

    async def get_tenant(self, tenant: str) -> TenantInfo:
        return TenantInfo.from_dict(_wire.json_body(await self._request("GET", _wire.tenant_path(tenant))))

    async def health(self) -> dict[str, Any]:
        return _json_or_status(await self._request("GET", "/healthz"))

    async def ready(self) -> dict[str, Any]:
        return _json_or_status(await self._request("GET", "/readyz"))

    async def models(self) -> list[ModelInfo]:
        data = _wire.json_body(await self._request("GET", "/v1/models"))
        return [ModelInfo.from_dict(m) for m in data.get("data", [])]

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text


def _json_or_status(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {"status": response.text.strip() or "ok"}
    return data if isinstance(data, dict) else {"status": data}
