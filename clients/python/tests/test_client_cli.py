"""prefixctl against a real prefix-serve process: every verb, output formats, exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from prefixserve_client.cli import main as prefixctl_main


def prefixctl_command() -> list[str]:
    script = Path(sys.executable).with_name("prefixctl")
    found = str(script) if script.exists() else shutil.which("prefixctl")
    return [found] if found else [sys.executable, "-m", "prefixserve_client.cli"]


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Completed:
    """prefixctl in this process (a subprocess per call costs ~0.5 s of imports): same argv, env, stdin,
    stdout, stderr and exit code as the installed script, which test_installed_script runs for real."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True),
        mock.patch.object(sys, "stdin", io.StringIO(stdin or "")),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = prefixctl_main(list(args))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 2
    return Completed(code, out.getvalue(), err.getvalue())


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def test_installed_script(server_url: str, admin_key: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    env.update({"PREFIXSERVE_URL": server_url, "PREFIXSERVE_API_KEY": admin_key})
    done = subprocess.run(
        [*prefixctl_command(), "health"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "alive and ready" in done.stdout, done.stderr
    done = subprocess.run(
        [*prefixctl_command(), "show", "cli/absent"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "prefix_not_found (HTTP 404)" in done.stderr


@pytest.fixture(scope="module")
def env(server_url: str, admin_key: str) -> dict[str, str]:
    return {"PREFIXSERVE_URL": server_url, "PREFIXSERVE_API_KEY": admin_key}


def test_upload_list_show_delete(
    env: dict[str, str], native_prefix_file: Path, peft_adapter_dir: Path
) -> None:
    done = run("upload", "cli/native", str(native_prefix_file), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("created cli/native") and "virtual tokens:  5" in done.stdout
    assert run("upload", "cli/native", str(native_prefix_file), env=env).stdout.startswith(
        "replaced cli/native"
    )
    done = run("upload", "cli/peft", str(peft_adapter_dir), "--public", "--json", env=env)
    assert done.returncode == 0, done.stderr
    uploaded = json.loads(done.stdout)
    assert uploaded["source"] == "peft" and uploaded["public"] is True and uploaded["created"] is True

    listed = run("list", "--tenant", "cli", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "TOKENS", "SOURCE"]
    assert [line.split()[0] for line in lines[1:]] == ["cli/native", "cli/peft"]
    as_json = json.loads(run("list", "--tenant", "cli", "--limit", "1", "--json", env=env).stdout)
    assert [p["id"] for p in as_json["prefixes"]] == ["cli/native", "cli/peft"]  # pages followed

    shown = json.loads(run("show", "cli/peft", "--json", env=env).stdout)
    assert shown["num_virtual_tokens"] == 4 and shown["targets"] == ["decoder"]
    assert "source:          peft" in run("show", "cli/peft", env=env).stdout

    deleted = run("delete", "cli/peft", env=env)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted cli/peft"
    missing = run("show", "cli/peft", env=env)
    assert missing.returncode == 1 and "prefix_not_found (HTTP 404)" in missing.stderr and not missing.stdout


def test_generate_plain_stream_and_json(env: dict[str, str], native_prefix_file: Path) -> None:
    assert run("upload", "cli/gen", str(native_prefix_file), env=env).returncode == 0
    flags = ["--max-new-tokens", "6", "--ignore-eos"]
    as_json = run("generate", "cli/gen", "the quick brown fox", *flags, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["finish_reason"] == "length" and len(result["token_ids"]) == 6

    plain = run("generate", "cli/gen", "the quick brown fox", *flags, env=env)
    assert plain.returncode == 0 and plain.stdout == result["text"] + "\n"

    streamed = run("generate", "cli/gen", "-", *flags, "--stream", env=env, stdin="the quick brown fox")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == result["text"] + "\n"
    assert "[finish: length" in streamed.stderr and "6 generated tokens" in streamed.stderr

    events = run("generate", "cli/gen", "the quick brown fox", *flags, "--stream", "--json", env=env)
    parsed = [json.loads(line) for line in events.stdout.splitlines()]
    assert [e["token_id"] for e in parsed if "token_id" in e] == result["token_ids"]
    assert parsed[-1]["finish_reason"] == "length"

    bare = run("generate", "-", "hello", "--max-new-tokens", "2", "--json", env=env)
    assert bare.returncode == 0 and json.loads(bare.stdout)["prefix"] is None


def test_generate_logprobs_table_choices_and_beams(env: dict[str, str], native_prefix_file: Path) -> None:
    assert run("upload", "cli/lp", str(native_prefix_file), env=env).returncode == 0
    flags = ["--max-new-tokens", "4", "--ignore-eos", "--logprobs", "2"]
    as_json = run("generate", "cli/lp", "the quick brown fox", *flags, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)  # the server's object, logprobs included
    assert [e["token_id"] for e in result["logprobs"]] == result["token_ids"]

    plain = run("generate", "cli/lp", "the quick brown fox", *flags, env=env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(result["text"] + "\n\n")  # the text, a blank line, the table
    header, *rows = plain.stdout[len(result["text"]) + 2 :].rstrip("\n").split("\n")
    assert header.split()[:5] == ["#", "TOKEN", "ID", "LOGPROB", "PROB"]
    assert len(rows) == 4
    for i, (row, entry) in enumerate(zip(rows, result["logprobs"], strict=True)):
        assert row.startswith(f"{i}  ") and f"  {entry['token_id']}  " in row
        assert f"{entry['logprob']:.4f}" in row and f"{entry['top'][1]['logprob']:.4f}" in row

    # streamed: the text as it comes, then the same table
    streamed = run("generate", "cli/lp", "the quick brown fox", *flags, "--stream", env=env)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith(result["text"] + "\n\n")
    streamed_rows = streamed.stdout[len(result["text"]) + 2 :].rstrip("\n").split("\n")[1:]
    assert streamed_rows == rows

    # n = 2: each completion under its header; usage counts both
    sampled = ["--n", "2", "--seed", "1", "--temperature", "1", "--max-new-tokens", "3", "--ignore-eos"]
    both = json.loads(run("generate", "cli/lp", "hello", *sampled, "--json", env=env).stdout)
    assert [c["index"] for c in both["choices"]] == [0, 1] and both["usage"]["completion_tokens"] == 6
    shown = run("generate", "cli/lp", "hello", *sampled, env=env)
    assert shown.returncode == 0, shown.stderr
    for choice in both["choices"]:
        block = f"--- completion {choice['index']} (length) ---\n{choice['text']}"
        assert block in shown.stdout
    streamed = run("generate", "cli/lp", "hello", *sampled, "--stream", env=env)
    assert streamed.stdout.count("--- completion ") == 2, streamed.stdout
    assert "[completion 1 finish: length" in streamed.stderr

    # beam search: --num-beams reaches the server; an option it cannot honour is refused by name
    beams = run("generate", "cli/lp", "hello", "--num-beams", "4", "--json", env=env)
    assert beams.returncode == 0, beams.stderr
    assert json.loads(beams.stdout)["finish_reason"] in ("stop", "length")
    refused = run("generate", "cli/lp", "hello", "--num-beams", "4", "--logprobs", "2", env=env)
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr and "logprobs" in refused.stderr
    ok = run(
        "generate",
        "cli/lp",
        "hello",
        "--num-beams",
        "1",
        "--length-penalty",
        "1.0",
        "--max-new-tokens",
        "2",
        "--repetition-penalty",
        "1.3",
        "--presence-penalty",
        "0.5",
        "--frequency-penalty",
        "0.5",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    bad = run("generate", "cli/lp", "hello", "--logprobs", "21", env=env)
    assert bad.returncode == 1 and "logprobs" in bad.stderr


def test_keys_create_use_revoke(env: dict[str, str], server_url: str, native_prefix_file: Path) -> None:
    created = run("keys", "create", "clitenant", "--json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    tenant_flags = ["--url", server_url, "--api-key", key["key"]]  # flags override the env's admin key
    done = run("upload", "clitenant/p", str(native_prefix_file), *tenant_flags, env=env)
    assert done.returncode == 0, done.stderr
    denied = run("keys", "create", "clitenant", *tenant_flags, env=env)
    assert denied.returncode == 1 and "forbidden (HTTP 403)" in denied.stderr
    revoked = run("keys", "revoke", "clitenant", key["key_id"], env=env)
    assert revoked.returncode == 0 and key["key_id"] in revoked.stdout
    refused = run("list", *tenant_flags, "--json", env=env)
    assert refused.returncode == 1
    assert json.loads(refused.stderr)["error"] == {
        "code": "unauthorized",
        "message": json.loads(refused.stderr)["error"]["message"],
        "status": 401,
    }


def test_health_models_and_failures(env: dict[str, str]) -> None:
    health = run("health", env=env)
    assert health.returncode == 0 and "alive and ready" in health.stdout
    assert run("models", env=env).stdout.strip()
    no_key = run("list", env={"PREFIXSERVE_URL": env["PREFIXSERVE_URL"]})
    assert no_key.returncode == 1 and "unauthorized (HTTP 401)" in no_key.stderr
    unreachable = run("list", "--url", "http://127.0.0.1:9", env=env)
    assert unreachable.returncode == 3 and "connection_error" in unreachable.stderr
    bad_id = run("show", "no-slash", env=env)
    assert bad_id.returncode == 2 and "<tenant>/<name>" in bad_id.stderr
    usage = run("frobnicate", env=env)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_tenants_set_and_show(env: dict[str, str], server_url: str) -> None:
    shown = run("tenants", "show", "clitenants", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["tenant:", "clitenants"] and "weight:          1" in lines
    assert "max concurrent:  no limit" in lines and "last minute:     0 requests, 0 tokens" in lines

    done = run(
        "tenants", "set", "clitenants", "--weight", "2.5", "--max-concurrent", "4",
        "--requests-per-minute", "120", "--tokens-per-minute", "9000", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for line in (
        "weight:          2.5",
        "max concurrent:  4",
        "requests/minute: 120",
        "tokens/minute:   9000",
    ):
        assert line in done.stdout.splitlines(), done.stdout

    cleared = run("tenants", "set", "clitenants", "--clear", "max-concurrent", "weight", "--json", env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout) == {
        "tenant": "clitenants",
        "weight": 1.0,
        "max_concurrent": None,
        "requests_per_minute": 120,
        "tokens_per_minute": 9000,
        "usage": {"running": 0, "queued": 0, "requests_last_minute": 0, "tokens_last_minute": 0},
    }
    assert json.loads(run("tenants", "show", "clitenants", "--json", env=env).stdout) == json.loads(
        cleared.stdout
    )

    # the tenant's own key may look, not change
    key = json.loads(run("keys", "create", "clitenants", "--json", env=env).stdout)
    tenant_flags = ["--url", server_url, "--api-key", key["key"]]
    assert "requests/minute: 120" in run("tenants", "show", "clitenants", *tenant_flags).stdout
    denied = run("tenants", "set", "clitenants", "--clear", "requests_per_minute", *tenant_flags)
    assert denied.returncode == 1 and "forbidden (HTTP 403)" in denied.stderr
    hidden = run("tenants", "show", "cli", *tenant_flags)
    assert hidden.returncode == 1 and "tenant_not_found (HTTP 404)" in hidden.stderr
    assert run("keys", "revoke", "clitenants", key["key_id"], env=env).returncode == 0


def test_tenants_set_refuses_bad_usage(env: dict[str, str]) -> None:
    nothing = run("tenants", "set", "clitenants", env=env)
    assert nothing.returncode == 2 and "nothing to set" in nothing.stderr and not nothing.stdout
    both = run("tenants", "set", "clitenants", "--weight", "2", "--clear", "weight", env=env)
    assert both.returncode == 2 and "weight both set and cleared" in both.stderr
    unknown = run("tenants", "set", "clitenants", "--clear", "colour", env=env)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    out_of_range = run("tenants", "set", "clitenants", "--weight", "0", "--json", env=env)
    assert out_of_range.returncode == 1
    assert json.loads(out_of_range.stderr)["error"]["status"] == 422
    bad_tenant = run("tenants", "show", "no/slash", env=env)
    assert bad_tenant.returncode == 2 and "invalid_id" in bad_tenant.stderr
    assert json.loads(run("tenants", "show", "clitenants", "--json", env=env).stdout)["weight"] == 1.0
