"""The hostile battery of issue 29, rerunnable: attack a real prefix-serve as a hostile but legitimate user.

    .venv/bin/python scripts/hostile_run.py                      # everything: about 3 minutes on a busy 2-core CPU
    .venv/bin/python scripts/hostile_run.py --out /tmp/hostile.json --only 1,2,new

It starts its own servers from this checkout (`python -m server`, the demo backbone, CPU), its own
redis-server on a free port, all in a temporary directory, and stops them at the end:
- A: embedded store, admin key, --body-timeout 5, --cors-origins https://app.example.com;
- B: Redis store (default --store-timeout 2 and --body-timeout 60);
- C: embedded store, --max-num-seqs 4 --max-queue 8, for the flood (started after A and B are stopped).
One probe per item of issue 29 (1-10) and a few new ones ("new"); each prints PASS, FAIL or INFO with what it
measured, then a summary table; --out writes the findings as JSON. Nothing here changes the server: a FAIL
is a finding to report. Timings depend on the machine's load, printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from own_redis import OwnRedis, free_port  # noqa: E402  (the tests' own redis-server: start, pause, kill)

ADMIN_KEY = "hostile-admin-" + "k" * 24
STORE_TIMEOUT = 2.0  # the documented default, which server B runs with
BODY_TIMEOUT_A = 5.0  # server A's --body-timeout, so that the slow-body probe stays short
CORS_ORIGIN = "https://app.example.com"
DEMO_TEMPLATE = " {source} <|endoftext|>"
PROMPT = "name : Blue Spice | Type : coffee shop | area : city centre"
HEAVY_SECONDS = 4.0  # how long six clients keep sending 1,000,000-character prompts (item 3)


# -- findings ------------------------------------------------------------------------------------------


@dataclass
class Finding:
    item: str  # the item number, or "new"
    probe: str
    verdict: str  # PASS, FAIL, INFO (measured, no pass bar) or ERROR (the probe itself broke)
    summary: str  # the facts in one line, for the table
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


FINDINGS: list[Finding] = []


def report(item: str, probe: str, ok: bool | None, summary: str, **facts: Any) -> None:
    verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    FINDINGS.append(Finding(item, probe, verdict, summary, facts))
    print(f"{verdict:5} [{item}] {probe}: {summary}", flush=True)
    if facts:
        print("      " + json.dumps(facts, default=str)[:1500], flush=True)


# -- processes -----------------------------------------------------------------------------------------


class Server:
    """One `python -m server` from this checkout, its log in the work directory."""

    def __init__(self, name: str, model: Path, store: str, workdir: Path, args: list[str]):
        self.name, self.model, self.store, self.args = name, model, store, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", PREFIXSERVE_ADMIN_KEY=ADMIN_KEY)
        command = [sys.executable, "-m", "server", "--model", str(self.model), "--store", self.store]
        command += ["--port", str(self.port), "--device", "cpu", *self.args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} not ready in {timeout} s:\n{self.log()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def proc_status(self) -> dict[str, int]:
        """VmRSS and VmHWM in kB from /proc/<pid>/status."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
        return out

    def stop(self, timeout: float = 30) -> float | None:
        """SIGTERM, then SIGKILL after `timeout`; seconds it took to exit (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


# -- HTTP helpers --------------------------------------------------------------------------------------


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


ADMIN = auth(ADMIN_KEY)


def client(server: Server, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=timeout)


def error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def upload(
    c: httpx.Client, prefix_id: str, data: bytes, key: str = ADMIN_KEY, public: bool = False
) -> httpx.Response:
    headers = {**auth(key), "Content-Type": "application/octet-stream"}
    return c.put(f"/v1/prefixes/{prefix_id}", params={"public": "true"} if public else None, content=data,
                 headers=headers)  # fmt: skip


def new_key(c: httpx.Client, tenant: str) -> str:
    response = c.post(f"/v1/tenants/{tenant}/keys", headers=ADMIN)
    response.raise_for_status()
    return str(response.json()["key"])


def generate(c: httpx.Client, key: str | None, prefix: str | None, tokens: int = 2, prompt: str = PROMPT,
             **extra: Any) -> httpx.Response:  # fmt: skip
    body = {"prefix": prefix, "prompt": prompt, "max_new_tokens": tokens, "ignore_eos": True, **extra}
    return c.post("/v1/generate", json=body, headers=auth(key))


def timed(fn: Callable[[], httpx.Response]) -> tuple[int, str | None, float]:
    """(status, error code, seconds); status 0 when the client gave up or the connection broke."""
    started = time.monotonic()
    try:
        response = fn()
        return response.status_code, error_code(response), time.monotonic() - started
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__, time.monotonic() - started


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=ADMIN, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def requests_by_status(m: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in m.items():
        found = re.match(r'prefixserve_requests_total\{endpoint="([^"]*)",status="(\d+)"\}', name)
        if found and found.group(1) != "/metrics":  # the probes' own reads
            out[found.group(2)] = out.get(found.group(2), 0) + value
    return out


def count_5xx(m: dict[str, float]) -> float:
    return sum(v for status, v in requests_by_status(m).items() if status.startswith("5"))


def raw_http(port: int, data: bytes, timeout: float = 15) -> tuple[int | None, bytes, float]:
    """Send bytes verbatim (paths no client would normalise), read to EOF: (status, response, seconds)."""
    started = time.monotonic()
    buf = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            while chunk := s.recv(65536):
                buf += chunk
    except OSError:
        pass
    found = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    return (int(found.group(1)) if found else None), buf, time.monotonic() - started


def raw_request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    )
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return head.encode("latin-1") + b"\r\n" + body


def slow_body(port: int, path: str, key: str, length: int, limit: float) -> dict[str, Any]:
    """Send a body's headers, then one byte a second: when and how the server cut it off."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = raw_request("PUT", path, {**auth(key), "Content-Type": "application/octet-stream"})
    head = head.replace(b"Content-Length: 0", f"Content-Length: {length}".encode()).replace(
        b"Connection: close\r\n", b""
    )
    s.sendall(head)
    started, sent, answer, how = time.monotonic(), 0, b"", "still open"
    s.settimeout(1.0)
    try:
        while time.monotonic() - started < limit:
            try:
                chunk = s.recv(4096)
                if not chunk:
                    how = "closed"
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    how = "answered"
                    s.settimeout(2.0)  # the error body follows the headers
                    with contextlib.suppress(OSError):
                        while b'"code"' not in answer and (chunk := s.recv(4096)):
                            answer += chunk
                    break
            except TimeoutError:
                pass
            try:
                s.sendall(b"x")
                sent += 1
            except OSError:
                how = "reset"
                break
    finally:
        s.close()
    found = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    code = re.search(rb'"code":\s*"([a-z_]+)"', answer)
    return {"how": how, "after_s": round(time.monotonic() - started, 2), "bytes_sent": sent,
            "status": int(found.group(1)) if found else None, "code": code.group(1).decode() if code else None}  # fmt: skip


# -- prefixes ------------------------------------------------------------------------------------------


class Prefixes:
    """Native prefix files shaped for the served backbone."""

    def __init__(self, model: Path):
        config = json.loads((model / "config.json").read_text())
        self.layers, self.heads = config["n_layer"], config["n_head"]
        self.head_dim = config["n_embd"] // config["n_head"]

    def native(self, seed: int = 0, length: int = 2, template: str | None = None, dtype: Any = None,
               scale: float = 0.5, shape: tuple[int, ...] | None = None, fill: float | None = None) -> bytes:  # fmt: skip
        import torch

        from prefix_store.format import Prefix, save_prefix

        shape = shape or (self.layers, 2, self.heads, length, self.head_dim)
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
        if fill is not None:
            tensor.view(-1)[0] = fill
        if dtype is not None:
            tensor = tensor.to(dtype)
        return save_prefix(Prefix("gpt2", {"decoder": tensor}, prompt_template=template))


