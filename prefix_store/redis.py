"""The shared store: prefixes, metadata and tenant keys in Redis, for several replicas at once.

Layout (``NS`` is the namespace, ``prefixserve`` unless the URL says ``?namespace=NAME``)::

    NS:prefix:<tenant>/<name>   hash  meta (JSON), data (native file), created_at (repr of a float)
    NS:index:all                zset  every prefix id, all scores 0 (ordered by id: ZRANGEBYLEX)
    NS:index:tenant:<tenant>    zset  that tenant's prefix ids
    NS:index:public             zset  ids of public prefixes
    NS:key:<key_id>             hash  key_id, tenant, key_hash, created_at
    NS:index:keys               zset  every key id
    NS:tenant:<tenant>          string tenant settings (JSON: weight, quotas)
    NS:usage:<tenant>:<minute>  hash  requests, tokens counted in that minute (expires after 3 minutes)
    NS:changes                  pub/sub channel: the id of every prefix put or deleted

Meta and bytes of one version live in one hash and are written together by a Lua script, which Redis runs
atomically with the index updates and the change notice: a reader (HMGET) sees the old version or the new
one, never old meta with new bytes, and a listing never shows an id whose hash is gone. Listing pages
through the sorted sets by id (ZRANGEBYLEX ... LIMIT), so a page costs O(log N + page), never KEYS/SCAN.

Replicas learn of changes without polling: `watch(on_change)` subscribes to the change channel in a
daemon thread and calls back with each id, or with None after every (re)subscription, since notices sent
while it was disconnected are lost (the caller then drops everything it cached).

A Redis that does not answer (paused, partitioned) costs a call at most `timeout` seconds: the call that
finds it gone opens an outage, and until a call succeeds again the others fail at once while one a second
tries Redis again (one log line when it goes, one when it is back).
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from prefix_store.records import (
    InvalidId,
    KeyRecord,
    PrefixMeta,
    PublicPrefixError,
    StoreUnavailable,
    check_id_part,
    decode_cursor,
    encode_cursor,
    split_id,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# KEYS: prefix hash, index:all, index:tenant:<t>, index:public
# ARGV: id, meta JSON if private, meta JSON if public, data, created_at, visibility ("1", "0", or "keep": the
# stored one on replace), channel, "1" if a stored public prefix may be replaced (the admin) else "0"
# Returns {1, created_at, public} when created, {0, created_at of the first version, public} when replaced,
# {-1} when refused: the stored prefix is public and ARGV[8] is "0". Check and write are one atomic step.
PUT_SCRIPT = """
local was_public = redis.call('ZSCORE', KEYS[4], ARGV[1])
if was_public and ARGV[8] ~= '1' then return {-1} end
local public = ARGV[6]
if public == 'keep' then
  if was_public then public = '1' else public = '0' end
end
local meta = ARGV[2]
if public == '1' then meta = ARGV[3] end
local old_created = redis.call('HGET', KEYS[1], 'created_at')
local created = old_created or ARGV[5]
redis.call('HSET', KEYS[1], 'meta', meta, 'data', ARGV[4], 'created_at', created)
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
if public == '1' then
  redis.call('ZADD', KEYS[4], 0, ARGV[1])
else
  redis.call('ZREM', KEYS[4], ARGV[1])
end
redis.call('PUBLISH', ARGV[7], ARGV[1])
if old_created then return {0, old_created, public} end
return {1, created, public}
"""

# KEYS: prefix hash, index:all, index:tenant:<t>, index:public
# ARGV: id, channel, "1" if a public prefix may be deleted (the admin) else "0"; returns -1 when refused
DELETE_SCRIPT = """
if ARGV[3] ~= '1' and redis.call('ZSCORE', KEYS[4], ARGV[1]) then return -1 end
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if existed == 1 then redis.call('PUBLISH', ARGV[2], ARGV[1]) end
return existed
"""

# KEYS: prefix hashes. Returns meta, created_at of each in turn (false where the hash is gone).
METAS_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local fields = redis.call('HMGET', key, 'meta', 'created_at')
  out[2 * i - 1] = fields[1]
  out[2 * i] = fields[2]
end
return out
"""

