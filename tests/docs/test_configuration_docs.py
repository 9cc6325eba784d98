"""docs/configuration.md lists every setting of server/settings.py, as scripts/config_docs.py renders them."""

from __future__ import annotations

import importlib.util

from serving import ROOT

spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
config_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_docs)


def test_configuration_page_lists_every_setting_as_rendered() -> None:
    page = config_docs.PAGE.read_text()
    assert config_docs.page_section(page) == config_docs.render(), (
        "run: .venv/bin/python scripts/config_docs.py --write"
    )


def test_every_flag_and_variable_is_on_the_page() -> None:
    from server.cli import SECRET_FIELDS
    from server.settings import Settings

    page = config_docs.PAGE.read_text()
    for name in Settings.model_fields:
        assert f"`PREFIXSERVE_{name.upper()}`" in page
        if name not in SECRET_FIELDS:
            assert f"`--{name.replace('_', '-')}`" in page
