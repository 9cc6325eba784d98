"""Prometheus metrics (one registry per app, so several apps can live in one process in tests)."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # no *_created series: noise for dashboards

_PREFIX_ID = operator.attrgetter("prefix_id")
SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _LiveCollector(Collector):
    """Figures read at scrape time from the engine and the device cache."""

    def __init__(self, state: Any):
        self.state = state

    def collect(self) -> Iterator[Any]:
        cache, engine = self.state.cache, self.state.engine
        if cache is not None:
            pool = getattr(getattr(engine, "runner", None), "block_pool", None)
            # --kv-layout paged: the cache holds host copies; a prefix's device copy is its blocks in the pool
            where = (
                " (host copies: --kv-layout paged keeps prefixes on the device as KV blocks only)"
                if pool
                else ""
            )
            for name, value, text in (
                ("hits", cache.stats.hits, "requests whose prefix was in the prefix cache"),
                ("misses", cache.stats.misses, "requests whose prefix was loaded from the store"),
                ("evictions", cache.stats.evictions, "prefixes evicted to stay within the byte budget"),
            ):
                yield CounterMetricFamily(f"prefixserve_prefix_cache_{name}", text + where, value=value)
            yield GaugeMetricFamily(
                "prefixserve_prefix_cache_bytes",
                "bytes of prefixes in the prefix cache" + where,
                value=cache.num_bytes,
            )
            yield GaugeMetricFamily(
                "prefixserve_prefix_cache_entries", "prefixes in the prefix cache" + where, value=len(cache)
            )
        if engine is not None:
            yield GaugeMetricFamily(
                "prefixserve_queue_depth", "requests waiting for a slot", value=engine.num_waiting
            )
            yield GaugeMetricFamily(
                "prefixserve_running_requests", "sequences in the running batch", value=engine.num_running
            )
            yield CounterMetricFamily("prefixserve_engine_steps", "engine steps run", value=engine.num_steps)
            yield CounterMetricFamily(
                "prefixserve_engine_step_seconds",
                "wall time of those steps (schedule, inputs, forward, sampling, bookkeeping)",
                value=engine.step_seconds,
            )
            yield CounterMetricFamily(
                "prefixserve_engine_step_cpu_seconds",
                "CPU time of the engine's thread in those steps (step - cpu = time a step waited off the CPU: "
                "for the GIL while the front runs Python, for the device, or for a core)",
                value=engine.step_cpu_seconds,
            )
            yield CounterMetricFamily(
                "prefixserve_engine_forward_seconds",
                "time inside the model's forward calls of those steps (host time per step = step - forward; "
                "on CUDA the forward is timed without a sync, so it counts launches)",
                value=engine.runner.forward_seconds,
            )
            running = GaugeMetricFamily(
                "prefixserve_tenant_running_requests", "running sequences by tenant", labels=["tenant"]
            )
            queued = GaugeMetricFamily(
                "prefixserve_tenant_queued_requests",
                "requests waiting for a slot by tenant",
                labels=["tenant"],
            )
            for tenant, load in sorted(engine.tenant_load().items()):
                running.add_metric([tenant], load.num_running)
                queued.add_metric([tenant], load.num_waiting)
            yield running
            yield queued
            yield CounterMetricFamily(
                "prefixserve_share_preemptions",
                "running requests preempted so that a tenant with nothing running got a row at once (resumed "
                "later, same output)",
                value=engine.scheduler.num_share_preemptions,
            )
            yield from _block_pool(getattr(engine.runner, "block_pool", None))
            if getattr(engine.runner, "block_pool", None) is not None:
                yield CounterMetricFamily(
                    "prefixserve_kv_preemptions",
                    "running requests preempted when the pool ran out of blocks (resumed later, same output)",
                    value=engine.scheduler.num_preemptions,
                )


def _block_pool(pool: Any) -> Iterator[Any]:
    """The paged KV pool's blocks (`--kv-layout paged`); nothing with the slot cache."""
    if pool is None:
        return
    for name, value, text in (
        ("total", pool.num_usable, "KV blocks in the pool (--kv-layout paged)"),
        ("free", pool.num_free, "KV blocks free"),
        ("prefixes", pool.num_prefix_blocks, "KV blocks holding resident prefixes, each stored once"),
        (
            "evictable",
            pool.num_evictable_blocks,
            "KV blocks of resident prefixes no running request references (of _prefixes): given to others, least "
            "recently used first, when the free ones run out",
        ),
        ("sequences", pool.num_sequence_blocks, "KV blocks reserved by running sequences"),
    ):
        yield GaugeMetricFamily(f"prefixserve_kv_blocks_{name}", text, value=value)
    yield GaugeMetricFamily(
        "prefixserve_kv_prefixes", "prefixes resident in the pool", value=pool.num_resident_prefixes
    )
    for name, value, text in (
        ("evictions", pool.num_evictions, "unreferenced prefixes evicted from the pool"),
        (
            "loads",
            pool.num_prefix_loads,
            "admissions that wrote their prefix into the pool (a host-to-device copy)",
        ),
        ("hits", pool.num_prefix_hits, "admissions whose prefix was resident in the pool (nothing copied)"),
    ):
        yield CounterMetricFamily(f"prefixserve_kv_prefix_{name}", text, value=value)


class PublicView(Collector):
    """The registry without per-tenant series: /metrics answers anyone, and tenant names are not for anyone."""

    TENANT_PREFIX = "prefixserve_tenant_"

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        return (m for m in self.registry.collect() if not m.name.startswith(self.TENANT_PREFIX))


class Metrics:
    def __init__(self, state: Any):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "prefixserve_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "prefixserve_generated_tokens", "tokens generated", registry=self.registry
        )
        self.tenant_requests = Counter(
            "prefixserve_tenant_requests", "generation requests by tenant", ["tenant"], registry=self.registry
        )
        self.tenant_tokens = Counter(
            "prefixserve_tenant_generated_tokens",
            "tokens generated by tenant",
            ["tenant"],
            registry=self.registry,
        )
        self.tenant_refusals = Counter(
            "prefixserve_tenant_refusals",
            "generation requests refused with 429, by tenant and reason",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "prefixserve_batch_size",
            "sequences per forward step",
            buckets=SEQ_BUCKETS,
            registry=self.registry,
        )
        self.batch_distinct_prefixes = Histogram(
            "prefixserve_batch_distinct_prefixes",
            "distinct prefixes per forward step (no prefix counts as one)",
            buckets=SEQ_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "prefixserve_request_latency_seconds",
            "generation latency",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "prefixserve_time_to_first_token_seconds",
            "time to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(state))

    def on_forward(self, requests: list[Any]) -> None:
        """Called by the engine thread for every forward pass."""
        self.batch_size.observe(len(requests))
        # map and set run in C: no Python loop over a steady step's rows
        self.batch_distinct_prefixes.observe(len(set(map(_PREFIX_ID, requests))))
