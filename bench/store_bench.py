"""Store benchmark: cold loads of a ~1 MB prefix into the device cache, and listing pages among 100,000 prefixes.

    .venv/bin/python -m bench.store_bench [--url redis://127.0.0.1:6379/15] [--count 100000]

Cold load = what a cache miss costs a request: store.get (bytes + meta) -> parse the native file -> the
cache's to_device (here CPU: the tensors as they are). The directory store runs beside Redis for comparison.
Everything is written under its own namespace in the given db and removed afterwards (no FLUSHDB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

import torch

from bench.record import write_result
from prefix_store.cache import PrefixCache
from prefix_store.format import Prefix, load_prefix, save_prefix
from prefix_store.local import LocalStore
from prefix_store.redis import RedisStore
from prefix_store.store import PrefixStore, encode_cursor, make_meta

FIGURES: dict[str, dict[str, float]] = {}  # what bench/results/store.json gets, filled as the figures print


def percentiles(samples: list[float], key: str) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    FIGURES[key] = {"p50_ms": statistics.median(ms), "p99_ms": p99, "n": len(ms)}
    return f"p50 {statistics.median(ms):7.3f} ms   p99 {p99:7.3f} ms   (n={len(ms)})"


def gpt2_prefix(num_tokens: int, num_layers: int = 12, num_heads: int = 12, head_dim: int = 64) -> bytes:
    # [num_layers, 2, num_heads, P, head_dim] float32: 12*2*12*14*64*4 B = 1.03 MB for P=14 (GPT-2 small)
    targets = {"decoder": torch.randn(num_layers, 2, num_heads, num_tokens, head_dim)}
    return save_prefix(Prefix(model_type="gpt2", targets=targets))


def cold_loads(store: PrefixStore, iterations: int, name: str) -> list[float]:
    data = gpt2_prefix(num_tokens=14)
    store.put(make_meta("bench/cold", load_prefix(data), data, "native", False), data)
    cache = PrefixCache(store, to_device=lambda p: p.targets, max_bytes=1 << 30)
    get_only = timed(lambda: store.get("bench/cold"), iterations)
    samples = []
    for _ in range(iterations + 5):
        cache.invalidate("bench/cold")
        started = time.perf_counter()
        entry = cache.acquire("bench/cold")
        samples.append(time.perf_counter() - started)
        cache.release(entry)
    store.delete("bench/cold")
    print(f"    store.get alone:     {percentiles(get_only, f'{name}_get')}")
    return samples[5:]  # the first loads warm up connections and the script cache


def fill(store: RedisStore, count: int, num_tenants: int) -> list[str]:
    """Write `count` small prefixes through the store's own Lua script, pipelined 1,000 per round trip."""
    data = gpt2_prefix(num_tokens=1, num_layers=1, num_heads=1, head_dim=8)
    prefix = load_prefix(data)
    ids = [f"tenant{i % num_tenants:03d}/prefix-{i:06d}" for i in range(count)]
    started = time.perf_counter()
    for start in range(0, count, 1000):
        pipe = store.client.pipeline(transaction=False)
        for i, prefix_id in enumerate(ids[start : start + 1000], start):
            meta = make_meta(prefix_id, prefix, data, "native", public=i % 1000 == 0)
            store._put(
                keys=[store._prefix_key(prefix_id), *store._index_keys(meta.tenant)],
                args=[
                    prefix_id,
                    json.dumps(meta.to_dict()),
                    data,
                    repr(meta.created_at),
                    int(meta.public),
                    store.channel,
                ],
                client=pipe,
            )
        pipe.execute()
    elapsed = time.perf_counter() - started
    print(f"  inserted {count:,} prefixes in {elapsed:.1f} s ({count / elapsed:,.0f}/s, pipelined)")
    return sorted(ids)


def timed(call: Callable[[], object], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def listing(store: RedisStore, ids: list[str]) -> None:
    middle = encode_cursor(ids[len(ids) // 2])
    print(
        f"  first page (100):            {percentiles(timed(lambda: store.list(limit=100), 200), 'list_first_page')}"
    )
    middle_page = timed(lambda: store.list(limit=100, cursor=middle), 200)
    print(f"  page at the middle (100):    {percentiles(middle_page, 'list_middle_page')}")
    page = lambda: store.list(tenant="tenant050", limit=100, cursor=middle, include_public=True)  # noqa: E731
    print(f"  tenant + public, middle:     {percentiles(timed(page, 200), 'list_tenant_public_middle')}")
    started = time.perf_counter()
    seen, cursor, pages = 0, None, 0
    while True:
        batch, cursor = store.list(limit=100, cursor=cursor)
        seen += len(batch)
        pages += 1
        if cursor is None:
            break
    elapsed = time.perf_counter() - started
    assert seen == len(ids), (seen, len(ids))
    print(f"  full walk: {pages:,} pages of 100 in {elapsed:.2f} s ({elapsed / pages * 1000:.3f} ms/page)")
    FIGURES["list_full_walk"] = {"pages": pages, "seconds": elapsed, "ms_per_page": elapsed / pages * 1000}


def remove(store: RedisStore, ids: list[str], num_tenants: int) -> None:
    for start in range(0, len(ids), 5000):
        store.client.delete(*(store._prefix_key(i) for i in ids[start : start + 5000]))
    tenants = [f"tenant{t:03d}" for t in range(num_tenants)]
    store.client.delete(*{k for t in tenants for k in store._index_keys(t)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default="redis://127.0.0.1:6379/15", help="Redis db to use (cleaned afterwards)"
    )
    parser.add_argument("--count", type=int, default=100_000, help="prefixes stored for the listing figures")
    parser.add_argument("--iterations", type=int, default=200, help="cold loads measured per store")
    args = parser.parse_args()
    torch.manual_seed(0)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore(f"{args.url}?namespace={namespace}")
    print(f"Redis {store.safe_url} namespace {namespace}; torch {torch.__version__}")

    print("cold load of a ~1 MB prefix into PrefixCache (store.get + parse + to_device on CPU):")
    print("  redis:")
    print(
        f"    acquire (cold):      {percentiles(cold_loads(store, args.iterations, 'redis'), 'redis_cold_load')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        print("  directory (page cache warm):")
        loads = cold_loads(LocalStore(tmp), args.iterations, "directory")
        print(f"    acquire (cold):      {percentiles(loads, 'directory_cold_load')}")

    num_tenants = 100
    print(f"listing with {args.count:,} prefixes stored ({num_tenants} tenants, 1 in 1,000 public):")
    ids: list[str] = []
    try:
        ids = fill(store, args.count, num_tenants)
        listing(store, ids)
    finally:
        remove(
            store,
            ids or [f"tenant{i % num_tenants:03d}/prefix-{i:06d}" for i in range(args.count)],
            num_tenants,
        )
        store.close()
    figures = {"count": args.count, "tenants": num_tenants, "iterations": args.iterations, **FIGURES}
    write_result("store", "bench.store_bench", figures)


if __name__ == "__main__":
    main()
