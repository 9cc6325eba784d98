"""prefixctl: the command line for a prefixserve server.

    prefixctl upload acme/e2e ./e2e.safetensors        # a native prefix file
    prefixctl upload acme/peft ./adapter_dir --public  # a PEFT prefix-tuning adapter directory (admin for --public)
    prefixctl list [--tenant acme]
    prefixctl show acme/e2e
    prefixctl generate acme/e2e "name : Blue Spice" --stream --max-new-tokens 32
    prefixctl generate acme/e2e "name : Blue Spice" --logprobs 3 --n 2 --temperature 0.8 --seed 1
    prefixctl delete acme/e2e
    prefixctl keys create acme            # admin: prints key_id and the key (shown once)
    prefixctl keys revoke acme KEY_ID     # admin
    prefixctl tenants show acme           # weight, quotas, usage (admin, or acme's own key)
    prefixctl tenants set acme --weight 2 --requests-per-minute 600 --clear max_concurrent   # admin

`--url` and `--api-key` override PREFIXSERVE_URL and PREFIXSERVE_API_KEY; `--json` prints JSON.
Exit codes: 0 ok, 1 the server refused or failed, 2 bad usage or local file, 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from prefixserve_client._wire import TENANT_SETTINGS
from prefixserve_client.client import PrefixServeClient
from prefixserve_client.errors import ConnectionError, PrefixServeError, ValidationError
from prefixserve_client.types import GenerateResult, PrefixInfo, TenantInfo, TokenLogprob

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
BARE_BACKBONE = "-"  # `prefixctl generate - PROMPT` uses the backbone without a prefix


def _global_flags(suppress: bool) -> argparse.ArgumentParser:
    """--url/--api-key/--json, accepted before or after the verb (the sub-parsers must not reset them)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--url", default=default, help="server URL (default: $PREFIXSERVE_URL or http://127.0.0.1:8000)"
    )
    parser.add_argument("--api-key", default=default, help="API key (default: $PREFIXSERVE_API_KEY)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON instead of readable text",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS if suppress else 60.0,
        help="seconds to wait for the server (default 60)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    common = _global_flags(suppress=True)
    parser = argparse.ArgumentParser(
        prog="prefixctl",
        description="Manage and use prefixes on a prefixserve server.",
        parents=[_global_flags(False)],
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser(
        "upload", parents=[common], help="store a native prefix file or a PEFT adapter directory"
    )
    p.add_argument("id", help="<tenant>/<name>")
    p.add_argument("path", help="a native .safetensors prefix file or a PEFT adapter directory")
    p.add_argument("--public", action="store_true", help="every tenant may generate with it (admin key only)")

    p = verbs.add_parser("list", parents=[common], help="list the prefixes the key can see")
    p.add_argument("--tenant", help="only this tenant's prefixes")
    p.add_argument("--limit", type=int, help="page size asked of the server (all pages are fetched)")

    p = verbs.add_parser("show", parents=[common], help="show a prefix's metadata")
    p.add_argument("id")

    p = verbs.add_parser("delete", parents=[common], help="delete a prefix")
    p.add_argument("id")

    p = verbs.add_parser("generate", parents=[common], help="generate text with a prefix")
    p.add_argument("id", help=f"<tenant>/<name>, or {BARE_BACKBONE} for the bare backbone")
    p.add_argument("prompt", help="the prompt; - reads it from standard input")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument(
        "--n", type=int, metavar="N", help="completions of the prompt, 1-16 (with --seed, i uses seed + i)"
    )
    p.add_argument("--num-beams", type=int, metavar="K", help="beam search width, 1-16 (1 = no beam search)")
    p.add_argument("--length-penalty", type=float, help="HF's, for beam search (default 1.0)")
    p.add_argument("--early-stopping", action="store_true", default=None, help="HF's, for beam search")
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help="show each token's log-probability and its N most likely alternatives (0-20)",
    )
    p.add_argument("--repetition-penalty", type=float, help="HF's (1 = off)")
    p.add_argument("--presence-penalty", type=float, help="OpenAI's, -2 to 2")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's, -2 to 2")

    keys = verbs.add_parser("keys", parents=[common], help="tenant API keys (admin)")
    key_verbs = keys.add_subparsers(dest="key_verb", required=True, metavar="ACTION")
    p = key_verbs.add_parser("create", parents=[common], help="create a key for TENANT (shown once)")
    p.add_argument("tenant")
    p = key_verbs.add_parser("revoke", parents=[common], help="revoke a key")
    p.add_argument("tenant")
    p.add_argument("key_id")

    tenants = verbs.add_parser("tenants", parents=[common], help="tenant weight, quotas and usage")
    tenant_verbs = tenants.add_subparsers(dest="tenant_verb", required=True, metavar="ACTION")
    p = tenant_verbs.add_parser(
        "show", parents=[common], help="a tenant's settings and usage (admin key, or the tenant's own)"
    )
    p.add_argument("tenant")
    p = tenant_verbs.add_parser(
        "set", parents=[common], help="set a tenant's weight and quotas (admin); others keep their value"
    )
    p.add_argument("tenant")
    p.add_argument("--weight", type=float, help="fair-share weight, > 0 and <= 1000 (default 1)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="running + queued requests on one replica")
    p.add_argument("--requests-per-minute", type=int, metavar="N")
    p.add_argument("--tokens-per-minute", type=int, metavar="N", help="prompt + generated tokens")
    p.add_argument(
        "--clear",
        nargs="+",
        action="extend",
        default=[],
        metavar="FIELD",
        choices=[*TENANT_SETTINGS, *(name.replace("_", "-") for name in TENANT_SETTINGS)],
        help=f"reset to the default (weight 1, no limit): {', '.join(TENANT_SETTINGS)}",
    )

    verbs.add_parser("health", parents=[common], help="is the server alive and ready")
    verbs.add_parser("models", parents=[common], help="the backbone and the prefixes usable as OpenAI models")
    return parser


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _describe(prefix: PrefixInfo) -> str:
    rows = [
        ("id", prefix.id),
        ("tenant", prefix.tenant),
        ("name", prefix.name),
        ("source", prefix.source),
        ("targets", ",".join(prefix.targets)),
        ("virtual tokens", str(prefix.num_virtual_tokens)),
        ("dtype", prefix.dtype),
        ("bytes", str(prefix.bytes)),
        ("public", "yes" if prefix.public else "no"),
        ("sha256", prefix.sha256),
        ("created", _when(prefix.created_at)),
        ("updated", _when(prefix.updated_at)),
    ]
    if prefix.prompt_template is not None:
        rows.append(("prompt template", prefix.prompt_template))
    return "\n".join(f"{k + ':':<16} {v}" for k, v in rows)


def _table(prefixes: Sequence[PrefixInfo]) -> str:
    header = ("ID", "TOKENS", "SOURCE", "TARGETS", "PUBLIC", "BYTES", "UPDATED")
    rows = [header] + [
        (
            p.id,
            str(p.num_virtual_tokens),
            p.source,
            ",".join(p.targets),
            "yes" if p.public else "no",
            str(p.bytes),
            _when(p.updated_at),
        )
        for p in prefixes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_upload(client: PrefixServeClient, args: argparse.Namespace) -> None:
    info = client.upload(args.id, args.path, public=args.public)
    _emit(
        args,
        {**info.to_dict(), "created": info.created},
        f"{'created' if info.created else 'replaced'} {info.id}\n{_describe(info)}",
    )


def cmd_list(client: PrefixServeClient, args: argparse.Namespace) -> None:
    prefixes = list(client.list_prefixes(tenant=args.tenant, limit=args.limit))
    text = _table(prefixes) if prefixes else "no prefixes"
    _emit(args, {"prefixes": [p.to_dict() for p in prefixes]}, text)


def cmd_show(client: PrefixServeClient, args: argparse.Namespace) -> None:
    info = client.get_prefix(args.id)
    _emit(args, info.to_dict(), _describe(info))


def cmd_delete(client: PrefixServeClient, args: argparse.Namespace) -> None:
    client.delete_prefix(args.id)
    _emit(args, {"deleted": args.id}, f"deleted {args.id}")


GENERATE_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "ignore_eos",
    "n",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "logprobs",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in GENERATE_OPTIONS if getattr(args, name) is not None}


def _quoted(text: str | None) -> str:
    return "?" if text is None else json.dumps(text, ensure_ascii=False)


def _logprob_table(entries: Sequence[TokenLogprob]) -> str:
    """Each generated token with its log-probability, probability and top alternatives, one row per token.

    The server sends text for the alternatives only, so a token's text is shown when it is among them (always,
    for greedy decoding with --logprobs 1 or more), else "?"."""
    header = ("#", "TOKEN", "ID", "LOGPROB", "PROB", "TOP ALTERNATIVES")
    rows = [header]
    for i, entry in enumerate(entries):
        top = "  ".join(f"{_quoted(t.text)} {t.logprob:.4f}" for t in entry.top)
        probability = f"{math.exp(entry.logprob):.2%}"
        rows.append(
            (str(i), _quoted(entry.text), str(entry.token_id), f"{entry.logprob:.4f}", probability, top)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _describe_result(result: GenerateResult, with_logprobs: bool) -> str:
    """The text; with n > 1 each completion under a header; with --logprobs each one's table below it."""
    completions = result.completions
    blocks = []
    for choice in completions:
        lines = (
            [f"--- completion {choice.index} ({choice.finish_reason}) ---"] if len(completions) > 1 else []
        )
        lines.append(choice.text)
        if with_logprobs and choice.logprobs is not None:
            lines += ["", _logprob_table(choice.logprobs)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cmd_generate(client: PrefixServeClient, args: argparse.Namespace) -> None:
    prefix = None if args.id == BARE_BACKBONE else args.id
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.stream:
        _stream_generate(client, args, prefix, prompt)
        return
    result = client.generate(prefix, prompt, **_sampling(args))
    _emit(args, result.raw, _describe_result(result, args.logprobs is not None))


def _stream_generate(
    client: PrefixServeClient, args: argparse.Namespace, prefix: str | None, prompt: str
) -> None:
    """Text to standard output as it comes (a header per completion when --n > 1, each one's logprobs table
    after it with --logprobs); the finish reason and token counts to standard error."""
    out: TextIO = sys.stdout
    is_many = (args.n or 1) > 1
    shown_index: int | None = None
    entries: list[TokenLogprob] = []
    for event in client.stream_generate(prefix, prompt, **_sampling(args)):
        if args.json:
            out.write(json.dumps(event.raw) + "\n")  # one JSON object per line, as the server sent them
            out.flush()
            continue
        if is_many and event.index != shown_index:
            blank_line = "" if shown_index is None else "\n"
            out.write(f"{blank_line}--- completion {event.index} ---\n")
            shown_index = event.index
        out.write(event.text)
        out.flush()
        if event.logprobs is not None:
            entries.append(event.logprobs)
        if not event.is_final:
            continue
        out.write("\n")
        if args.logprobs is not None:
            out.write("\n" + _logprob_table(entries) + "\n")
        entries = []
        usage = event.usage
        tokens = (
            f", {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens" if usage else ""
        )
        which = f"completion {event.index} " if is_many else ""
        print(f"[{which}finish: {event.finish_reason}{tokens}]", file=sys.stderr)


def cmd_keys(client: PrefixServeClient, args: argparse.Namespace) -> None:
    if args.key_verb == "create":
        created = client.create_key(args.tenant)
        _emit(args, created._asdict(), f"key_id: {created.key_id}\nkey:    {created.key}")
        if not args.json:
            print("the key is shown only once: store it now", file=sys.stderr)
    else:
        client.revoke_key(args.tenant, args.key_id)
        _emit(
            args, {"revoked": args.key_id, "tenant": args.tenant}, f"revoked {args.key_id} of {args.tenant}"
        )


def _limit(value: int | None) -> str:
    return "no limit" if value is None else str(value)


def _describe_tenant(info: TenantInfo) -> str:
    usage = info.usage
    rows = [
        ("tenant", info.tenant),
        ("weight", f"{info.weight:g}"),
        ("max concurrent", _limit(info.max_concurrent)),
        ("requests/minute", _limit(info.requests_per_minute)),
        ("tokens/minute", _limit(info.tokens_per_minute)),
        ("running", str(usage.running)),
        ("queued", str(usage.queued)),
        ("last minute", f"{usage.requests_last_minute} requests, {usage.tokens_last_minute} tokens"),
    ]
    return "\n".join(f"{k + ':':<16} {v}" for k, v in rows)


def _tenant_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `tenants set` sends: the flags given, and None (reset) for each --clear FIELD."""
    given = {name: getattr(args, name) for name in TENANT_SETTINGS if getattr(args, name) is not None}
    cleared = {name.replace("-", "_") for name in args.clear}
    both = sorted(cleared & set(given))
    if both:
        raise ValidationError(f"{', '.join(both)} both set and cleared: give one", code="invalid_settings")
    if not given and not cleared:
        flags = ", ".join("--" + name.replace("_", "-") for name in TENANT_SETTINGS)
        raise ValidationError(f"nothing to set: give {flags} or --clear FIELD", code="invalid_settings")
    return {**given, **dict.fromkeys(cleared)}


def cmd_tenants(client: PrefixServeClient, args: argparse.Namespace) -> None:
    if args.tenant_verb == "set":
        info = client.set_tenant(args.tenant, **_tenant_settings(args))
    else:
        info = client.get_tenant(args.tenant)
    _emit(args, info.to_dict(), _describe_tenant(info))


def cmd_health(client: PrefixServeClient, args: argparse.Namespace) -> None:
    alive = client.health()
    ready = client.ready()
    _emit(args, {"healthz": alive, "readyz": ready}, f"alive and ready at {client.base_url}")


def cmd_models(client: PrefixServeClient, args: argparse.Namespace) -> None:
    models = client.models()
    _emit(args, [m.raw for m in models], "\n".join(m.id for m in models))


COMMANDS: dict[str, Callable[[PrefixServeClient, argparse.Namespace], None]] = {
    "upload": cmd_upload,
    "list": cmd_list,
    "show": cmd_show,
    "delete": cmd_delete,
    "generate": cmd_generate,
    "keys": cmd_keys,
    "tenants": cmd_tenants,
    "health": cmd_health,
    "models": cmd_models,
}


def _fail(args: argparse.Namespace, code: str, message: str, status: int | None, exit_code: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message, "status": status}}), file=sys.stderr)
    else:
        where = f" (HTTP {status})" if status is not None else ""
        print(f"prefixctl: {code}{where}: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with PrefixServeClient(args.url, args.api_key, timeout=args.timeout) as client:
            COMMANDS[args.verb](client, args)
    except ConnectionError as exc:
        return _fail(args, exc.code, exc.message, exc.status, EXIT_UNREACHABLE)
    except PrefixServeError as exc:
        exit_code = EXIT_USAGE if exc.status is None else EXIT_API  # None: refused before sending
        return _fail(args, exc.code, exc.message, exc.status, exit_code)
    except OSError as exc:  # a local file that is missing or unreadable
        return _fail(args, "local_file", str(exc), None, EXIT_USAGE)
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
