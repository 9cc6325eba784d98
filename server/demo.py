"""`make serve`: the shipped demo backbone, its demo prefixes stored as public `demo/*`, then prefix-serve.

Settings come from the environment and flags as for prefix-serve (defaults: models/demo-gpt2, var/prefixes,
127.0.0.1:8000). Each models/demo-prefixes/<name>.safetensors is stored as public `demo/<name>` unless the
store already holds exactly those bytes. If the demo backbone is missing (a checkout without it), a small
random GPT-2 is built under var/ so the service still starts, and the log says so loudly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from prefix_store.families import family
from prefix_store.format import BackboneShape, PrefixFormatError, load_prefix, save_prefix, validate
from prefix_store.store import PrefixStore, make_meta, open_store
from server.cli import serve, settings_from_args
from server.logs import configure_logging

log = logging.getLogger("prefixserve.demo")
ROOT = Path(__file__).resolve().parents[1]
DEMO_PREFIXES = ROOT / "models" / "demo-prefixes"
FALLBACK_MODEL = ROOT / "var" / "fallback-gpt2"


def backbone_shape(model_dir: Path) -> BackboneShape:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return family(config.model_type).shape(config)


def seed_demo_prefixes(
    store: PrefixStore, shape: BackboneShape, directory: Path = DEMO_PREFIXES
) -> list[str]:
    """Store every demo prefix that fits the backbone as public demo/<name>; returns the ids stored."""
    stored = []
    for path in sorted(directory.glob("*.safetensors")):
        prefix_id = f"demo/{path.stem}"
        try:
            prefix = load_prefix(path.read_bytes())
            validate(prefix, shape)
        except PrefixFormatError as exc:
            log.warning("skipping %s: %s", path, exc.message)
            continue
        data = save_prefix(prefix)
        meta = make_meta(prefix_id, prefix, data, "native", public=True)
        current = store.get_meta(prefix_id)
        if current is None or current.sha256 != meta.sha256 or not current.public:
            store.put(meta, data)
        stored.append(prefix_id)
    return stored


def ensure_fallback_model() -> Path:
    if not (FALLBACK_MODEL / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_gpt2

        build_gpt2(FALLBACK_MODEL, n_layer=4, n_head=4, n_embd=256, n_positions=512)
    return FALLBACK_MODEL


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    model_dir = Path(settings.model)
    if not (model_dir / "config.json").is_file():
        log.warning(
            "!!! %s is missing: serving a small RANDOM GPT-2 built at %s instead (its output is noise)",
            model_dir,
            FALLBACK_MODEL,
        )
        model_dir = ensure_fallback_model()
        settings = settings.model_copy(update={"model": str(model_dir)})
    store = open_store(settings.store, settings.store_timeout)
    ids = seed_demo_prefixes(store, backbone_shape(model_dir))
    store.close()
    log.info("demo prefixes available (public): %s", ", ".join(ids) or "none")
    log.info(
        "try: curl -s localhost:%d/v1/generate -H 'Content-Type: application/json' -d '%s'",
        settings.port,
        '{"prefix": "demo/e2e", "prompt": "name : Blue Spice | Type : coffee shop | area : city centre"}',
    )
    serve(settings)


if __name__ == "__main__":
    main()
