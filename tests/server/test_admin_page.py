"""The /admin page in a real headless Chromium (Debian's, driven by Playwright) against a real prefix-serve.

Needs `scripts/ensure-chromium` and the `playwright` pip package (never `playwright install`: we drive the
system browser). Set PREFIXSERVE_ADMIN_SCREENSHOT=docs/admin.png to refresh the screenshot in the docs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import running_server

from prefix_store.format import Prefix, save_prefix

CHROMIUM = os.environ.get("PREFIXSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_KEY = "admin-page-test-key"
PROMPT = "name : Blue Spice | area : city centre"


def _missing(reason: str) -> None:
    """A failure, never a skip: a missing browser must not pass unseen (make test installs it)."""
    pytest.fail(f"{reason}: run scripts/ensure-chromium and pip install playwright (dev extras)")


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the browser fixture, as a failure
    expect = sync_playwright = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if sync_playwright is None:
        _missing("the playwright package is not installed")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _missing(f"{CHROMIUM} is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    import torch

    root = tmp_path_factory.mktemp("admin-page")
    env = {"PREFIXSERVE_ADMIN_KEY": ADMIN_KEY}
    with running_server(tiny_gpt2_dir, str(root / "store"), root / "logs", env=env) as server:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/octet-stream"}
        for seed, (prefix_id, query) in enumerate([("acme/e2e", ""), ("shared/webnlg", "?public=true")]):
            tensor = torch.randn(2, 2, 4, 5 + seed, 16, generator=torch.Generator().manual_seed(seed))
            data = save_prefix(Prefix(model_type="gpt2", targets={"decoder": tensor}))
            response = httpx.put(
                f"{server.url}/v1/prefixes/{prefix_id}{query}", content=data, headers=headers
            )
            assert response.status_code == 201, response.text
        yield server


def test_admin_page_lists_prefixes_shows_metrics_and_generates(browser, server) -> None:
    expected = httpx.post(
        f"{server.url}/v1/generate",
        json={"prefix": "acme/e2e", "prompt": PROMPT, "max_new_tokens": 32, "temperature": 0},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()["text"]
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))

    response = page.goto(f"{server.url}/admin")
    assert response.status == 200 and "default-src 'self'" in response.headers["content-security-policy"]
    assert page.title() == "prefixserve admin"
    # without a key the list says why it is empty
    expect(page.locator("#prefix-error")).to_contain_text("unauthorized")
    expect(page.locator("#status")).to_have_attribute("data-state", "ready")

    page.fill("#api-key", ADMIN_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("tr.prefix-row[data-id='acme/e2e']")
    ids = page.eval_on_selector_all("tr.prefix-row", "rows => rows.map(r => r.dataset.id)")
    assert ids == ["acme/e2e", "shared/webnlg"]
    row = page.locator("tr.prefix-row[data-id='shared/webnlg']").inner_text()
    assert "public" in row and "6" in row and "native" in row

    page.click("tr.prefix-row[data-id='acme/e2e']")
    assert page.input_value("#try-prefix") == "acme/e2e"
    page.fill("#try-prompt", PROMPT)
    page.click("#try-run")
    expect(page.locator("#try-meta")).to_contain_text("generated tokens")
    assert page.text_content("#try-output") == expected  # the server's greedy text, as is
    assert page.text_content("#try-error") == ""

    # live figures: the generation above shows up in the counters within a refresh or two
    expect(page.locator("#m-tokens")).to_have_text(re.compile(r"^[1-9][0-9,]*$"), timeout=10_000)
    assert page.locator("#requests-table tbody tr", has_text="/v1/generate").count() >= 1
    assert page.locator("#requests-table tbody tr", has_text="/metrics").count() == 0  # its own polling
    assert page.text_content("#m-hit-rate").strip() != "" and page.text_content("#metrics-error") == ""

    # the key survives a reload (localStorage)
    page.reload()
    page.wait_for_selector("tr.prefix-row[data-id='acme/e2e']")
    screenshot = os.environ.get("PREFIXSERVE_ADMIN_SCREENSHOT")
    if screenshot:
        page.click("tr.prefix-row[data-id='acme/e2e']")
        page.fill("#try-prompt", PROMPT)
        page.click("#try-run")
        expect(page.locator("#try-meta")).to_contain_text("generated tokens")
        page.wait_for_timeout(3500)  # one metrics refresh, so rates show
        page.screenshot(path=screenshot, full_page=True)
    assert not page_errors, page_errors
    context.close()


def test_admin_page_reports_a_bad_key(browser, server) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server.url}/admin")
    page.evaluate("localStorage.setItem('prefixserve.apiKey', 'psk_wrong_key')")
    page.reload()
    expect(page.locator("#prefix-error")).to_contain_text("unauthorized")
    assert "enter a valid API key" in page.text_content("#prefix-error")
    assert page.locator("tr.prefix-row").count() == 0
    page.click("#forget-key")
    assert page.evaluate("localStorage.getItem('prefixserve.apiKey')") is None
    context.close()