# KEYS: key hash, index:keys; ARGV: key_id, tenant
DELETE_KEY_SCRIPT = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Seconds a call may wait on Redis (connect, each read) before it raises StoreUnavailable.
DEFAULT_TIMEOUT = 2.0
# Heal by itself when Redis comes back: a dead pooled connection (reset, refused) is retried on a fresh one.
# A timeout is not retried: Redis is there but not answering, and each retry would wait the timeout again.
RETRY_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError,)
# During an outage, seconds between calls that try Redis again (the others fail at once).
PROBE_INTERVAL = 1.0
UNREACHABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)
MISCONF_PREFIXES = ("MISCONF", "OOM", "LOADING", "MASTERDOWN", "NOREPLICAS")


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def _split_namespace(url: str) -> tuple[str, str]:
    """Take our own `namespace` query parameter off the URL; redis-py gets the rest."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    namespace = next((v for k, v in query if k == "namespace"), "prefixserve")
    rest = urlencode([(k, v) for k, v in query if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), namespace


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Outage:
    """Whether Redis answers, shared by a store's calls. While it does not, callers fail at once instead of
    each waiting out the timeout, and one call at a time (the probe), at most one a PROBE_INTERVAL, tries
    Redis again: the first success ends the outage. Logs one line when an outage starts and one when it ends."""

    def __init__(self, safe_url: str):
        self.safe_url = safe_url
        self.since: float | None = None  # time.monotonic() when it started; None while Redis answers
        self.reason = ""
        self.num_refused = 0
        self._probing = False
        self._next_probe = 0.0  # time.monotonic() from which the next probe may go
        self._lock = threading.Lock()

    def begin_call(self) -> bool | None:
        """None: fail the call at once (an outage, and another call is the probe); otherwise the call goes to
        Redis, True when it is the probe. Pass that value to the end_* method."""
        with self._lock:
            if self.since is None:
                return False
            if self._probing or time.monotonic() < self._next_probe:
                self.num_refused += 1
                return None
            self._probing = True
            return True

    def end_answered(self, probe: bool) -> None:
        """Redis answered (a result or an error reply): any outage is over."""
        with self._lock:
            self._probing = self._probing and not probe
            if self.since is None:
                return
            seconds, refused = time.monotonic() - self.since, self.num_refused
            self.since, self.num_refused = None, 0
        log.warning(
            "Redis store %s answers again after %.1f s unreachable (%d calls refused meanwhile)",
            self.safe_url,
            seconds,
            refused,
        )

    def end_unreachable(self, probe: bool, reason: str) -> None:
        with self._lock:
            self._probing = self._probing and not probe
            self._next_probe = time.monotonic() + PROBE_INTERVAL
            if self.since is not None:
                return
            self.since, self.reason = time.monotonic(), reason
        log.error(
            "Redis store %s is unreachable (%s): calls that need it fail (503 store_unavailable) until it "
            "answers again",
            self.safe_url,
            reason,
        )

    def end_undecided(self, probe: bool) -> None:
        """The call ended before Redis had a say (e.g. an invalid id)."""
        with self._lock:
            self._probing = self._probing and not probe

    def unavailable(self) -> StoreUnavailable:
        since = 0.0 if self.since is None else time.monotonic() - self.since
        return StoreUnavailable(
            f"Redis store {self.safe_url} has been unreachable for {since:.1f} s ({self.reason}); "
            "check that redis-server is running and reachable from this host"
        )


def _unavailable(method: Callable[P, R]) -> Callable[P, R]:
    """Turn "Redis cannot answer" into StoreUnavailable (the server answers 503); other errors pass.
    During an outage the call fails at once unless it is the probe (see Outage)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, RedisStore)
        outage = store.outage
        probe = outage.begin_call()
        if probe is None:
            raise outage.unavailable()
        try:
            result = method(*args, **kwargs)
        except UNREACHABLE_ERRORS as exc:
            outage.end_unreachable(probe, f"{type(exc).__name__}: {exc}")
            raise outage.unavailable() from exc
        except ResponseError as exc:  # Redis answered; read-only, MISCONF, OOM: writes refused, reads work
            outage.end_answered(probe)
            if isinstance(exc, ReadOnlyError) or str(exc).startswith(MISCONF_PREFIXES):
                raise StoreUnavailable(f"Redis store {store.safe_url} refuses writes: {exc}") from exc
            raise
        except BaseException:
            outage.end_undecided(probe)
            raise
        outage.end_answered(probe)
        return result

    return wrapper


