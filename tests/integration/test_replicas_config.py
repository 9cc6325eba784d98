"""Static checks of the deployment files (no Docker engine here): what the replica tests cannot run."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_two_replicas_on_one_durable_redis() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--appendfsync always" in redis_command
    for name in ("replica1", "replica2"):
        replica = services[name]
        assert replica["environment"]["PREFIXSERVE_STORE"] == "redis://redis:6379/0"
        assert (ROOT / replica["build"]["dockerfile"]).is_file()
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
    nginx_mount = services["nginx"]["volumes"][0]
    assert nginx_mount.startswith("./docker/nginx.conf:/etc/nginx/conf.d/")


def test_nginx_upstream_names_match_compose_services() -> None:
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    assert re.search(r"hash \$prefixserve_key consistent;", conf)
    assert re.findall(r"server (replica\d):8000", conf) == ["replica1", "replica2"]
    assert "proxy_next_upstream error timeout http_502 http_503;" in conf


def test_dockerfiles_pin_torch_and_start_prefix_serve() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        assert "torch==2.13.0" in text and 'CMD ["prefix-serve"]' in text
        for copied in re.findall(r"^COPY (?!--from=)(\S+)", text, flags=re.M):  # not copies between stages
            assert (ROOT / copied).exists(), f"{name} copies {copied}, which is not in the repository"
