"""The read-only catalog page at ``/``, in headless Debian Chromium driven by Playwright (pointed at
``/usr/bin/chromium``: no browser download). It loads the catalog, searches the experts, shows a
router's lineage, and routes a prompt (plain and forced), whose per-block heatmap must be the
routing the API returns; a screenshot is taken at the end.

Without Chromium the test is skipped, unless ``ATMOE_TEST_BROWSER=1`` (CI sets it), where it fails.
``ATMOE_TEST_SCREENSHOTS=DIR`` keeps the screenshot there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_fixtures as fixtures  # noqa: E402

CHROMIUM = Path(os.environ.get("ATMOE_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("ATMOE_TEST_BROWSER") == "1":
            pytest.fail(message + "; ATMOE_TEST_BROWSER=1 requires the browser test")
        pytest.skip(message)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def server(serve_catalog):
    yield from fixtures.serving(serve_catalog, ["medqa:prod"], api_key=fixtures.API_KEY, max_tokens=64)


def test_the_catalog_page_loads_searches_shows_lineage_and_routes(browser, server, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/")
    expect(page.locator("#status")).to_contain_text("API key")  # 401 until the key is given
    page.fill("#api-key", fixtures.API_KEY)
    page.dispatch_event("#api-key", "change")

    rows = page.locator("#experts tbody tr")
    expect(rows.first).to_be_visible()
    expect(page.locator('.composition[data-ref="remote@1"]')).to_contain_text("no router yet")
    expect(page.locator("#status")).to_have_text("")  # no error while loading
    assert rows.count() >= 8
    page.fill("#search", "da")
    expect(rows.first).to_have_attribute("data-ref", "da@1")
    expect(rows).to_have_count(1)
    page.fill("#search", "")
    page.select_option("#group", "style")
    expect(rows.first).to_have_attribute("data-ref", "sa@1")
    expect(rows).to_have_count(1)

    composition = page.locator('.composition[data-ref="medqa@1"]')
    expect(composition).to_contain_text("fa@1")
    expect(composition.locator('tr[data-ref="medqa@1:1"]')).to_contain_text("prod")
    composition.locator('tr[data-ref="medqa@1:1"] button').click()
    expect(page.locator("#lineage-title")).to_have_text("medqa@1:1")
    expect(page.locator("#lineage")).to_contain_text("training data")

    prompt = "fa da sa x1 x2"
    expected = httpx.post(
        server.url + "/v1/completions",
        json={"model": "medqa:prod", "prompt": prompt, "max_tokens": 8, "temperature": 0, "atmoe": {"blocks": True}},
        headers={"Authorization": f"Bearer {fixtures.API_KEY}"},
    ).json()
    page.select_option("#route-model", "medqa:prod")
    page.fill("#prompt", prompt)
    page.click("#route-button")
    expect(page.locator("#heatmap table")).to_be_visible()
    expect(page.locator("#answer")).to_have_text(expected["choices"][0]["text"])
    cells = page.locator("#heatmap td.cell")
    blocks = expected["atmoe"]["blocks"]
    assert cells.count() == len(blocks) * len(blocks[0]["experts"])
    shown = [float(cells.nth(i).get_attribute("data-weight")) for i in range(cells.count())]
    assert shown == pytest.approx([w for block in blocks for w in block["experts"].values()], abs=1e-6)
    expect(page.locator("#route-lineage")).to_contain_text("medqa@1:1")

    page.check("#use-force")
    page.locator('#sliders input[data-expert="fb"]').fill("1")
    page.click("#route-button")
    expect(page.locator("#route-lineage")).to_contain_text("forced")
    forced = [float(cells.nth(i).get_attribute("data-weight")) for i in range(len(blocks[0]["experts"]))]
    assert forced == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0])

    shot = tmp_path / "catalog-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("ATMOE_TEST_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / shot.name).write_bytes(shot.read_bytes())
    expect(page.locator("#status")).to_have_text("")
    assert errors == []
