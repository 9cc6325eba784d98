"""The container images and docker-compose.yml, built and run for real with podman and podman-compose.

scripts/images builds the CPU image and local stand-ins for the compose file's Redis and nginx images (the
first build takes minutes; afterwards the content-hash tag or podman's layer cache makes it seconds). The
topology test drives the compose project over HTTP as a user would: a prefix uploaded through nginx, generated
on, routed to one replica, surviving that replica's death, and found again after `down` and `up` (Redis' AOF on
the compose volume). Where podman cannot run, the tests fail and say why: they never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serving import ROOT, free_port

pytestmark = pytest.mark.slow

BUILD_TIMEOUT = 1800  # seconds; a first build from nothing (debootstrap, torch, dependencies) takes minutes
READY_TIMEOUT = 180  # seconds for both replicas to load the demo backbone and answer /readyz
ADMIN_KEY = "images-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PREFIX_ID = "acme/e2e"
PREFIX_FILE = ROOT / "models" / "demo-prefixes" / "e2e.safetensors"
GENERATE = {
    "prefix": PREFIX_ID,
    "prompt": "name : Blue Spice | Type : coffee shop | area : city centre",
    "max_new_tokens": 12,
}


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def podman_compose_command() -> list[str]:
    beside_python = Path(sys.executable).parent / "podman-compose"
    found = str(beside_python) if beside_python.exists() else shutil.which("podman-compose")
    if found is None:
        pytest.fail("podman-compose is not installed: `make .venv/.installed` installs it (dev extras)")
    return [found]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Build (or find up to date) the images; returns PREFIXSERVE_IMAGE, _REDIS_IMAGE, _NGINX_IMAGE."""
    try:
        result = subprocess.run(
            [str(ROOT / "scripts" / "images"), "--print-env"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            cwd=ROOT,
            env=podman_env(),
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"scripts/images did not finish within {BUILD_TIMEOUT} s:\n{error.stderr!s:.4000}")
    if result.returncode != 0:
        pytest.fail(
            "scripts/images failed: podman cannot build images here (it needs podman, runc and debootstrap, "
            f"installed as root when missing):\n{result.stderr[-6000:]}"
        )
    return dict(line.split("=", 1) for line in result.stdout.split())


def run_in_image(image: str, script: str) -> subprocess.CompletedProcess[str]:
    return podman("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script, timeout=120)


def test_cpu_image_runs_as_non_root_without_build_tools(images: dict[str, str]) -> None:
    image = images["PREFIXSERVE_IMAGE"]
    assert run_in_image(image, "id -u").stdout.strip() != "0"
    tools = "gcc cc c++ g++ make ld as pip pip3"
    found = run_in_image(image, f"for t in {tools}; do command -v $t || true; done").stdout.split()
    assert found == [], f"the image holds build tools: {found}"
    assert run_in_image(image, "ls /src 2>/dev/null || true").stdout == ""  # the build stage's sources
    versions = run_in_image(image, "python -c 'import torch, server; print(torch.__version__)'")
    assert versions.stdout.strip().startswith("2.13.0")


def test_cuda_image_builds() -> None:
    """docker/Dockerfile.cuda on the local Debian base (no GPU here: it is built and imported, not served)."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "images"), "--cuda", "--print-env"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=ROOT,
        env=podman_env(),
    )
    assert result.returncode == 0, result.stderr[-6000:]
    image = dict(line.split("=", 1) for line in result.stdout.split())["PREFIXSERVE_CUDA_IMAGE"]
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "prefixserve"
    checked = run_in_image(image, "python -c 'import server.cli, torch' && command -v prefix-serve")
    assert checked.stdout.strip() == "/opt/app/bin/prefix-serve"


@dataclass
class Topology:
    """One podman-compose project of docker-compose.yml, on its own name and host port."""

    images: dict[str, str]
    project: str = field(default_factory=lambda: f"prefixserve-it-{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)
    # every volume its containers used: the Redis volume and the replicas' anonymous /data (the image's VOLUME)
    volumes: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = podman_env() | self.images
        env |= {
            "PREFIXSERVE_ADMIN_KEY": ADMIN_KEY,
            "PREFIXSERVE_HTTP_PORT": str(self.port),
            "PREFIXSERVE_MODEL_DIR": str(ROOT / "models" / "demo-gpt2"),
        }
        if args[0] == "down":
            self.volumes |= self.used_volumes()
        compose_file = str(ROOT / "docker-compose.yml")
        command = [*podman_compose_command(), "-p", self.project, "-f", compose_file, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        if check:
            assert result.returncode == 0, f"podman-compose {args} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def containers(self) -> dict[str, dict]:
        """service name -> `podman ps` record, for this project's running containers."""
        labelled = f"label=io.podman.compose.project={self.project}"
        listing = podman("ps", "--filter", labelled, "--format", "json")
        return {c["Labels"]["com.docker.compose.service"]: c for c in json.loads(listing.stdout or "[]")}

    def used_volumes(self) -> set[str]:
        labelled = f"label=io.podman.compose.project={self.project}"
        ids = podman("ps", "-aq", "--filter", labelled).stdout.split()
        if not ids:
            return set()
        mounts = podman("inspect", "--format", "{{range .Mounts}}{{.Name}} {{end}}", *ids).stdout.split()
        return set(mounts)

    def replica_ready(self, service: str) -> bool:
        container = self.containers().get(service)
        if container is None:
            return False
        probe = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
        return podman("exec", container["Id"], "python", "-c", probe, check=False, timeout=30).returncode == 0

    def up(self) -> float:
        """Start the project; returns the seconds until both replicas and nginx answered."""
        started = time.monotonic()
        self.compose("up", "-d")
        both_ready = lambda: self.replica_ready("replica1") and self.replica_ready("replica2")  # noqa: E731
        wait_for(both_ready, READY_TIMEOUT, "both replicas ready")
        wait_for(lambda: _answers(f"{self.url}/readyz"), 30, "nginx")
        return time.monotonic() - started

    def logs(self) -> str:
        return self.compose("logs", timeout=60).stdout[-8000:]

    def clean_up(self) -> None:
        """Remove everything the project made: containers, pod, network, the Redis volume and anonymous ones."""
        with contextlib.suppress(subprocess.TimeoutExpired):  # what it leaves is removed below
            self.compose("down", "-v", timeout=180, check=False)
        labelled = f"label=io.podman.compose.project={self.project}"
        ids = podman("ps", "-aq", "--filter", labelled, check=False).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "0", *ids, check=False)
        podman("pod", "rm", "-f", f"pod_{self.project}", check=False)
        for volume in self.volumes | {f"{self.project}_redis-data"}:
            podman("volume", "rm", "-f", volume, check=False)
        podman("network", "rm", "-f", f"{self.project}_default", check=False)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def topology(images: dict[str, str]) -> Iterator[Topology]:
    topology = Topology(images)
    try:
        yield topology
    finally:
        topology.clean_up()
    assert topology.containers() == {}, "containers of the test project are left"
    left = set(podman("volume", "ls", "--format", "{{.Name}}").stdout.split())
    assert left.isdisjoint(topology.volumes | {f"{topology.project}_redis-data"}), "volumes are left"


def generate(topology: Topology) -> httpx.Response:
    response = httpx.post(
        f"{topology.url}/v1/generate", json=GENERATE, headers=ADMIN | {"X-Prefix-Id": PREFIX_ID}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response


def test_compose_topology_routes_fails_over_and_persists(topology: Topology) -> None:
    seconds_to_ready = topology.up()
    print(f"compose up: both replicas ready after {seconds_to_ready:.1f} s")
    try:
        uploaded = httpx.put(
            f"{topology.url}/v1/prefixes/{PREFIX_ID}",
            content=PREFIX_FILE.read_bytes(),
            headers=ADMIN | {"Content-Type": "application/octet-stream"},
            timeout=60,
        )
        assert uploaded.status_code == 201, uploaded.text
        owner = uploaded.headers["X-Prefixserve-Replica"]

        # One prefix, one replica: the upload (routed by path), its generations and reads (by X-Prefix-Id).
        first = generate(topology).json()
        assert first["prefix"] == PREFIX_ID and first["token_ids"]
        for _ in range(5):
            answer = generate(topology)
            assert answer.headers["X-Prefixserve-Replica"] == owner
            assert answer.json()["token_ids"] == first["token_ids"]
        shown = httpx.get(f"{topology.url}/v1/prefixes/{PREFIX_ID}", headers=ADMIN, timeout=30)
        assert shown.status_code == 200 and shown.headers["X-Prefixserve-Replica"] == owner

        # The owner's container dies: nginx sends its prefixes to the other replica, which reads Redis.
        owner_service = next(
            name for name, c in topology.containers().items() if c["Id"].startswith(owner.split(":")[0])
        )
        podman("kill", topology.containers()[owner_service]["Id"])
        for _ in range(3):
            answer = generate(topology)
            assert answer.headers["X-Prefixserve-Replica"] != owner
            assert answer.json()["token_ids"] == first["token_ids"]

        # down and up again: new containers, the same Redis volume, the prefix intact.
        topology.compose("down")
        assert topology.containers() == {}
        topology.up()
        again = httpx.get(f"{topology.url}/v1/prefixes/{PREFIX_ID}", headers=ADMIN, timeout=30)
        assert again.status_code == 200, again.text
        assert again.json()["sha256"] == uploaded.json()["sha256"]
        assert generate(topology).json()["token_ids"] == first["token_ids"]
    except AssertionError:
        print(topology.logs())
        raise
