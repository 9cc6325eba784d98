"""The front's fixed cost per request, and what a flooding tenant's refused requests cost another tenant.

    .venv/bin/python -m bench.request_cost                    # this checkout beside main's merge base
    .venv/bin/python -m bench.request_cost --base 7308828 --rounds 2

Each checkout (this one, and `--base`, a commit exported to a temporary directory) runs its own `prefix-serve`
on the same random tiny GPT-2 (1 layer x 64, nothing downloaded), one at a time, with an admin key, two tenant
keys and a prefix per tenant. Measured on each, side by side in one run:
1. server CPU per request (the process's user + system time from /proc over --requests requests sent by
   --clients concurrent keep-alive clients): `GET /healthz`, and a generate refused with 429 (a tenant whose
   requests_per_minute is used up);
2. the flood: --max-num-seqs 4 slots and --max-queue 8; --flooders clients of tenant "flood" each send a
   generate again as soon as it is answered (0.1 s after a refusal), from another process; tenant "light"
   sends --light-requests generates of --new-tokens tokens one after another. Reported: light's mean latency
   alone, under the flood, their ratio (aim <= 2x), and flood's answers (served, refused) meanwhile;
3. the refused flood: the same clients sending as tenant "capped", whose per-minute quota is used up, so that every
   one of their requests is refused: what a flooder's refusals alone cost the light tenant (light's ratio);
4. the batch floor (this checkout only, in-process, no HTTP): the light request decoded alone and beside 3 running
   rows, what sharing the batch costs it on this CPU before any HTTP traffic or flood client.
The clients speak raw HTTP/1.1 over asyncio streams, so their own cost stays small beside the server's.
Writes bench/results/request_cost.json (request_cost-runner-process.json with --runner-process true, whose
servers all run it, the base too; request_cost-in-process.json with --runner-process false).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import build_gpt2  # noqa: E402

from bench.record import write_result  # noqa: E402
from bench.sampling import cpu_seconds, native_prefixes  # noqa: E402

ADMIN_KEY = "bench-admin-key-0123456789"
PROMPT = "name : Blue Spice | Type : coffee shop | area : city centre"


class Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read the status and the whole body."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", key: str | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        if key is not None:
            head += f"Authorization: Bearer {key}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        length, closes = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                closes = True
        data = await self.reader.readexactly(length) if length else b""
        if closes:
            self.close()
        return int(status_line.split()[1]), data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def generate_body(prefix: str, new_tokens: int) -> bytes:
    return json.dumps(
        {"prefix": prefix, "prompt": PROMPT, "max_new_tokens": new_tokens, "ignore_eos": True}
    ).encode()


async def cost_round(port: int, pid: int, method: str, path: str, body: bytes, key: str | None, expect: int,
                     requests: int, clients: int) -> float:  # fmt: skip
    """Server CPU milliseconds per request over `requests` requests from `clients` concurrent connections."""
    left = [requests]
    statuses: dict[int, int] = {}

    async def client() -> None:
        connection = Connection(port)
        while left[0] > 0:
            left[0] -= 1
            status, _ = await connection.request(method, path, body, key)
            statuses[status] = statuses.get(status, 0) + 1
        connection.close()

    before = cpu_seconds(pid)
    await asyncio.gather(*(client() for _ in range(clients)))
    spent = cpu_seconds(pid) - before
    if statuses.get(expect, 0) < 0.95 * requests:  # a new quota minute may let one through
        raise RuntimeError(f"{method} {path}: statuses {statuses}, expected only {expect}")
    return spent / requests * 1e3


def flood_process(
    port: int, key: str, prefix: str, flooders: int, new_tokens: int, ready, stop, counts
) -> None:
    """The flooding tenant's clients (another process, so their Python does not delay the light client's)."""

    async def client() -> None:
        connection = Connection(port)
        body = generate_body(prefix, new_tokens)
        while not stop.is_set():
            try:
                status, _ = await connection.request("POST", "/v1/generate", body, key)
            except (ConnectionError, asyncio.IncompleteReadError):
                connection.close()
                continue
            with counts.get_lock():
                counts[0 if status == 200 else 1] += 1
            if status != 200:
                await asyncio.sleep(0.1)
        connection.close()

    async def main() -> None:
        tasks = [asyncio.ensure_future(client()) for _ in range(flooders)]
        ready.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


async def light_latencies(port: int, key: str, count: int, new_tokens: int) -> list[float]:
    connection = Connection(port)
    body = generate_body("light/p", new_tokens)
    out = []
    for _ in range(count):
        started = time.perf_counter()
        status, data = await connection.request("POST", "/v1/generate", body, key)
        if status != 200:
            raise RuntimeError(f"light's request got {status}: {data[:300]!r}")
        out.append(time.perf_counter() - started)
    connection.close()
    return out


def flood_round(port: int, keys: dict[str, str], args: argparse.Namespace) -> dict:
    asyncio.run(light_latencies(port, keys["light"], 2, args.new_tokens))  # warm
    alone = asyncio.run(light_latencies(port, keys["light"], args.light_requests, args.new_tokens))
    under, (served, refused) = _flooded(port, keys["light"], keys["flood"], "flood/p", args)
    under_refused, (_, refusals) = _flooded(port, keys["light"], keys["capped"], "capped/p", args)
    alone_ms, under_ms = statistics.mean(alone) * 1e3, statistics.mean(under) * 1e3
    refused_ms = statistics.mean(under_refused) * 1e3
    return {"light_alone_ms": alone_ms, "light_under_flood_ms": under_ms, "ratio": under_ms / alone_ms,
            "flood_served": served, "flood_refused": refused, "light_under_refused_flood_ms": refused_ms,
            "refused_flood_ratio": refused_ms / alone_ms, "refused_flood_refusals": refusals}  # fmt: skip


def _flooded(
    port: int, light: str, key: str, prefix: str, args: argparse.Namespace
) -> tuple[list[float], list[int]]:
    """Light's latencies while `key`'s clients flood, and the flood's answers meanwhile (served, refused)."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop, counts = ctx.Event(), ctx.Event(), ctx.Array("l", 2)
    flood = ctx.Process(
        target=flood_process, args=(port, key, prefix, args.flooders, args.new_tokens, ready, stop, counts)
    )
    flood.start()
    ready.wait(60)
    time.sleep(args.flood_warmup)
    before = list(counts)
    under = asyncio.run(light_latencies(port, light, args.light_requests, args.new_tokens))
    during = [a - b for a, b in zip(counts, before, strict=True)]
    stop.set()
    flood.join(60)
    return under, during