def safetensors_raw(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """A safetensors file written by hand, for dtypes and headers save_prefix would never write."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


# -- the run -------------------------------------------------------------------------------------------


class Run:
    """The servers and tenants the probes share, started on first use."""

    def __init__(self, workdir: Path, model: Path, args: argparse.Namespace):
        self.workdir, self.model, self.args = workdir, model, args
        self.prefixes = Prefixes(model)
        (workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = OwnRedis(workdir / "redis")
        self._a: Server | None = None
        self._b: Server | None = None
        self.keys: dict[tuple[str, str], str] = {}  # (server name, tenant) -> key
        self.background: dict[str, Any] = {}

    def make_a(self) -> Server:
        args = ["--body-timeout", str(BODY_TIMEOUT_A), "--cors-origins", CORS_ORIGIN]
        return Server("A", self.model, str(self.workdir / "store-a"), self.workdir, args)

    def make_b(self) -> Server:
        if self.redis.process is None:
            self.redis.start()
        return Server("B", self.model, self.redis.url, self.workdir, [])

    def prestart(self) -> None:
        """Start A and B side by side (imports overlap), then wait for both."""
        self._a, self._b = self.make_a(), self.make_b()
        self._a.launch()
        self._b.launch()
        self._a.wait_ready()
        self._b.wait_ready()

    @property
    def a(self) -> Server:
        if self._a is None:
            self._a = self.make_a()
            self._a.launch()
            self._a.wait_ready()
        return self._a

    @property
    def b(self) -> Server:
        if self._b is None:
            self._b = self.make_b()
            self._b.launch()
            self._b.wait_ready()
        return self._b

    def key(self, server: Server, tenant: str) -> str:
        if (server.name, tenant) not in self.keys:
            with client(server) as c:
                self.keys[(server.name, tenant)] = new_key(c, tenant)
        return self.keys[(server.name, tenant)]

    def stop_all(self) -> None:
        for server in (self._a, self._b):
            if server is not None:
                server.stop()
        self.redis.kill()


# -- 1: listing and the copy tool ----------------------------------------------------------------------

LIST_TENANTS = ["0z", "A", "a", "a-b", "a.b", "a0", "a9", "a_b", "b"]
LIST_NAMES = ["X", "x", "x-1", "x.1", "x1", "x_1"]


def walk(c: httpx.Client, key: str, limit: int, tenant: str | None = None) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(5000):
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        if tenant:
            params["tenant"] = tenant
        response = c.get("/v1/prefixes", params=params, headers=auth(key))
        response.raise_for_status()
        page = response.json()
        ids += [p["id"] for p in page["prefixes"]]
        cursor = page["next_cursor"]
        if not cursor:
            return ids
    raise RuntimeError("listing did not end in 5000 pages")


def compare_walk(got: list[str], want: list[str]) -> dict[str, Any]:
    repeated = sorted({i for i in got if got.count(i) > 1})
    return {"listed": len(got), "expected": len(want), "missing": sorted(set(want) - set(got))[:10],
            "extra": sorted(set(got) - set(want))[:10], "repeated": repeated[:10],
            "in_order": got == sorted(got), "exact": got == want}  # fmt: skip


def probe_listing(run: Run) -> None:
    ids = sorted(f"{t}/{n}" for t in LIST_TENANTS for n in LIST_NAMES)
    data = run.prefixes.native(seed=1, length=1)
    for server in (run.a, run.b):
        started = time.monotonic()
        with client(server) as c:
            for prefix_id in ids:
                upload(c, prefix_id, data).raise_for_status()
            upload(c, "zz/pub", data, public=True).raise_for_status()
            a_key = run.key(server, "a")
            problems: dict[str, Any] = {}
            # Admin, everything: each page size against the sorted set of all ids the store holds.
            everything = walk(c, ADMIN_KEY, 1000)
            if everything != sorted(set(everything)) or not set(ids) <= set(everything):
                problems["admin limit=1000"] = compare_walk(everything, sorted(set(everything) | set(ids)))
            for limit in (1, 2, 3, 7):
                facts = compare_walk(walk(c, ADMIN_KEY, limit), sorted(set(everything)))
                if not facts["exact"]:
                    problems[f"admin limit={limit}"] = facts
            # A tenant key, and the admin scoped to one tenant whose name sorts before "a/".
            own_a = [i for i in ids if i.startswith("a/")]
            tenant_walk = walk(c, a_key, 1000)
            includes_public = "zz/pub" in tenant_walk
            for limit in (1, 2, 3, 7):
                facts = compare_walk(walk(c, a_key, limit), own_a + (["zz/pub"] if includes_public else []))
                if not facts["exact"]:
                    problems[f"tenant a limit={limit}"] = facts
                own_ab = [i for i in ids if i.startswith("a-b/")]
                facts = compare_walk(walk(c, ADMIN_KEY, limit, tenant="a-b"), own_ab)
                if not facts["exact"]:
                    problems[f"admin tenant=a-b limit={limit}"] = facts
            models = [m["id"] for m in c.get("/v1/models", headers=auth(a_key)).json()["data"]]
            prefix_models = [m for m in models if "/" in m]
            models_public = "zz/pub" in prefix_models
        store = "embedded" if server is run.a else "redis"
        report("1", f"listing, {store} store", not problems,
               f"{len(ids) + 1} ids with - . _ digits, pages 1,2,3,7 (admin all, tenant key, admin ?tenant=a-b): "
               + ("every prefix once, in id order" if not problems else f"{len(problems)} walks wrong")
               + f"; tenant key's listing includes public: {includes_public}, its /v1/models: {models_public}; "
               "/v1/models in id order: "
               f"{prefix_models == sorted(prefix_models)}",
               problems=problems, seconds=round(time.monotonic() - started, 1))  # fmt: skip


def counts(output: str) -> str:
    """The copy tool's counts that matter here, from its summary line."""
    found = dict(re.findall(r"\b(copied|unchanged|skipped|verified)=(\d+)", output))
    return ", ".join(f"{k}={v}" for k, v in found.items()) or output.strip()[-120:]


def probe_copy(run: Run) -> None:
    import redis

    server = run.a
    data = run.prefixes.native(seed=2, length=1)
    extra = ["a-b/x", "a.b/x", "b/x", "a_b/x", "a0/x"]
    ids = [f"a/p{i:03d}" for i in range(520)] + extra
    with client(server) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda i: upload(c, i, data).status_code, ids))
        source_ids = walk(c, ADMIN_KEY, 1000)
        metas = {}
        for i in source_ids:
            metas[i] = c.get(f"/v1/prefixes/{i}", headers=ADMIN).json()
    namespace = "hostilecopy"  # its own namespace in server B's Redis: B's prefixes are not touched
    if run.redis.process is None:
        run.redis.start()
    destination = f"{run.redis.url}?namespace={namespace}"
    command = [sys.executable, "-m", "prefix_store.copy", str(run.workdir / "store-a"), destination]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    copy_s = time.monotonic() - started
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    r = redis.Redis(host="127.0.0.1", port=run.redis.port, db=0)
    missing, wrong = [], []
    for prefix_id in source_ids:
        raw = r.hget(f"{namespace}:prefix:{prefix_id}", "meta")
        if raw is None:
            missing.append(prefix_id)
            continue
        meta = json.loads(raw)
        if (
            meta.get("sha256") != metas[prefix_id]["sha256"]
            or meta.get("public") != metas[prefix_id]["public"]
        ):
            wrong.append(prefix_id)
    indexed = r.zcard(f"{namespace}:index:all")
    r.close()
    verified = re.search(r"verified=(\d+)", first.stdout + first.stderr)
    ok = (first.returncode == 0 and second.returncode == 0 and not missing and not wrong
          and indexed == len(source_ids) and verified is not None and int(verified.group(1)) == len(source_ids))  # fmt: skip
    report("1", "prefix_store.copy dir -> Redis", ok,
           f"{len(source_ids)} prefixes (incl. {', '.join(extra)}): exit {first.returncode} in {copy_s:.1f} s, "
           f"{counts(first.stdout)}; in Redis {indexed} indexed, {len(missing)} missing, "
           f"{len(wrong)} with another sha256/visibility; rerun exit {second.returncode}, {counts(second.stdout)}",
           upload_statuses=sorted(set(statuses)), missing=missing[:20], wrong=wrong[:20],
           stderr=(first.stderr or "")[-500:])  # fmt: skip


# -- 2: a paused and a killed Redis --------------------------------------------------------------------