class FeedSilent(Exception):
    """The change feed's connection is open but Redis does not answer on it."""


class _Feed:
    """The change feed's state across reconnections, for its log lines (one when lost, one when back) and
    for the grace after which what a watcher cached can no longer be trusted."""

    def __init__(self, safe_url: str, channel: str, grace_seconds: float | None):
        self.safe_url, self.channel, self.grace_seconds = safe_url, channel, grace_seconds
        self.lost_at: float | None = None
        self.dropped = False
        self.num_failures = 0  # reconnections failed since the feed was last up

    def subscribed(self) -> None:
        if self.lost_at is None:
            log.info("watching %s on %s", self.channel, self.safe_url)
        else:
            log.warning(
                "watching %s on %s again after %.1f s; cached prefixes dropped (changes may have been missed)",
                self.channel,
                self.safe_url,
                time.monotonic() - self.lost_at,
            )
        self.lost_at, self.dropped, self.num_failures = None, False, 0

    def retry_delay(self) -> float:
        """0.1 s after the first failure, doubling up to 2 s."""
        return min(0.1 * 2 ** (self.num_failures - 1), 2.0)

    def lost(self, exc: BaseException) -> None:
        self.num_failures += 1
        if self.lost_at is not None:
            return  # said once per outage
        self.lost_at = time.monotonic()
        grace = (
            ""
            if self.grace_seconds is None
            else f"; cached prefixes are trusted for {self.grace_seconds:g} s"
        )
        log.warning(
            "lost the change feed of %s (%s: %s); retrying every 0.1-2 s%s",
            self.safe_url,
            type(exc).__name__,
            exc,
            grace,
        )

    def past_grace(self) -> bool:
        """True once, when the feed has been lost for longer than the grace."""
        if self.lost_at is None or self.dropped or self.grace_seconds is None:
            return False
        if time.monotonic() - self.lost_at < self.grace_seconds:
            return False
        self.dropped = True
        log.warning(
            "no change feed from %s for %g s: dropping cached prefixes until it is back",
            self.safe_url,
            self.grace_seconds,
        )
        return True