def set_up(url: str, model_dir: Path) -> dict[str, str]:
    """Tenant keys (light, flood, capped), a prefix each, capped's per-minute quota used up."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = {}
    data = native_prefixes(model_dir, 1)[0]
    with httpx.Client(base_url=url, timeout=60, headers=admin) as client:
        for tenant in ("light", "flood", "capped"):
            response = client.post(f"/v1/tenants/{tenant}/keys")
            response.raise_for_status()
            keys[tenant] = response.json()["key"]
            headers = {**admin, "Content-Type": "application/octet-stream"}
            client.put(f"/v1/prefixes/{tenant}/p", content=data, headers=headers).raise_for_status()
        client.put("/v1/tenants/capped", json={"requests_per_minute": 1}).raise_for_status()
        auth = {"Authorization": f"Bearer {keys['capped']}"}
        body = {"prefix": "capped/p", "prompt": PROMPT, "max_new_tokens": 2}
        client.post("/v1/generate", json=body, headers=auth).raise_for_status()
    return keys


def measure(checkout: Path, model_dir: Path, workdir: Path, args: argparse.Namespace) -> dict:
    import serving  # tests/serving.py

    env = {
        "PYTHONPATH": str(checkout),
        "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY,
        "PREFIXSERVE_LOG_LEVEL": "warning",
    }
    server_args = ["--max-num-seqs", "4", "--max-queue", str(args.max_queue), "--max-model-len", "256"]
    if args.runner_process:  # else each checkout's own default
        server_args += ["--runner-process", args.runner_process]
    with (
        tempfile.TemporaryDirectory(dir=workdir) as tmp,
        serving.running_server(
            model_dir,
            str(Path(tmp) / "store"),
            Path(tmp) / "logs",
            env=env,
            args=server_args,
            checkout=checkout,
        ) as server,
    ):
        keys = set_up(server.url, model_dir)
        pid, port = server.process.pid, server.port
        refused = generate_body("capped/p", 2)

        def cost(method: str, path: str, body: bytes, key: str | None, expect: int) -> float:
            asyncio.run(
                cost_round(port, pid, method, path, body, key, expect, args.clients * 4, args.clients)
            )
            return asyncio.run(
                cost_round(port, pid, method, path, body, key, expect, args.requests, args.clients)
            )

        return {
            "healthz_cpu_ms": cost("GET", "/healthz", b"", None, 200),
            "refused_429_cpu_ms": cost("POST", "/v1/generate", refused, keys["capped"], 429),
            **flood_round(port, keys, args),
        }


def batch_floor(model_dir: Path, new_tokens: int, repeats: int = 4) -> dict:
    """What sharing the batch alone costs the light request, with no HTTP and no flood client: this checkout's
    engine in this process, the light request decoded alone and beside 3 running rows (4 slots full), median ms."""
    from server.engine.backbone import load_backbone
    from server.engine.engine import Engine, EngineConfig
    from server.engine.request import SamplingParams

    backbone = load_backbone(model_dir, "cpu", "float32")

    async def light_ms(others: int) -> float:
        engine = Engine(backbone, EngineConfig(max_num_seqs=4, max_model_len=256))
        long = SamplingParams(max_new_tokens=250 - 24, ignore_eos=True)
        for _ in range(others):
            engine.add(engine.tokenize(PROMPT), long, tenant="flood")
        engine.step()
        times = []
        for _ in range(repeats):
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            request = engine.add(engine.tokenize(PROMPT), params, tenant="light")
            started = time.perf_counter()
            while not request.is_finished:
                engine.step()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e3

    alone, beside = asyncio.run(light_ms(0)), asyncio.run(light_ms(3))
    return {"light_alone_ms": alone, "light_beside_3_rows_ms": beside, "ratio": beside / alone}


def export(rev: str, into: Path) -> Path:
    """The commit's files (no .git) in `into`: a server from before this checkout's changes."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", default="7308828", help="the commit to compare with ('' = this checkout only)"
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per CPU measurement")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--flooders", type=int, default=96)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--light-requests", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--flood-warmup", type=float, default=2.0, help="seconds of flood before light starts"
    )
    parser.add_argument(
        "--runner-process", choices=["true", "false"], help="every server with this --runner-process"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="each checkout measured this many times, in turn"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = build_gpt2(workdir / "model", n_layer=1, n_head=1, n_embd=64, n_positions=256)
        checkouts = {"this": ROOT}
        if args.base:
            checkouts = {f"base {args.base}": export(args.base, workdir / "base"), **checkouts}
        runs: dict[str, list[dict]] = {name: [] for name in checkouts}
        for _ in range(args.rounds):
            for name, checkout in checkouts.items():
                runs[name].append(measure(checkout, model_dir, workdir, args))
                print(name, json.dumps({k: round(v, 3) for k, v in runs[name][-1].items()}), flush=True)
        floor = batch_floor(model_dir, args.new_tokens)
    figures = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]} | {"rounds": rounds}
        for name, rounds in runs.items()
    }
    print(f"{'':28}" + "".join(f"{name:>22}" for name in figures))
    for key in runs["this"][0]:
        print(f"{key:28}" + "".join(f"{f[key]:>22.3f}" for f in figures.values()))
    print("batch floor (this checkout, in-process):", json.dumps(floor))
    figures["batch_floor"] = floor
    name = {"true": "request_cost-runner-process", "false": "request_cost-in-process"}.get(
        args.runner_process or "", "request_cost"
    )
    write_result(name, "bench.request_cost", figures)


if __name__ == "__main__":
    main()
