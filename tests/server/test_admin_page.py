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
        page.fill("#tenant-name", "acme")
        page.click("#tenant-load")
        expect(page.locator("#tenant-view")).to_be_visible()
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


def test_admin_page_tenants_panel_shows_and_sets_quotas(browser, server) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(f"{server.url}/v1/tenants/acme/keys", headers=admin)
    assert created.status_code == 201, created.text
    acme = {"Authorization": f"Bearer {created.json()['key']}"}
    body = {"prefix": "acme/e2e", "prompt": PROMPT, "max_new_tokens": 4}
    assert httpx.post(f"{server.url}/v1/generate", json=body, headers=acme).status_code == 200

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(f"{server.url}/admin")
    page.evaluate(f"localStorage.setItem('prefixserve.apiKey', '{ADMIN_KEY}')")
    page.reload()

    # a tenant with no settings and no traffic: the defaults
    page.fill("#tenant-name", "quiet")
    page.click("#tenant-load")
    expect(page.locator("#tenant-view")).to_be_visible()
    assert page.get_attribute("#tenant-view", "data-tenant") == "quiet"
    assert page.input_value("#t-weight") == "1" and page.input_value("#t-max-concurrent") == ""
    assert page.text_content("#t-requests-sub") == "no limit" and page.text_content("#t-running") == "0"

    # acme's traffic shows in the per-tenant figures (admin /metrics); its row opens its settings
    row = page.locator("tr.tenant-row[data-tenant='acme']")
    expect(row).to_be_visible(timeout=10_000)
    assert row.locator("td").nth(3).inner_text() == "1"  # one generation request
    row.click()
    expect(page.locator("#tenant-view")).to_have_attribute("data-tenant", "acme")
    assert page.input_value("#tenant-name") == "acme"
    expect(page.locator("#t-requests")).to_have_text("1")  # in the last minute
    assert page.locator("datalist#tenant-names option[value='acme']").count() == 1

    # set weight and a quota from the page: the server has them, and acme's next request is over it
    page.fill("#t-weight", "2.5")
    page.fill("#t-requests-per-minute", "1")
    page.click("#tenant-save")
    expect(page.locator("#tenant-saved")).to_contain_text("saved")
    settings = httpx.get(f"{server.url}/v1/tenants/acme", headers=admin).json()
    assert (settings["weight"], settings["requests_per_minute"], settings["max_concurrent"]) == (2.5, 1, None)
    assert page.text_content("#t-requests-sub") == "limit 1 per minute"
    refused = httpx.post(f"{server.url}/v1/generate", json=body, headers=acme)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    expect(row.locator("td").nth(5)).to_have_text("1", timeout=10_000)  # refused, by reason on hover
    assert "quota_exceeded: 1" in row.locator("td").nth(5).get_attribute("title")

    # an emptied field goes back to its default; a value the server refuses is reported, not saved
    page.fill("#t-requests-per-minute", "")
    page.click("#tenant-save")
    expect(page.locator("#t-requests-sub")).to_have_text("no limit")
    assert httpx.get(f"{server.url}/v1/tenants/acme", headers=admin).json()["requests_per_minute"] is None
    page.fill("#t-weight", "0")
    page.click("#tenant-save")
    expect(page.locator("#tenant-error")).to_contain_text("(422)")
    assert httpx.get(f"{server.url}/v1/tenants/acme", headers=admin).json()["weight"] == 2.5
    assert not page_errors, page_errors

    # a tenant's key sees its own settings, no other tenant's, and no per-tenant figures
    page.fill("#api-key", created.json()["key"])
    page.click("#key-form button[type=submit]")
    page.fill("#tenant-name", "acme")
    page.click("#tenant-load")
    expect(page.locator("#tenant-view")).to_have_attribute("data-tenant", "acme")
    expect(page.locator("#t-weight")).to_have_value("2.5")
    page.fill("#tenant-name", "shared")
    page.click("#tenant-load")
    expect(page.locator("#tenant-error")).to_contain_text("tenant_not_found")
    assert page.locator("#tenant-view").is_hidden()
    expect(page.locator("#tenant-table tbody")).to_contain_text("need the admin key")
    assert not page_errors, page_errors
    context.close()