def probe_redis_outage(run: Run) -> None:
    server = run.b
    acme, gamma = run.key(server, "acme"), run.key(server, "gamma")  # gamma's key is never used before
    bound = STORE_TIMEOUT + 3.0  # the store timeout once, plus a short generation on a loaded machine
    with client(server, timeout=60) as c:
        upload(c, "acme/own", run.prefixes.native(seed=3), acme).raise_for_status()
        for cold in ("acme/cold", "acme/cold2"):  # never generated from before their outage: not resident
            upload(c, cold, run.prefixes.native(seed=4), acme).raise_for_status()
        upload(c, "pub/shared", run.prefixes.native(seed=5), public=True).raise_for_status()

        def warm() -> None:
            for prefix in ("acme/own", "pub/shared", "acme/own", "pub/shared"):
                generate(c, acme, prefix).raise_for_status()

        def outage_checks(cold: str) -> list[dict[str, Any]]:
            checks: list[tuple[str, int, Callable[[], httpx.Response]]] = [
                ("acme generates acme/own (resident, private)", 200, lambda: generate(c, acme, "acme/own")),
                *[
                    (
                        f"acme generates pub/shared (resident, public) #{i}",
                        200,
                        lambda: generate(c, acme, "pub/shared"),
                    )
                    for i in range(5)
                ],  # fmt: skip
                (
                    "acme /v1/completions acme/own",
                    200,
                    lambda: c.post(
                        "/v1/completions",
                        json={"model": "acme/own", "prompt": "hi", "max_tokens": 2},
                        headers=auth(acme),
                    ),
                ),
                ("admin generates pub/shared", 200, lambda: generate(c, ADMIN_KEY, "pub/shared")),
                (f"acme generates {cold} (not resident)", 503, lambda: generate(c, acme, cold)),
                ("acme generates acme/missing", 503, lambda: generate(c, acme, "acme/missing")),
                (
                    "gamma (key never verified here) generates pub/shared",
                    503,
                    lambda: generate(c, gamma, "pub/shared"),
                ),
                ("acme uploads", 503, lambda: upload(c, "acme/new", run.prefixes.native(seed=6), acme)),
                ("acme lists", 503, lambda: c.get("/v1/prefixes", headers=auth(acme))),
                ("GET /readyz", 503, lambda: c.get("/readyz")),
                ("GET /healthz", 200, lambda: c.get("/healthz")),
                ("acme generates acme/own again", 200, lambda: generate(c, acme, "acme/own")),
            ]
            out = []
            for label, want, fn in checks:
                status, code, seconds = timed(fn)
                out.append({"check": label, "want": want, "status": status, "code": code, "s": round(seconds, 2),
                            "ok": status == want and seconds <= bound
                            and (want != 503 or code in ("store_unavailable", None))})  # fmt: skip
            return out

        warm()
        log_before = server.log()
        run.redis.pause()
        paused = outage_checks("acme/cold")
        time.sleep(0.5)
        log_paused = server.log()[len(log_before) :]
        unreachable_lines = log_paused.count("is unreachable")
        run.redis.resume()
        started = time.monotonic()
        while c.get("/readyz").status_code != 200 and time.monotonic() - started < 20:
            time.sleep(0.1)
        recovered_s = time.monotonic() - started
        after = {
            "own": generate(c, acme, "acme/own").status_code,
            "cold": generate(c, acme, "acme/cold").status_code,
            "upload": upload(c, "acme/after", run.prefixes.native(seed=7), acme).status_code,
            "list": c.get("/v1/prefixes", headers=auth(acme)).status_code,
        }
        # Recovery drops the device cache once the change feed is back: wait for that before warming again.
        started_feed = time.monotonic()
        while "again after" not in server.log()[len(log_before) :].replace("answers again after", "") and (
            time.monotonic() - started_feed < 15
        ):
            time.sleep(0.2)
        time.sleep(1.0)
        answers_again = server.log()[len(log_before) :].count("answers again after")
        bad = [p for p in paused if not p["ok"]]
        ok = (
            not bad
            and unreachable_lines == 1
            and recovered_s < 20
            and all(s in (200, 201) for s in after.values())
        )
        report("2", "Redis paused (SIGSTOP)", ok,
               f"{len(paused) - len(bad)}/{len(paused)} answers as documented within {bound:.0f} s (slowest "
               f"{max(p['s'] for p in paused):.2f} s; public resident served "
               f"{sum(p['status'] == 200 for p in paused if 'pub/shared (resident' in p['check'])}/5); "
               f"'is unreachable' logged {unreachable_lines}x; SIGCONT -> /readyz 200 in {recovered_s:.1f} s, "
               f"after: {after}, 'answers again' logged {answers_again}x",
               wrong=bad, checks=paused)  # fmt: skip

        # The same with Redis killed (connections refused), then restarted on its port from its AOF.
        warm()
        log_before = server.log()
        run.redis.kill()
        killed = outage_checks("acme/cold2")
        run.redis.start()
        started = time.monotonic()
        while c.get("/readyz").status_code != 200 and time.monotonic() - started < 20:
            time.sleep(0.1)
        recovered_s = time.monotonic() - started
        survived = c.get("/v1/prefixes/acme/after", headers=auth(acme)).status_code
        own_after = generate(c, acme, "acme/own").status_code
        bad = [p for p in killed if not p["ok"]]
        ok = not bad and recovered_s < 20 and survived == 200 and own_after == 200
        report("2", "Redis killed (SIGKILL) and restarted", ok,
               f"{len(killed) - len(bad)}/{len(killed)} answers as documented (slowest "
               f"{max(p['s'] for p in killed):.2f} s; public resident served "
               f"{sum(p['status'] == 200 for p in killed if 'pub/shared (resident' in p['check'])}/5); restarted -> "
               f"/readyz 200 in {recovered_s:.1f} s; upload acked before the kill: GET {survived}; generate {own_after}",
               wrong=bad, checks=killed)  # fmt: skip


# -- 3: huge prompts -----------------------------------------------------------------------------------


def probe_huge_prompts(run: Run) -> None:
    server = run.a
    heavy, light = run.key(server, "heavy"), run.key(server, "light")
    with client(server, timeout=120) as c:
        upload(c, "heavy/p", run.prefixes.native(seed=8, template=DEMO_TEMPLATE), heavy).raise_for_status()
        upload(c, "light/p", run.prefixes.native(seed=9), light).raise_for_status()
        for _ in range(3):
            generate(c, light, "light/p").raise_for_status()
        alone = [timed(lambda: generate(c, light, "light/p"))[2] for _ in range(8)]
    huge = (PROMPT + " | ") * (1_000_000 // (len(PROMPT) + 3) + 1)
    huge = huge[:1_000_000]
    rss_before = server.proc_status()
    steps_before, cpu_before = metrics(server), cpu_seconds(server.pid)
    done = threading.Event()
    peak = [rss_before["VmRSS"]]

    def sample_rss() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.proc_status()["VmRSS"])
            time.sleep(0.05)

    def one_heavy(_: int) -> list[tuple[int, str | None, float]]:
        """One of six clients re-sending a 1 MB prompt for HEAVY_SECONDS (at least once)."""
        out = []
        with client(server, timeout=120) as hc:
            started = time.monotonic()
            while not out or time.monotonic() - started < HEAVY_SECONDS:
                out.append(timed(lambda: generate(hc, heavy, "heavy/p", tokens=4, prompt=huge)))
        return out

    during: list[float] = []

    def light_loop() -> None:
        with client(server, timeout=120) as lc:
            while not done.is_set() or len(during) < 5:
                status, _, seconds = timed(lambda: generate(lc, light, "light/p"))
                if status == 200:
                    during.append(seconds)

    sampler, lighter = threading.Thread(target=sample_rss), threading.Thread(target=light_loop)
    sampler.start()
    lighter.start()
    time.sleep(0.1)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        heavies = [answer for answers in pool.map(one_heavy, range(6)) for answer in answers]
    done.set()
    steps_after, cpu_heavy = metrics(server), cpu_seconds(server.pid) - cpu_before
    lighter.join(120)
    sampler.join(10)
    time.sleep(3)
    rss_after = server.proc_status()
    with client(server, timeout=120) as c:
        other_paths = {
            "completions": timed(lambda: c.post("/v1/completions", headers=auth(heavy),
                                                json={"model": "heavy/p", "prompt": huge, "max_tokens": 2})),
            "chat": timed(lambda: c.post("/v1/chat/completions", headers=auth(heavy), json={
                "model": "heavy/p", "messages": [{"role": "user", "content": huge}], "max_tokens": 2})),
            "tokenize": timed(lambda: c.post("/tokenize", headers=auth(heavy), json={"prompt": huge})),
            "prompt list x 16 (completions)": timed(lambda: c.post("/v1/completions", headers=auth(heavy),
                                                json={"model": "heavy/p", "prompt": [huge[:60000]] * 16, "max_tokens": 2})),
        }  # fmt: skip
        templates = {
            "{source} twice": upload(
                c, "heavy/t2", run.prefixes.native(seed=10, template="{source} {source}"), heavy
            ),
            "{source} x 20": upload(
                c, "heavy/t20", run.prefixes.native(seed=10, template="{source}" * 20), heavy
            ),
            "no {source}": upload(c, "heavy/t0", run.prefixes.native(seed=10, template="plain"), heavy),
        }
        started = time.monotonic()
        big_template = upload(
            c, "heavy/tbig", run.prefixes.native(seed=10, template="word " * 200_000 + "{source}"), heavy
        )
        big_template_s = time.monotonic() - started
    heavy_codes = sorted({(s, code) for s, code, _ in heavies}, key=str)
    light_alone, light_during = statistics.median(alone), max(during)
    growth_mb = (rss_after["VmRSS"] - rss_before["VmRSS"]) / 1024
    # The issue saw 13 s; the bar here is half a second over alone, on a loaded 2-core CPU. The facts say how
    # many engine steps the extra wait is worth.
    light_ok = light_during <= light_alone + 0.5
    steps = steps_after.get("prefixserve_engine_steps_total", 0) - steps_before.get(
        "prefixserve_engine_steps_total", 0
    )
    step_s = steps_after.get("prefixserve_engine_step_seconds_total", 0) - steps_before.get(
        "prefixserve_engine_step_seconds_total", 0
    )
    mean_step_ms = step_s / steps * 1e3 if steps else float("nan")
    ok = (heavy_codes == [(422, "prompt_too_long")] and light_ok and growth_mb < 150
          and all(r.status_code == 422 for r in templates.values()) and big_template.status_code == 422
          and all(s == 422 for s, _, _ in other_paths.values()))  # fmt: skip
    report("3", "six 1,000,000-character prompts vs another tenant", ok,
           f"{len(heavies)} heavy prompts over {HEAVY_SECONDS:g} s from 6 clients: {heavy_codes}, each in "
           f"{max(s for _, _, s in heavies):.2f} s max, server CPU {cpu_heavy / len(heavies) * 1e3:.1f} ms each; "
           f"light 2-token alone median {light_alone * 1e3:.0f} ms, during median "
           f"{statistics.median(during) * 1e3:.0f} / max {light_during * 1e3:.0f} ms (n={len(during)}; mean engine "
           f"step meanwhile {mean_step_ms:.1f} ms); RSS {rss_before['VmRSS'] / 1024:.0f} -> "
           f"peak {peak[0] / 1024:.0f} -> {rss_after['VmRSS'] / 1024:.0f} MB 3 s after; other paths "
           f"{ {k: (v[0], v[1]) for k, v in other_paths.items()} }; templates "
           f"{ {k: (r.status_code, error_code(r)) for k, r in templates.items()} }; 1 MB template "
           f"{big_template.status_code} {error_code(big_template)} in {big_template_s:.2f} s",
           light_alone_ms=[round(x * 1e3) for x in alone], light_during_ms=[round(x * 1e3) for x in during],
           other_paths_s={k: round(v[2], 2) for k, v in other_paths.items()}, loadavg=os.getloadavg())  # fmt: skip


# -- 4: the admin's publish racing the tenant's own write ----------------------------------------------