class RedisStore:
    """A `PrefixStore` in Redis; see the module docstring for the layout. Thread-safe."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, grace_seconds: float | None = None):
        """`timeout`: seconds a call waits on Redis before StoreUnavailable (connect, and each read: a 1 MB
        prefix takes milliseconds). `grace_seconds`: how long after the change feed went silent a watcher's
        cache may still be trusted before `on_change(None)` drops it; None: until the feed is back."""
        self.url = url
        self.safe_url = _redacted(url)
        redis_url, self.namespace = _split_namespace(url)
        check_id_part(self.namespace, "namespace")
        self.timeout = timeout
        self.grace_seconds = grace_seconds
        self.outage = Outage(self.safe_url)
        self._client_kwargs: dict[str, Any] = dict(
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            socket_keepalive=True,
            # redis-py's pure-Python reader is several times faster on a large prefix in 1 MiB reads than in
            # 64 KiB ones (bench/store_bench.py); small replies cost the same either way.
            socket_read_size=1 << 20,
            health_check_interval=15,  # PING a connection idle this long before using it
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), retries=3, supported_errors=RETRY_ERRORS),
        )
        self._redis_url = redis_url
        self.client = redis.Redis.from_url(redis_url, **self._client_kwargs)
        self._put = self.client.register_script(PUT_SCRIPT)
        self._delete = self.client.register_script(DELETE_SCRIPT)
        self._delete_key = self.client.register_script(DELETE_KEY_SCRIPT)
        self._metas = self.client.register_script(METAS_SCRIPT)
        self.channel = f"{self.namespace}:changes"
        self._stop = threading.Event()
        self._watchers: list[threading.Thread] = []

    # -- key names ------------------------------------------------------------------------------
    def _prefix_key(self, prefix_id: str) -> str:
        return f"{self.namespace}:prefix:{prefix_id}"

    def _index_keys(self, tenant: str) -> list[str]:
        ns = self.namespace
        return [f"{ns}:index:all", f"{ns}:index:tenant:{tenant}", f"{ns}:index:public"]

    def _key_key(self, key_id: str) -> str:
        return f"{self.namespace}:key:{key_id}"

    # -- prefixes -------------------------------------------------------------------------------
    @_unavailable
    def put(
        self, meta: PrefixMeta, data: bytes, *, replace_public: bool = True, keep_visibility: bool = False
    ) -> bool:
        """Store or replace atomically; on replace keeps the first version's created_at (set on `meta`).

        The visibility check (replace_public, keep_visibility; see PrefixStore.put) runs in the same script
        as the write, so it holds across every replica sharing this Redis."""
        tenant, _ = split_id(meta.id)
        private_json = json.dumps({**meta.to_dict(), "public": False})
        public_json = json.dumps({**meta.to_dict(), "public": True})
        reply = self._put(
            keys=[self._prefix_key(meta.id), *self._index_keys(tenant)],
            args=[
                meta.id,
                private_json,
                public_json,
                data,
                repr(meta.created_at),
                "keep" if keep_visibility else int(meta.public),
                self.channel,
                int(replace_public),
            ],
        )
        if int(reply[0]) < 0:
            raise PublicPrefixError(meta.id)
        created, created_at, public = reply
        meta.created_at = float(created_at)
        meta.public = _text(public) == "1"
        return bool(created)

    @staticmethod
    def _parse_meta(raw_meta: Any, raw_created: Any) -> PrefixMeta | None:
        if raw_meta is None:
            return None
        meta = PrefixMeta.from_dict(json.loads(raw_meta))
        if raw_created is not None:
            meta.created_at = float(raw_created)
        return meta

    @_unavailable
    def get_meta(self, prefix_id: str) -> PrefixMeta | None:
        split_id(prefix_id)
        raw_meta, raw_created = self.client.hmget(self._prefix_key(prefix_id), ["meta", "created_at"])
        return self._parse_meta(raw_meta, raw_created)

    @_unavailable
    def get(self, prefix_id: str) -> tuple[PrefixMeta, bytes] | None:
        split_id(prefix_id)
        # One HMGET: meta and bytes of the same version, whatever writers do meanwhile.
        raw_meta, raw_created, data = self.client.hmget(
            self._prefix_key(prefix_id), ["meta", "created_at", "data"]
        )
        meta = self._parse_meta(raw_meta, raw_created)
        if meta is None or not isinstance(data, bytes):
            return None
        return meta, data

    @_unavailable
    def delete(self, prefix_id: str, *, delete_public: bool = True) -> bool:
        tenant, _ = split_id(prefix_id)
        keys = [self._prefix_key(prefix_id), *self._index_keys(tenant)]
        existed = int(self._delete(keys=keys, args=[prefix_id, self.channel, int(delete_public)]))
        if existed < 0:
            raise PublicPrefixError(prefix_id)
        return bool(existed)

    def _range(self, index: str, after: str, count: int) -> list[str]:
        low = f"({after}" if after else "-"
        return [_text(m) for m in self.client.zrangebylex(index, low, "+", start=0, num=count)]

    @_unavailable
    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        include_public: bool = False,
    ) -> tuple[list[PrefixMeta], str | None]:
        """Prefixes ordered by id, `limit` per page; the cursor is the last id seen, opaque to callers."""
        if limit < 1:
            raise InvalidId("limit must be at least 1")
        after = decode_cursor(cursor)
        all_index, tenant_index, public_index = self._index_keys(tenant or "-")
        if tenant is None:
            ids = self._range(all_index, after, limit + 1)
        else:
            check_id_part(tenant, "tenant")
            indexes = [tenant_index, public_index] if include_public else [tenant_index]
            pipe = self.client.pipeline(transaction=False)
            for index in indexes:
                pipe.zrangebylex(index, f"({after}" if after else "-", "+", start=0, num=limit + 1)
            # Each range is sorted by id, so the first limit+1 ids of the union lie within them.
            ids = sorted({_text(m) for members in pipe.execute() for m in members})[: limit + 1]
        has_more = len(ids) > limit
        ids = ids[:limit]
        # One script call instead of `limit` pipelined HMGETs: redis-py parses one reply, not a hundred.
        raw = self._metas(keys=[self._prefix_key(i) for i in ids]) if ids else []
        page: list[PrefixMeta] = []
        for raw_meta, raw_created in zip(raw[::2], raw[1::2], strict=True):
            meta = self._parse_meta(raw_meta or None, raw_created or None)
            # None: deleted since the range was read; not public: made private meanwhile.
            if meta is None or (tenant is not None and meta.tenant != tenant and not meta.public):
                continue
            page.append(meta)
        return page, encode_cursor(ids[-1]) if has_more else None

    @_unavailable
    def count(self) -> int:
        """How many prefixes the store holds (the size of the id index), counted without paging."""
        return int(self.client.zcard(f"{self.namespace}:index:all"))

    # -- keys -----------------------------------------------------------------------------------
    @_unavailable
    def put_key(self, record: KeyRecord) -> None:
        check_id_part(record.key_id, "key id")
        fields: dict[Any, Any] = {
            "key_id": record.key_id,
            "tenant": record.tenant,
            "key_hash": record.key_hash,
            "created_at": repr(record.created_at),
        }
        pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: the key and its index entry together
        pipe.delete(self._key_key(record.key_id))
        pipe.hset(self._key_key(record.key_id), mapping=fields)
        pipe.zadd(f"{self.namespace}:index:keys", {record.key_id: 0})
        pipe.execute()

    @staticmethod
    def _parse_key(raw: Any) -> KeyRecord | None:
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return KeyRecord(
            key_id=fields["key_id"],
            tenant=fields["tenant"],
            key_hash=fields["key_hash"],
            created_at=float(fields["created_at"]),
        )

    @_unavailable
    def get_key(self, key_id: str) -> KeyRecord | None:
        try:
            check_id_part(key_id, "key id")
        except InvalidId:
            return None
        return self._parse_key(self.client.hgetall(self._key_key(key_id)))

    @_unavailable
    def delete_key(self, tenant: str, key_id: str) -> bool:
        """Delete a tenant's key; False when it does not exist or belongs to another tenant."""
        try:
            check_id_part(key_id, "key id")
        except InvalidId:
            return False
        keys = [self._key_key(key_id), f"{self.namespace}:index:keys"]
        return bool(self._delete_key(keys=keys, args=[key_id, tenant]))

    @_unavailable
    def list_keys(self) -> builtins.list[KeyRecord]:
        """Every stored key record (hashes only), ordered by key id; for copying between stores."""
        key_ids = self._range(f"{self.namespace}:index:keys", "", -1)
        pipe = self.client.pipeline(transaction=False)
        for key_id in key_ids:
            pipe.hgetall(self._key_key(key_id))
        return [r for r in map(self._parse_key, pipe.execute()) if r is not None]

    # -- tenant settings and usage --------------------------------------------------------------
    @_unavailable
    def put_tenant(self, tenant: str, settings: dict[str, Any]) -> None:
        check_id_part(tenant, "tenant")
        self.client.set(f"{self.namespace}:tenant:{tenant}", json.dumps(settings))

    @_unavailable
    def get_tenant(self, tenant: str) -> dict[str, Any] | None:
        try:
            check_id_part(tenant, "tenant")
        except InvalidId:
            return None
        raw = self.client.get(f"{self.namespace}:tenant:{tenant}")
        try:
            settings = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return settings if isinstance(settings, dict) else None

    def _usage_key(self, tenant: str, minute: int) -> str:
        return f"{self.namespace}:usage:{tenant}:{minute}"

    @_unavailable
    def add_usage(self, tenant: str, minute: int, requests: int, tokens: int) -> tuple[int, int]:
        """Count a tenant's requests and tokens in a minute window, shared by every replica; returns the
        window's counts after this addition (one atomic step, so concurrent callers see distinct counts)."""
        key = self._usage_key(tenant, minute)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, "requests", requests)
        pipe.hincrby(key, "tokens", tokens)
        pipe.expire(key, 180)
        num_requests, num_tokens, _ = pipe.execute()
        return int(num_requests), int(num_tokens)

    @_unavailable
    def get_usage(self, tenant: str, minutes: builtins.list[int]) -> builtins.list[tuple[int, int]]:
        """(requests, tokens) of each minute window, 0 where none were counted."""
        pipe = self.client.pipeline(transaction=False)
        for minute in minutes:
            pipe.hmget(self._usage_key(tenant, minute), ["requests", "tokens"])
        return [(int(r or 0), int(t or 0)) for r, t in pipe.execute()]

    # -- operations -----------------------------------------------------------------------------
    def ping(self) -> bool:
        """True when Redis answers; False (never an exception) when it does not, within the timeout.

        Always asks Redis, even during an outage (it is what /readyz calls), and ends or starts one."""
        try:
            answered = bool(self.client.ping())
        except (redis.RedisError, OSError) as exc:
            self.outage.end_unreachable(False, f"{type(exc).__name__}: {exc}")
            return False
        self.outage.end_answered(False)
        return answered

    def watch(self, on_change: Callable[[str | None], None]) -> None:
        """Call `on_change(prefix_id)` for every put/delete by any replica, from a daemon thread.

        `on_change(None)` comes after every (re)subscription, the first included: notices published while
        this replica was not subscribed are lost, so the caller must drop everything it cached. It comes too
        once the feed has been lost for `grace_seconds` (when set): past that, what was cached may have
        changed unheard. A feed that stops answering its PINGs within the timeout counts as lost (a paused or
        partitioned Redis keeps the connection open). Reconnects by itself, forever, until close().
        Callbacks must be quick and thread-safe.
        """
        thread = threading.Thread(
            target=self._watch_loop, args=(on_change,), name="redis-store-watch", daemon=True
        )
        self._watchers.append(thread)
        thread.start()

    def _watch_loop(self, on_change: Callable[[str | None], None]) -> None:
        # our own PINGs below tell a silent feed from a quiet one; redis-py's health check would not
        client = redis.Redis.from_url(self._redis_url, **{**self._client_kwargs, "health_check_interval": 0})
        feed = _Feed(self.safe_url, self.channel, self.grace_seconds)
        while not self._stop.is_set():
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                self._listen(pubsub, feed, on_change)
            except (redis.RedisError, OSError, FeedSilent) as exc:
                feed.lost(exc)
            finally:
                pubsub.close()
            if feed.past_grace():
                self._notify(on_change, None)  # unheard changes may have happened: drop what was cached
            self._stop.wait(feed.retry_delay())
        client.close()

    def _listen(self, pubsub: Any, feed: _Feed, on_change: Callable[[str | None], None]) -> None:
        """Pass on notices until the feed breaks or goes silent (FeedSilent) or close() is called."""
        ping_every = max(1.0, self.timeout)
        heard = pinged = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if pinged <= heard and now - heard >= ping_every:
                pubsub.ping()
                pinged = now
            elif pinged > heard and now - pinged > self.timeout:
                raise FeedSilent(f"no answer to a PING in {self.timeout:g} s")
            message = pubsub.get_message(timeout=0.25)
            if message is None:
                continue
            heard = time.monotonic()
            if message["type"] == "subscribe":  # also after redis-py re-subscribed by itself
                feed.subscribed()
                self._notify(on_change, None)
            elif message["type"] == "message":
                self._notify(on_change, _text(message["data"]))

    @staticmethod
    def _notify(on_change: Callable[[str | None], None], prefix_id: str | None) -> None:
        try:
            on_change(prefix_id)
        except Exception:
            log.exception("store change callback failed for %r", prefix_id)

    def close(self) -> None:
        self._stop.set()
        for thread in self._watchers:
            thread.join(timeout=3.0)
        self._watchers.clear()
        self.client.close()