def test_admin_page_try_box_beams_n_and_logprobs(browser, server) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"prefix": "acme/e2e", "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0, "logprobs": 3}
    expected = httpx.post(f"{server.url}/v1/generate", json=body, headers=admin).json()
    context = browser.new_context(viewport={"width": 1280, "height": 1200})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(f"{server.url}/admin")
    page.evaluate(f"localStorage.setItem('prefixserve.apiKey', '{ADMIN_KEY}')")
    page.reload()
    page.wait_for_selector("tr.prefix-row[data-id='acme/e2e']")
    page.click("tr.prefix-row[data-id='acme/e2e']")

    ids = page.eval_on_selector_all("[id]", "elements => elements.map(e => e.id)")
    assert len(ids) == len(set(ids)), "every id on the page is unique (the script finds elements by id)"
    # the beams selector offers 1-16 (1 chosen); alternatives are asked for only with the toggle on
    beams = page.eval_on_selector_all("#try-beams option", "options => options.map(o => o.value)")
    assert beams == [str(k) for k in range(1, 17)] and page.input_value("#try-beams") == "1"
    assert page.is_disabled("#try-top")
    page.fill("#try-prompt", PROMPT)
    page.fill("#try-max", "8")
    page.check("#try-show-logprobs")
    assert page.is_enabled("#try-top")
    page.fill("#try-top", "3")
    page.click("#try-run")
    expect(page.locator("#try-meta")).to_contain_text("generated tokens")
    assert page.text_content("#try-output") == expected["text"]
    table = page.locator("div#try-logprobs > table.logprobs")
    expect(table).to_be_visible()
    assert table.bounding_box()["height"] > 8 * 10  # laid out below the output, a row per token
    rows = table.locator("tbody tr")
    assert rows.count() == len(expected["token_ids"]) == 8
    shown = page.eval_on_selector_all(
        "#try-logprobs tr.logprob-row",
        "rows => rows.map(r => [Number(r.dataset.tokenId), Number(r.dataset.logprob)])",
    )
    assert [token_id for token_id, _ in shown] == expected["token_ids"]
    for (_, logprob), entry in zip(shown, expected["logprobs"], strict=True):
        assert logprob == pytest.approx(entry["logprob"], abs=1e-6)
    first, top = rows.nth(0), expected["logprobs"][0]["top"]
    assert (
        first.locator(".alt").count() == 3 and first.locator(".alt.chosen").count() == 1
    )  # greedy: chosen is top 1
    assert first.locator(".alt").nth(0).get_attribute("class") == "alt chosen"
    assert f"{expected['logprobs'][0]['logprob']:.4f}" in first.inner_text()
    assert all(f"{t['logprob']:.4f}" in first.get_attribute("title") for t in top)  # hover: the alternatives
    assert page.text_content("#try-error") == ""

    # beam search with log-probabilities on: the server refuses logprobs with beams, the page shows why
    page.select_option("#try-beams", "4")
    page.click("#try-run")
    expect(page.locator("#try-error")).to_contain_text("(422)")
    assert "logprobs" in page.text_content("#try-error")
    assert page.text_content("#try-output") == "" and page.locator("#try-logprobs table").count() == 0

    # n = 2, sampled, log-probabilities off: each completion under its header, no tables
    page.select_option("#try-beams", "1")
    page.fill("#try-n", "2")
    page.fill("#try-temp", "1")
    page.uncheck("#try-show-logprobs")
    page.click("#try-run")
    expect(page.locator("#try-meta")).to_contain_text("2 completions")
    heads = page.locator("#try-output .choice .choice-head").all_inner_texts()
    assert [h.split(" · ")[0] for h in heads] == ["completion 0", "completion 1"]
    assert page.locator("#try-logprobs table").count() == 0 and page.text_content("#try-error") == ""
    # both completions with log-probabilities: one table each
    page.check("#try-show-logprobs")
    page.click("#try-run")
    expect(page.locator("#try-logprobs table.logprobs")).to_have_count(2)
    assert page.get_attribute("#try-logprobs table.logprobs >> nth=1", "data-index") == "1"
    # n left empty again: one completion, its text as is
    page.fill("#try-n", "")
    page.click("#try-run")
    expect(page.locator("#try-logprobs table.logprobs")).to_have_count(1)
    assert page.locator("#try-output .choice").count() == 0
    assert not page_errors, page_errors
    context.close()