def probe_publish_race(run: Run, server: Server, trials: int) -> None:
    alpha = run.key(server, "alpha")
    content_a, content_b = run.prefixes.native(seed=11), run.prefixes.native(seed=12)
    sha_a = hashlib.sha256(content_a).hexdigest()
    outcomes: dict[str, int] = {}
    bad: list[dict[str, Any]] = []
    delete_bad: list[dict[str, Any]] = []
    with client(server) as admin_c, client(server) as tenant_c:

        def race(prefix_id: str, tenant_action: Callable[[], httpx.Response]) -> tuple[int, int]:
            barrier = threading.Barrier(2)
            statuses = [0, 0]

            def admin() -> None:
                barrier.wait()
                statuses[0] = upload(admin_c, prefix_id, content_a, public=True).status_code

            def tenant() -> None:
                barrier.wait()
                statuses[1] = tenant_action().status_code

            threads = [threading.Thread(target=admin), threading.Thread(target=tenant)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            return statuses[0], statuses[1]

        for i in range(trials):
            prefix_id = f"alpha/vis{i}"
            admin_status, tenant_status = race(
                prefix_id, lambda p=prefix_id: upload(tenant_c, p, content_b, alpha)
            )
            meta = admin_c.get(f"/v1/prefixes/{prefix_id}", headers=ADMIN).json()
            final = (
                "public A"
                if meta.get("public") and meta.get("sha256") == sha_a
                else (
                    f"{'public' if meta.get('public') else 'private'} {'A' if meta.get('sha256') == sha_a else 'B'}"
                )
            )
            key = f"admin {admin_status} / tenant {tenant_status} -> {final}"
            outcomes[key] = outcomes.get(key, 0) + 1
            if final != "public A" or admin_status not in (200, 201) or tenant_status not in (200, 201, 403):
                bad.append({"id": prefix_id, "outcome": key})
        for i in range(
            trials // 2
        ):  # the tenant deleting its own private prefix while the admin publishes it
            prefix_id = f"alpha/del{i}"
            upload(tenant_c, prefix_id, content_b, alpha).raise_for_status()
            admin_status, tenant_status = race(
                prefix_id, lambda p=prefix_id: tenant_c.delete(f"/v1/prefixes/{p}", headers=auth(alpha))
            )
            meta = admin_c.get(f"/v1/prefixes/{prefix_id}", headers=ADMIN)
            ok = meta.status_code == 200 and meta.json()["public"] and meta.json()["sha256"] == sha_a
            if not ok or tenant_status not in (204, 403):
                delete_bad.append({"id": prefix_id, "admin": admin_status, "tenant": tenant_status,
                                   "final": meta.status_code})  # fmt: skip
    store = "embedded" if server.name == "A" else "redis"
    report("4", f"publish vs tenant PUT/DELETE, {store} store", not bad and not delete_bad,
           f"{trials} PUT races + {trials // 2} DELETE races: {len(bad) + len(delete_bad)} ended other than public "
           f"with the admin's content; outcomes {outcomes}",
           bad=bad[:10], delete_bad=delete_bad[:10])  # fmt: skip


# -- 5: a tenant named admin ---------------------------------------------------------------------------


def probe_admin_tenant(run: Run) -> None:
    server = run.a
    tenant_key = run.key(server, "admin")
    with client(server) as c:
        c.put("/v1/tenants/admin", json={"max_concurrent": 1}, headers=ADMIN).raise_for_status()
        upload(c, "admin/p", run.prefixes.native(seed=13), tenant_key).raise_for_status()
        before = metrics(server)

        def admin_load(_: int) -> int:
            with client(server) as ac:
                return generate(ac, ADMIN_KEY, None, tokens=150, prompt="hello").status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(admin_load, i) for i in range(4)]
            time.sleep(0.3)
            usage = c.get("/v1/tenants/admin", headers=ADMIN).json().get("usage", {})
            tenant_status, tenant_code, _ = timed(lambda: generate(c, tenant_key, "admin/p"))
            admin_statuses = [f.result() for f in futures]

        def tenant_burst(_: int) -> int:
            with client(server) as tc:
                return generate(tc, tenant_key, "admin/p", tokens=60).status_code

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            burst = list(pool.map(tenant_burst, range(3)))
        after = metrics(server)
    delta = {label: after.get(f'prefixserve_tenant_requests_total{{tenant="{label}"}}', 0)
             - before.get(f'prefixserve_tenant_requests_total{{tenant="{label}"}}', 0) for label in ("_admin", "admin")}  # fmt: skip
    tenant_served = (tenant_status == 200) + burst.count(200)
    ok = (tenant_status == 200 and usage.get("running", 0) <= 1 and 429 in burst
          and delta["_admin"] >= 4 and delta["admin"] == tenant_served)  # fmt: skip
    report("5", "tenant named admin vs the admin key", ok,
           f"max_concurrent 1 on tenant admin; admin key's 4 concurrent generations {admin_statuses}; tenant admin's "
           f"request meanwhile {tenant_status} {tenant_code or ''}; its usage then {usage}; its own burst of 3 "
           f"{burst} (quota live); metric deltas {delta}")  # fmt: skip


# -- 6: clients vanishing mid-upload -------------------------------------------------------------------


def probe_disconnects(run: Run) -> None:
    server = run.a
    acme = run.key(server, "acme")
    headers = {**auth(acme), "Content-Type": "application/json"}
    upload_data = run.prefixes.native(seed=14, length=40)
    short = json.dumps({"prefix": None, "prompt": PROMPT, "max_new_tokens": 4}).encode()
    long = {"prefix": None, "prompt": "hello", "max_new_tokens": 200, "ignore_eos": True}

    def cut(request: bytes, keep: int | None = None, wait: float = 0.0, first_event: bool = False) -> None:
        """Send `request` (only its first `keep` bytes), wait or read the first SSE event, then vanish."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(request if keep is None else request[:keep])
            if first_event:
                answer = b""
                while b"data:" not in answer and (chunk := s.recv(4096)):
                    answer += chunk
            time.sleep(wait)

    def with_length(request: bytes, length: int) -> bytes:
        return request.replace(b"Content-Length: 0", f"Content-Length: {length}".encode())

    upload_head = raw_request(
        "PUT", "/v1/prefixes/acme/gone", {**auth(acme), "Content-Type": "application/octet-stream"}
    )
    kinds: dict[str, Callable[[], None]] = {
        "upload mid-body": lambda: cut(with_length(upload_head, len(upload_data)) + upload_data[: len(upload_data) // 2]),
        "generate mid-body": lambda: cut(with_length(raw_request("POST", "/v1/generate", headers), len(short)) + short[:20]),
        "generate while waiting": lambda: cut(
            raw_request("POST", "/v1/generate", headers, json.dumps(long).encode()), wait=0.3),
        "stream after its first event": lambda: cut(
            raw_request("POST", "/v1/generate", headers, json.dumps({**long, "stream": True}).encode()), first_event=True),
        "completions while waiting": lambda: cut(raw_request("POST", "/v1/completions", headers, json.dumps(
            {"model": run.model.name, "prompt": "hello", "max_tokens": 200, "ignore_eos": True}).encode()), wait=0.3),
    }  # fmt: skip
    per_kind, bad = {}, False
    for kind, action in kinds.items():
        before, log_before = metrics(server), server.log()
        for _ in range(3):
            action()
            time.sleep(0.2)
        time.sleep(1.0)
        after = metrics(server)
        new_lines = [line for line in server.log()[len(log_before) :].splitlines() if "/metrics" not in line]
        delta = {k: v - requests_by_status(before).get(k, 0) for k, v in requests_by_status(after).items()}
        delta = {k: int(v) for k, v in delta.items() if v}
        facts = {"statuses": delta, "log_lines": len(new_lines), "tracebacks": sum("Traceback" in x for x in new_lines),
                 "errors": sum(" ERROR " in x for x in new_lines), "running_after": after.get("prefixserve_running_requests"),
                 "lines": new_lines[:3]}  # fmt: skip
        per_kind[kind] = facts
        bad |= any(k.startswith("5") for k in delta) or facts["tracebacks"] > 0 or facts["errors"] > 0
        # One line each; a stream was answered 200 before it went, so it has its access line and its
        # generation line (finish reason abort).
        bad |= facts["running_after"] != 0 or facts["log_lines"] != (6 if kind.startswith("stream") else 3)
    gone = httpx.get(f"{server.url}/v1/prefixes/acme/gone", headers=auth(acme)).status_code
    report("6", "clients vanishing mid-upload / mid-body / while waiting (3 each)", not bad and gone == 404,
           "; ".join(f"{k}: {v['statuses']}, {v['log_lines']} log lines, {v['tracebacks']} tracebacks, "
                     f"running after {v['running_after']:.0f}" for k, v in per_kind.items())
           + f"; half-sent upload stored: {gone != 404}",
           per_kind=per_kind)  # fmt: skip


# -- 7: a body at 1 byte/s -----------------------------------------------------------------------------


def start_default_slow_body(run: Run) -> None:
    """One upload at 1 byte/s against server B (default --body-timeout 60), left running in the background."""
    server = run.b
    key = run.key(server, "slowpoke")

    def go() -> None:
        run.background["slow_b"] = slow_body(server.port, "/v1/prefixes/slowpoke/p", key, 100_000, limit=90)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    run.background["slow_b_thread"] = thread


def probe_slow_body(run: Run) -> None:
    server = run.a
    acme = run.key(server, "acme")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(slow_body, server.port, f"/v1/prefixes/acme/slow{i}", acme, 123_312, 30)
            for i in range(8)
        ]
        time.sleep(1.0)
        with client(server) as c:
            meanwhile = timed(lambda: generate(c, acme, None))
        results = [f.result() for f in futures]
    cut = [r["after_s"] for r in results]
    ok = all(
        r["status"] == 408 and r["code"] == "body_timeout" and r["after_s"] <= BODY_TIMEOUT_A + 2.5
        for r in results
    )
    report("7", f"8 uploads at 1 byte/s, --body-timeout {BODY_TIMEOUT_A:g}", ok and meanwhile[0] == 200,
           f"answers {sorted({(r['status'], r['code'], r['how']) for r in results}, key=str)} after "
           f"{min(cut):.1f}-{max(cut):.1f} s; a generation meanwhile {meanwhile[0]} in {meanwhile[2] * 1e3:.0f} ms",
           results=results)  # fmt: skip


def report_default_slow_body(run: Run) -> None:
    thread = run.background.get("slow_b_thread")
    if thread is None:
        return
    thread.join(100)
    result = run.background.get("slow_b", {})
    ok = result.get("status") == 408 and 57 <= result.get("after_s", 0) <= 65
    report("7", "1 byte/s upload, default --body-timeout 60 (server B)", ok,
           f"{result.get('status')} {result.get('code')} ({result.get('how')}) after {result.get('after_s')} s, "
           f"{result.get('bytes_sent')} bytes sent")  # fmt: skip


# -- 8: wrong JSON types -------------------------------------------------------------------------------

BASE_GENERATE = {"prefix": None, "prompt": "hello", "max_new_tokens": 2}
BASE_COMPLETIONS = {"prompt": "hello", "max_tokens": 2}


def probe_strict_types(run: Run) -> None:
    server = run.a
    acme = run.key(server, "acme")
    backbone = run.model.name
    cases: list[tuple[str, str, Any]] = [
        *[
            ("/v1/generate", f"{k}={json.dumps(v)}", {**BASE_GENERATE, k: v})
            for k, v in [
                ("max_new_tokens", True),
                ("max_new_tokens", "4"),
                ("max_new_tokens", 4.5),
                ("ignore_eos", "yes"),
                ("ignore_eos", 1),
                ("stream", "true"),
                ("temperature", "0"),
                ("temperature", True),
                ("prompt", 5),
                ("prompt", None),
                ("prefix", 5),
                ("prefix", ["demo/e2e"]),
                ("seed", "1"),
                ("seed", 1.5),
                ("stop", [1]),
                ("top_k", True),
                ("top_p", "1"),
                ("num_beams", "2"),
                ("n", True),
                ("logprobs", "2"),
                ("max_new_tokens", 10**30),
                ("max_new_tokens", -1),
                ("max_new_tokens", 0),
                ("special_tokens", "yes"),
            ]
        ],
        *[
            ("/v1/completions", f"{k}={json.dumps(v)}", {**BASE_COMPLETIONS, "model": backbone, k: v})
            for k, v in [
                ("max_tokens", "16"),
                ("stream", "false"),
                ("n", True),
                ("temperature", "0"),
                ("echo", "yes"),
                ("logprobs", True),
                ("model", 5),
                ("prompt", {"a": 1}),
            ]
        ],
        *[
            (
                "/v1/chat/completions",
                f"{k}={json.dumps(v)}",
                {"model": backbone, "messages": [{"role": "user", "content": "hi"}], k: v},
            )
            for k, v in [("messages", "hi"), ("max_completion_tokens", "5"), ("stream", 1)]
        ],  # fmt: skip
        *[
            ("PUT /v1/tenants/beta", f"{k}={json.dumps(v)}", {k: v})
            for k, v in [
                ("max_concurrent", "5"),
                ("weight", True),
                ("requests_per_minute", 1.5),
                ("tokens_per_minute", [1]),
            ]
        ],
        *[
            ("/v1/generate", label, raw)
            for label, raw in [
                ("body []", b"[]"),
                ('body "x"', b'"x"'),
                ("body 5", b"5"),
                ("body null", b"null"),
                ("temperature NaN", b'{"prompt": "hi", "temperature": NaN}'),
                ("top_p Infinity", b'{"prompt": "hi", "top_p": Infinity}'),
                ("max_new_tokens 1e400", b'{"prompt": "hi", "max_new_tokens": 1e400}'),
                ("invalid JSON", b'{"prompt": '),
                ("duplicate keys", b'{"prompt": 5, "prompt": "hi", "max_new_tokens": 1}'),
                ("nested 100,000 deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                ("utf-16 body", json.dumps({"prompt": "hi"}).encode("utf-16")),
                ("lone surrogate", b'{"prompt": "\\ud800"}'),
            ]
        ],
    ]
    results = []
    with client(server) as c:
        control = generate(c, acme, None).status_code
        for endpoint, label, body in cases:
            if endpoint.startswith("PUT"):
                response = c.put(endpoint.split()[1], json=body, headers=ADMIN)
            elif isinstance(body, bytes):
                response = c.post(
                    endpoint, content=body, headers={**auth(acme), "Content-Type": "application/json"}
                )
            else:
                response = c.post(endpoint, json=body, headers=auth(acme))
            results.append({"endpoint": endpoint, "case": label, "status": response.status_code,
                            "code": error_code(response)})  # fmt: skip
        no_type = c.post(
            "/v1/generate", content=json.dumps(BASE_GENERATE), headers={**auth(acme), "Content-Type": ""}
        )
    # A duplicate key (last wins, as JSON parsers do), a lone surrogate and a UTF-16 body (Python's json detects
    # the encoding) may be accepted; anything else is a 4xx.
    lenient = {"duplicate keys", "lone surrogate", "utf-16 body"}
    wrong = [r for r in results if r["case"] not in lenient and r["status"] not in (400, 422)]
    fivexx = [r for r in results if r["status"] >= 500]
    report("8", "wrong JSON types and shapes", control == 200 and not wrong and not fivexx,
           f"{len(results)} bodies: {sum(r['status'] == 422 for r in results)} x 422, "
           f"{sum(r['status'] == 400 for r in results)} x 400, others {[(r['case'], r['status']) for r in results if r['status'] not in (400, 422)]}; "
           f"JSON without Content-Type {no_type.status_code} {error_code(no_type)}; control 200: {control == 200}",
           wrong=wrong, results=results)  # fmt: skip


# -- 9: HEAD/OPTIONS/CORS, the openai package, null max_tokens, special tokens -------------------------


def probe_edges(run: Run) -> None:
    import openai

    server = run.a
    acme, beta = run.key(server, "acme"), run.key(server, "beta")
    checks: list[tuple[str, bool, str]] = []

    def check(label: str, ok: bool, got: Any) -> None:
        checks.append((label, ok, str(got)[:200]))

    with client(server) as c:
        upload(
            c, "acme/e2e", (ROOT / "models/demo-prefixes/e2e.safetensors").read_bytes(), acme
        ).raise_for_status()
        upload(c, "beta/secret", run.prefixes.native(seed=15), beta).raise_for_status()
        for path, key in [("/healthz", None), ("/readyz", None), ("/v1/models", acme), ("/version", None),
                          ("/v1/prefixes/acme/e2e", acme), ("/metrics", ADMIN_KEY)]:  # fmt: skip
            r = c.head(path, headers=auth(key))
            check(f"HEAD {path}", r.status_code == 200 and r.content == b"", (r.status_code, len(r.content)))
        r = c.options("/v1/prefixes/acme/e2e", headers=auth(acme))
        allow = {m.strip() for m in r.headers.get("allow", "").split(",")}
        check("OPTIONS prefix URL", r.status_code == 200 and allow == {"DELETE", "GET", "HEAD", "OPTIONS", "PUT"},
              (r.status_code, r.headers.get("allow")))  # fmt: skip
        r = c.post("/healthz")
        check("POST /healthz -> 405 with Allow", r.status_code == 405 and "GET" in r.headers.get("allow", ""),
              (r.status_code, r.headers.get("allow")))  # fmt: skip
        r = c.options("/no/such/path")
        check("OPTIONS unknown path -> 404", r.status_code == 404, r.status_code)
        preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
        r = c.options("/v1/generate", headers=preflight)
        check("CORS preflight, allowed origin", r.status_code in (200, 204)
              and r.headers.get("access-control-allow-origin") == CORS_ORIGIN, (r.status_code, dict(r.headers)))  # fmt: skip
        r = c.options("/v1/generate", headers={**preflight, "Origin": "https://evil.example"})
        check("CORS preflight, other origin -> 400 cors_refused", r.status_code == 400 and error_code(r) == "cors_refused"
              and "access-control-allow-origin" not in r.headers, (r.status_code, error_code(r)))  # fmt: skip
        r = c.options("/v1/generate", headers={**preflight, "Access-Control-Request-Headers": "x-evil"})
        check("CORS preflight, unlisted header -> 400", r.status_code == 400, (r.status_code, error_code(r)))
        r = c.get("/v1/models", headers={**auth(acme), "Origin": CORS_ORIGIN})
        exposed = r.headers.get("access-control-expose-headers", "").lower()
        check("CORS simple GET, allowed origin", r.headers.get("access-control-allow-origin") == CORS_ORIGIN
              and "x-request-id" in exposed, dict(r.headers))  # fmt: skip
        r = c.get("/v1/models", headers={**auth(acme), "Origin": "https://evil.example"})
        check(
            "CORS simple GET, other origin: no ACAO",
            "access-control-allow-origin" not in r.headers,
            dict(r.headers),
        )
        r = c.post(
            "/v1/completions",
            json={"model": "acme/e2e", "prompt": PROMPT, "max_tokens": None},
            headers=auth(acme),
        )
        check("max_tokens null (httpx) -> 200, <= 16 tokens", r.status_code == 200
              and r.json()["usage"]["completion_tokens"] <= 16, (r.status_code, r.text[:150]))  # fmt: skip
        bare = [
            generate(c, acme, None, tokens=1, prompt="<|endoftext|>", ignore_eos=False).json(),
            generate(
                c, acme, None, tokens=1, prompt="<|endoftext|>", ignore_eos=False, special_tokens=True
            ).json(),
        ]
        plain_tokens, special_tokens = (b.get("usage", {}).get("prompt_tokens") for b in bare)
        check(
            "'<|endoftext|>' in a prompt is text (> 1 token; 1 with special_tokens)",
            plain_tokens is not None and plain_tokens > 1 and special_tokens == 1,
            (plain_tokens, special_tokens),
        )
        tokenized = c.post("/tokenize", json={"prompt": "<|endoftext|>"}, headers=auth(acme)).json()
        chat = c.post(
            "/v1/chat/completions",
            headers=auth(acme),
            json={
                "model": "acme/e2e",
                "messages": [{"role": "user", "content": "x <|endoftext|> y"}],
                "max_tokens": 1,
            },
        )
        chat_plain = c.post(
            "/v1/completions",
            headers=auth(acme),
            json={"model": "acme/e2e", "prompt": "x <|endoftext|> y", "max_tokens": 1},
        )
        same_prompt = chat.json().get("usage", {}).get("prompt_tokens") == chat_plain.json().get(
            "usage", {}
        ).get("prompt_tokens")
        check("chat on a template prefix counts '<|endoftext|>' as text, like completions", same_prompt,
              (chat.json().get("usage"), chat_plain.json().get("usage")))  # fmt: skip
        # Another tenant's private prefix and a missing one: the same answer, and timing (µs) compared.
        existing, missing = [], []
        bodies = set()
        for _ in range(120):
            for prefix, into in (("beta/secret", existing), ("beta/missing", missing)):
                started = time.perf_counter()
                r = generate(c, acme, prefix)
                into.append(time.perf_counter() - started)
                bodies.add((r.status_code, json.dumps(r.json().get("error"), sort_keys=True).replace("secret", "NAME")
                            .replace("missing", "NAME")))  # fmt: skip
    o = openai.OpenAI(base_url=f"{server.url}/v1", api_key=acme, max_retries=0, timeout=30)
    card = o.models.retrieve("acme/e2e")
    check("openai models.retrieve('acme/e2e')", card.id == "acme/e2e", card)
    not_found = []
    for model in ("beta/secret", "beta/missing"):
        try:
            o.models.retrieve(model)
            not_found.append("found")
        except openai.NotFoundError as exc:
            not_found.append(
                json.dumps(exc.body, sort_keys=True).replace("secret", "NAME").replace("missing", "NAME")
            )
    check(
        "openai retrieve of another tenant's vs missing: same 404",
        not_found[0] == not_found[1] != "found",
        not_found,
    )
    out = o.completions.create(model="acme/e2e", prompt=PROMPT, max_tokens=None, temperature=0)
    check(
        "openai completions max_tokens=None",
        out.usage is not None and out.usage.completion_tokens <= 16,
        out.usage,
    )
    chat_out = o.chat.completions.create(model="acme/e2e", messages=[{"role": "user", "content": PROMPT}],
                                         max_tokens=None, temperature=0)  # fmt: skip
    check(
        "openai chat max_tokens=None", chat_out.choices[0].finish_reason in ("stop", "length"), chat_out.usage
    )
    bad = [c for c in checks if not c[1]]
    gap_us = (statistics.median(existing) - statistics.median(missing)) * 1e6
    report("9", "HEAD/OPTIONS/CORS, openai package, max_tokens null, '<|endoftext|>'", not bad,
           f"{len(checks) - len(bad)}/{len(checks)} edge checks as documented"
           + (f"; wrong: {[(c[0], c[2]) for c in bad]}" if bad else ""),
           checks=checks)  # fmt: skip
    report("9", "another tenant's existing vs missing prefix (timing)", len(bodies) == 1 and abs(gap_us) < 1000,
           f"{len(bodies)} distinct answer bodies; median {statistics.median(existing) * 1e3:.2f} vs "
           f"{statistics.median(missing) * 1e3:.2f} ms, difference {gap_us:+.0f} us over 120 pairs (loopback jitter: "
           f"IQR {(statistics.quantiles(missing, n=4)[2] - statistics.quantiles(missing, n=4)[0]) * 1e6:.0f} us); "
           f"/tokenize '<|endoftext|>' -> {tokenized.get('tokens')} (vLLM's: specials parsed)",
           bodies=sorted(bodies))  # fmt: skip


# -- 10: the flood -------------------------------------------------------------------------------------


def probe_flood(run: Run) -> None:
    from bench import request_cost

    for other in (run._a, run._b):  # the flood's server runs alone
        if other is not None:
            other.stop()
    server = Server("C", run.model, str(run.workdir / "store-c"), run.workdir,
                    ["--max-num-seqs", "4", "--max-queue", "8"])  # fmt: skip
    server.launch()
    try:
        server.wait_ready()
        keys = {}
        with client(server) as c:
            data = run.prefixes.native(seed=16, length=10)
            for tenant in ("light", "flood", "capped"):
                keys[tenant] = new_key(c, tenant)
                upload(c, f"{tenant}/p", data).raise_for_status()
            c.put("/v1/tenants/capped", json={"requests_per_minute": 1}, headers=ADMIN).raise_for_status()
            generate(c, keys["capped"], "capped/p").raise_for_status()
        args = argparse.Namespace(flooders=96, new_tokens=48, light_requests=6, flood_warmup=2.0)
        rounds = []
        cpu_before = cpu_seconds(server.pid)
        for _ in range(run.args.flood_rounds):
            load = os.getloadavg()[0]
            result = request_cost.flood_round(server.port, keys, args)
            after = asyncio.run(request_cost.light_latencies(server.port, keys["light"], 6, args.new_tokens))
            result["light_alone_after_ms"] = statistics.mean(after) * 1e3  # the machine's drift meanwhile
            result["loadavg_1m"] = load
            rounds.append(result)
            print("      flood round " + json.dumps({k: round(v, 2) for k, v in result.items()}), flush=True)
        cpu = cpu_seconds(server.pid) - cpu_before
        fivexx = count_5xx(metrics(server))
        loadavg = os.getloadavg()
    finally:
        server.stop()
    ratios = [r["ratio"] for r in rounds]
    ratio = statistics.median(ratios)
    report("10", "flood: 96 clients vs light 6 x 48 tokens, 4 slots", ratio <= 2.0 and fivexx == 0,
           f"light alone {statistics.median(r['light_alone_ms'] for r in rounds):.0f} ms, under the flood "
           f"{statistics.median(r['light_under_flood_ms'] for r in rounds):.0f} ms (alone again after: "
           f"{statistics.median(r['light_alone_after_ms'] for r in rounds):.0f} ms): ratio {ratio:.2f}x "
           f"(rounds {[round(x, 2) for x in ratios]}; aim <= 2x); flood served/refused "
           f"{[(int(r['flood_served']), int(r['flood_refused'])) for r in rounds]}; under a refused-only flood "
           f"{[round(r['refused_flood_ratio'], 2) for r in rounds]}x; load average {rounds[0]['loadavg_1m']:.2f} at start, "
           f"{loadavg[0]:.2f} at end (2 cores); server CPU {cpu:.1f} s",
           rounds=rounds)  # fmt: skip


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- new probes ----------------------------------------------------------------------------------------


def probe_path_traversal(run: Run) -> None:
    server = run.a
    acme = run.key(server, "acme")
    data = run.prefixes.native(seed=17)
    paths = ["/v1/prefixes/../x", "/v1/prefixes/acme/..", "/v1/prefixes/acme/%2e%2e", "/v1/prefixes/%2e%2e/x",
             "/v1/prefixes/acme/..%2f..%2fescape", "/v1/prefixes/acme/%2e%2e%2f%2e%2e%2fescape", "/v1/prefixes/acme/.hidden",
             "/v1/prefixes/acme/-lead", "/v1/prefixes/acme/" + "x" * 65, "/v1/prefixes/acme/caf%C3%A9",
             "/v1/prefixes/acme/a%00b", "/v1/prefixes/acme/a%2Fb", "/v1/prefixes/acme/x/y", "/v1/prefixes/acme/x%5Cy",
             "/v1/prefixes/acme/..%5c..%5cescape", "/v1/prefixes/acme/x.json", "/v1/prefixes/acme/x%20y",
             "/v1/prefixes//x", "/v1/prefixes/acme/"]  # fmt: skip
    before = {p.name for p in run.workdir.iterdir()}
    results = []
    for path in paths:
        for key in (acme, ADMIN_KEY):
            raw = raw_request("PUT", path, {**auth(key), "Content-Type": "application/octet-stream"}, data)
            status, answer, _ = raw_http(server.port, raw)
            results.append((path, "admin" if key == ADMIN_KEY else "acme", status))
    after = {p.name for p in run.workdir.iterdir()}
    store = run.workdir / "store-a"
    odd_files = [
        str(p.relative_to(store))
        for p in store.rglob("*")
        if ".." in p.name or "escape" in p.name or p.name.startswith(".")
    ]
    cursors = {}
    with client(server) as c:
        for label, cursor in [("garbage", "!!!"), ("not utf-8", base64.urlsafe_b64encode(b"\xff\xfe").decode()),
                              ("traversal", base64.urlsafe_b64encode(b"../../etc").decode()), ("512 chars", "A" * 512),
                              ("513 chars", "A" * 513)]:  # fmt: skip
            r = c.get("/v1/prefixes", params={"cursor": cursor}, headers=auth(acme))
            cursors[label] = r.status_code
    # x.json is a legal id ([A-Za-z0-9][A-Za-z0-9._-]*), so 2xx there is right; everything else must be a 4xx.
    wrong = [
        r for r in results if not (r[2] is not None and 400 <= r[2] < 500) and not r[0].endswith("/x.json")
    ]
    ok = (
        not wrong
        and after == before
        and not odd_files
        and all(400 <= s < 500 or s == 200 for s in cursors.values())
    )
    report("new", "path traversal and odd ids in prefix URLs", ok,
           f"{len(results)} PUTs of {len(paths)} paths as tenant and admin: statuses {sorted({str(r[2]) for r in results})}"
           f"{'; not 4xx: ' + str(wrong) if wrong else ''}; new entries beside the store: {sorted(after - before)}; "
           f"odd files in the store {odd_files}; hostile cursors {cursors}",
           results=results)  # fmt: skip


def probe_bad_uploads(run: Run) -> None:

    server = run.a
    acme = run.key(server, "acme")
    p = run.prefixes
    good_meta = {"format": "prefixserve", "format_version": "1", "model_type": "gpt2", "num_layers": str(p.layers),
                 "num_heads": str(p.heads), "head_dim": str(p.head_dim), "num_virtual_tokens": "2", "targets": "decoder"}  # fmt: skip
    shape = [p.layers, 2, p.heads, 2, p.head_dim]
    n = p.layers * 2 * p.heads * 2 * p.head_dim
    cases: dict[str, tuple[bytes, str]] = {
        "float64 (hand-written)": (safetensors_raw({"decoder": ("F64", shape, b"\0" * 8 * n)}, good_meta), "application/octet-stream"),
        "int32 (hand-written)": (safetensors_raw({"decoder": ("I32", shape, b"\0" * 4 * n)}, good_meta), "application/octet-stream"),
        "uint8 (hand-written)": (safetensors_raw({"decoder": ("U8", shape, b"\0" * n)}, good_meta), "application/octet-stream"),
        "wrong heads": (p.native(shape=(p.layers, 2, p.heads + 1, 2, p.head_dim)), "application/octet-stream"),
        "wrong layers": (p.native(shape=(p.layers + 1, 2, p.heads, 2, p.head_dim)), "application/octet-stream"),
        "4-d tensor (hand-written)": (
            safetensors_raw({"decoder": ("F32", shape[:3] + [2 * p.head_dim], b"\0" * 4 * n)}, good_meta),
            "application/octet-stream",
        ),
        "NaN": (p.native(fill=float("nan")), "application/octet-stream"),
        "Inf": (p.native(fill=float("inf")), "application/octet-stream"),
        "1e5 value": (p.native(fill=1e5), "application/octet-stream"),
        "300 virtual tokens": (p.native(length=300), "application/octet-stream"),
        "255 virtual tokens + template": (p.native(length=255, template=DEMO_TEMPLATE), "application/octet-stream"),
        "0 virtual tokens": (p.native(length=0), "application/octet-stream"),
        "truncated": (p.native()[:-100], "application/octet-stream"),
        "header length 2^62": ((2**62).to_bytes(8, "little") + b"{}", "application/octet-stream"),
        "header not JSON": ((10).to_bytes(8, "little") + b"not json!!", "application/octet-stream"),
        "offsets past the end": (safetensors_raw({"decoder": ("F32", shape, b"")}, good_meta), "application/octet-stream"),
        "pickle": (b"\x80\x04\x95" + b"\0" * 64, "application/octet-stream"),
        "empty body": (b"", "application/octet-stream"),
        "no metadata": (safetensors_raw({"decoder": ("F32", shape, b"\0" * 4 * n)}, {}), "application/octet-stream"),
        "model_type bart": (safetensors_raw({"decoder": ("F32", shape, b"\0" * 4 * n)}, {**good_meta, "model_type": "bart"}), "application/octet-stream"),
        "format_version 2": (safetensors_raw({"decoder": ("F32", shape, b"\0" * 4 * n)}, {**good_meta, "format_version": "2"}), "application/octet-stream"),
        "extra tensor": (safetensors_raw({"decoder": ("F32", shape, b"\0" * 4 * n), "evil": ("F32", [1], b"\0" * 4)}, good_meta), "application/octet-stream"),
        "metadata lies (P=5, tensor P=2)": (safetensors_raw({"decoder": ("F32", shape, b"\0" * 4 * n)}, {**good_meta, "num_virtual_tokens": "5"}), "application/octet-stream"),
        "text/plain": (p.native(), "text/plain"),
        "multipart missing config": (b"", "multipart"),
        "PEFT LoRA config": (b"", "multipart-lora"),
        "PEFT config not JSON": (b"", "multipart-badjson"),
    }  # fmt: skip
    results = {}
    with client(server) as c:
        for i, (label, (data, content_type)) in enumerate(cases.items()):
            prefix_id = f"acme/bad{i}"
            started = time.monotonic()
            if content_type.startswith("multipart"):
                files: dict[str, Any] = {"adapter_model": ("adapter_model.safetensors", p.native())}
                if content_type == "multipart-lora":
                    files["adapter_config"] = (
                        "adapter_config.json",
                        json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}),
                    )
                elif content_type == "multipart-badjson":
                    files["adapter_config"] = ("adapter_config.json", b"{not json")
                r = c.put(f"/v1/prefixes/{prefix_id}", files=files, headers=auth(acme))
            else:
                r = c.put(
                    f"/v1/prefixes/{prefix_id}",
                    content=data,
                    headers={**auth(acme), "Content-Type": content_type},
                )
            meta = c.get(f"/v1/prefixes/{prefix_id}", headers=auth(acme))
            results[label] = {"status": r.status_code, "code": error_code(r), "s": round(time.monotonic() - started, 2),
                              "stored": meta.status_code != 404}  # fmt: skip
            if meta.status_code == 200:  # accepted: what was stored, and does it serve?
                results[label]["num_virtual_tokens"] = meta.json()["num_virtual_tokens"]
                results[label]["generate"] = generate(c, acme, prefix_id).status_code
        # Over --max-body-bytes (64 MiB): the headers alone should be enough to refuse.
        raw = raw_request(
            "PUT", "/v1/prefixes/acme/huge", {**auth(acme), "Content-Type": "application/octet-stream"}
        )
        status, _, seconds = raw_http(
            server.port, raw.replace(b"Content-Length: 0", b"Content-Length: 70000000"), timeout=10
        )
        alive = c.get("/healthz").status_code
    # The file's own num_virtual_tokens is a claim: accepting it is fine when the tensor's length is what counts.
    lied = results["metadata lies (P=5, tensor P=2)"]
    if lied["stored"] and lied.get("num_virtual_tokens") == 2 and lied.get("generate") == 200:
        del results["metadata lies (P=5, tensor P=2)"]
        accepted_lie = "metadata num_virtual_tokens=5 over a P=2 tensor: stored as 2, serves"
    else:
        accepted_lie = ""
    wrong = {k: v for k, v in results.items() if not (400 <= v["status"] < 500) or v["stored"]}
    ok = not wrong and status == 413 and seconds < 5 and alive == 200
    report("new", "malformed uploads (dtype, shape, values, headers, PEFT)", ok,
           f"{len(results)} uploads: {sum(400 <= v['status'] < 500 for v in results.values())} refused 4xx, "
           f"none stored: {not any(v['stored'] for v in results.values())}, slowest {max(v['s'] for v in results.values()):.2f} s; "
           f"codes {sorted({str(v['code']) for v in results.values()})}; Content-Length 70 MB -> {status} in {seconds:.2f} s"
           + (f"; {accepted_lie}" if accepted_lie else "")
           + (f"; WRONG {wrong}" if wrong else ""),
           results=results)  # fmt: skip


def probe_headers(run: Run) -> None:
    server = run.a
    acme = run.key(server, "acme")
    body = json.dumps({"prompt": "hi", "max_new_tokens": 1}).encode()
    cases = {
        "64 KB header value": {"X-Junk": "a" * 65536},
        "1 MB header value": {"X-Junk": "a" * 1_000_000},
        "64 MB header value": {"X-Junk": "a" * (64 << 20)},
        "500 headers": {f"X-H{i}": "v" for i in range(500)},
        "latin-1 X-Request-Id": {"X-Request-Id": "caf\xe9-\xff"},
        "X-Request-Id with CRLF-ish and 300 chars": {"X-Request-Id": "id;<script>" + "z" * 300},
        "non-ASCII bearer key": {"Authorization": "Bearer cl\xe9\xff"},
        "10 KB bearer key": {"Authorization": "Bearer " + "k" * 10_000},
        "Basic auth": {"Authorization": "Basic YWRtaW46YWRtaW4="},
        "two Authorization headers": {"Authorization": f"Bearer {acme}", "authorization": "Bearer other"},
    }
    results = {}
    for label, headers in cases.items():
        if "Authorization" not in headers and "authorization" not in headers:
            headers = {**headers, **auth(acme)}
        raw = raw_request("POST", "/v1/generate", {**headers, "Content-Type": "application/json"}, body)
        status, answer, seconds = raw_http(server.port, raw)
        rid = re.search(rb"(?i)x-request-id: ([^\r\n]*)", answer)
        results[label] = {
            "status": status,
            "s": round(seconds, 2),
            "request_id": rid.group(1).decode("latin-1")[:40] if rid else None,
        }
    alive = httpx.get(f"{server.url}/healthz").status_code
    # A refusal may be a 4xx or a closed connection (status None); a 5xx or a dead server is wrong.
    wrong = {k: v for k, v in results.items() if v["status"] is not None and v["status"] >= 500}
    report("new", "huge, many and non-ASCII headers", not wrong and alive == 200,
           "; ".join(f"{k}: {v['status']}" for k, v in results.items()) + f"; server alive {alive == 200}",
           results=results)  # fmt: skip


def probe_header_limits(run: Run) -> None:
    """Headers that never end: how big and how slow may they be? (--body-timeout counts from the headers.)"""
    server = run.a
    rss_before = server.proc_status()["VmRSS"]
    sockets, cut = [], []
    for _ in range(8):  # eight connections, each 32 MB into a header that never ends
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 20))
        except OSError:  # the server refused the head (431) and closed the connection while it was sent
            answer = b""
            with contextlib.suppress(OSError):
                answer = s.recv(4096)
            cut.append(answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed")
        sockets.append(s)
    time.sleep(2.0)
    rss_held = server.proc_status()["VmRSS"]
    for s in sockets:
        s.close()
    time.sleep(1.0)
    rss_after = server.proc_status()
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=2)  # connects, never sends a byte
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=2)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started, how = time.monotonic(), "still open"
    limit = 3 * BODY_TIMEOUT_A
    with slow:
        slow.settimeout(1.0)
        while time.monotonic() - started < limit:
            try:
                if slow.recv(4096) == b"":
                    how = "closed"
                    break
                how = "answered"
                break
            except TimeoutError:
                pass
            try:
                slow.sendall(b"a")
            except OSError:
                how = "reset"
                break
    slow_s = time.monotonic() - started
    with idle:
        idle.setblocking(False)
        try:
            idle_state = "closed" if idle.recv(1) == b"" else "answered"
        except BlockingIOError:
            idle_state = "still open"
        except OSError:
            idle_state = "reset"
    alive = httpx.get(f"{server.url}/healthz").status_code
    held_mb = (rss_held - rss_before) / 1024
    report("new", "unfinished and slow request headers", held_mb < 64 and how != "still open" and alive == 200,
           f"8 connections each 32 MB into one header ({len(cut)} cut off: {sorted(set(cut))}): RSS "
           f"{rss_before / 1024:.0f} -> {rss_held / 1024:.0f} MB held "
           f"(+{held_mb:.0f}), {rss_after['VmRSS'] / 1024:.0f} MB after they closed (peak {rss_after['VmHWM'] / 1024:.0f}); "
           f"a header sent at 1 byte/s: {how} after {slow_s:.0f} s (--body-timeout {BODY_TIMEOUT_A:g} bounds the head from "
           f"its first byte); a connection that sends nothing: {idle_state} after {slow_s:.0f} s")  # fmt: skip


def probe_many_tenants(run: Run, count: int = 60) -> None:
    server = run.a
    with client(server) as c:
        keys = {f"t{i:03d}": new_key(c, f"t{i:03d}") for i in range(count)}
    data = {t: run.prefixes.native(seed=100 + i) for i, t in enumerate(keys)}

    def tenant_run(tenant: str) -> dict[str, Any]:
        with client(server, timeout=120) as tc:
            put = upload(tc, f"{tenant}/p", data[tenant], keys[tenant]).status_code
            gen = generate(tc, keys[tenant], f"{tenant}/p", tokens=8)
            other = f"t{(int(tenant[1:]) + 1) % count:03d}/p"
            peek = tc.get(f"/v1/prefixes/{other}", headers=auth(keys[tenant])).status_code
            use = generate(tc, keys[tenant], other).status_code
            return {"put": put, "gen": gen.status_code, "peek": peek, "use_other": use}

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(tenant_run, keys))
    seconds = time.monotonic() - started
    summary: dict[str, dict[int, int]] = {}
    for r in results:
        for k, v in r.items():
            summary.setdefault(k, {})
            summary[k][v] = summary[k].get(v, 0) + 1
    ok = summary == {
        "put": {201: count},
        "gen": {200: count},
        "peek": {404: count},
        "use_other": {404: count},
    }
    report(
        "new",
        f"{count} tenants at once (upload, generate, peek at a neighbour)",
        ok,
        f"{summary} in {seconds:.1f} s",
    )


def probe_log_and_5xx(run: Run, server: Server) -> None:
    m = metrics(server)
    log = server.log()
    errors = [line for line in log.splitlines() if " ERROR " in line or line.startswith("Traceback")]
    statuses = requests_by_status(m)
    expected_errors = [e for e in errors if "is unreachable" in e or "lost the change feed" in e]
    unexpected = [e for e in errors if e not in expected_errors]
    report("new", f"server {server.name}: 5xx answered and ERROR lines over the whole run",
           # B answers 503 store_unavailable during item 2's outage by design; nothing else may be a 5xx
           not [k for k in statuses if k.startswith("5") and not (k == "503" and server.name == "B")] and not unexpected,
           f"requests by status {dict(sorted(statuses.items()))}; {len(errors)} ERROR/Traceback lines "
           f"({len(expected_errors)} about the Redis outage)",
           unexpected=unexpected[:10])  # fmt: skip


def probe_drain_with_slow_client(run: Run) -> None:
    server = run.a
    acme = run.key(server, "acme")
    holder = threading.Thread(
        target=slow_body, args=(server.port, "/v1/prefixes/acme/drain", acme, 10_000, 20), daemon=True
    )
    holder.start()
    time.sleep(1.0)
    exit_s = server.stop(timeout=40)
    code = server.process.returncode if server.process else None
    report(
        "new",
        "SIGTERM while a client sends 1 byte/s (drain)",
        exit_s is not None and exit_s < 5 and code == 0,
        f"exit code {code} after {exit_s if exit_s is None else round(exit_s, 2)} s",
    )


# -- main ----------------------------------------------------------------------------------------------


PROBES: list[tuple[str, Callable[[Run], None]]] = [
    ("1", probe_listing),
    ("1", probe_copy),
    ("8", probe_strict_types),
    ("9", probe_edges),
    ("5", probe_admin_tenant),
    ("6", probe_disconnects),
    ("7", probe_slow_body),
    ("3", probe_huge_prompts),
    ("4", lambda run: probe_publish_race(run, run.a, run.args.race_trials)),
    ("4", lambda run: probe_publish_race(run, run.b, run.args.race_trials)),
    ("new", probe_path_traversal),
    ("new", probe_bad_uploads),
    ("new", probe_headers),
    ("new", probe_header_limits),
    ("new", probe_many_tenants),
    ("2", probe_redis_outage),
    ("7", report_default_slow_body),
    ("new", lambda run: [probe_log_and_5xx(run, s) for s in (run._a, run._b) if s is not None and s.process]),
    ("new", probe_drain_with_slow_client),
    ("10", probe_flood),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the findings as JSON here (default: print only)")
    parser.add_argument("--model", type=Path, default=ROOT / "models/demo-gpt2", help="backbone directory")
    parser.add_argument("--only", default="", help="comma-separated items to run (1..10, new); default all")
    parser.add_argument("--race-trials", type=int, default=50, help="publish races per store (item 4)")
    parser.add_argument("--flood-rounds", type=int, default=2, help="flood measurements (item 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (scripts/ensure-redis installs it)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="hostile-"))
    run = Run(workdir, args.model.resolve(), args)
    print(
        f"hostile run: {ROOT} at {git_head()}, work dir {workdir}, load average {os.getloadavg()}", flush=True
    )
    try:
        if not only or only & {"1", "2", "4", "7", "new"}:
            run.prestart()
            if not only or "7" in only:
                start_default_slow_body(run)
        for item, probe in PROBES:
            if only and item not in only:
                continue
            t0 = time.monotonic()
            count = len(FINDINGS)
            try:
                probe(run)
            except Exception as exc:  # a broken probe is a finding too, and the battery goes on
                report(item, getattr(probe, "__name__", "probe"), False, f"ERROR {type(exc).__name__}: {exc}"[:400],
                       traceback=traceback.format_exc()[-2000:])  # fmt: skip
                FINDINGS[-1].verdict = "ERROR"
            for finding in FINDINGS[count:]:
                finding.seconds = round(time.monotonic() - t0, 1)
    finally:
        run.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    print_table(total)
    if args.out:
        args.out.write_text(json.dumps({"commit": git_head(), "seconds": round(total, 1), "loadavg_end": os.getloadavg(),
                                        "findings": [f.__dict__ for f in FINDINGS]}, indent=1, default=str))  # fmt: skip
        print(f"wrote {args.out}")


def git_head() -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip()


def print_table(total: float) -> None:
    print(f"\n## Hostile battery: {sum(f.verdict == 'PASS' for f in FINDINGS)} PASS, "
          f"{sum(f.verdict == 'FAIL' for f in FINDINGS)} FAIL, {sum(f.verdict == 'ERROR' for f in FINDINGS)} ERROR, "
          f"{sum(f.verdict == 'INFO' for f in FINDINGS)} INFO in {total:.0f} s\n")  # fmt: skip
    print("| item | probe | verdict | s | facts |")
    print("|---|---|---|---|---|")
    for f in FINDINGS:
        cells = [f.item, f.probe, f.verdict, f"{f.seconds:g}", f.summary]
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # markdown-safe


if __name__ == "__main__":
    main()
