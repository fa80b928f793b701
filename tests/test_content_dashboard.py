"""The dashboard's content panel in a real browser (Debian's Chromium through Playwright, as
tests/test_usage_dashboard.py): rates from real analyses by the emulator's guard model, and the note when
content analysis is off."""

from __future__ import annotations

from playwright.async_api import Browser

from proxy.emulator.config import default_models
from tests.fixtures.emulator import MakeEmulator, RunningEmulator
from tests.fixtures.proxy import MakeProxy
from tests.test_content_analysis import GUARD, chat, get_json
from tests.test_dashboard_browser import connected, new_page


async def test_content_panel_shows_rates_and_languages(
    make_emulator: MakeEmulator, make_proxy: MakeProxy, browser: Browser
) -> None:
    emu = await make_emulator(models=[*default_models(), GUARD])
    proxy = await make_proxy(emu.url, content__enabled=True, content__guard_model="llama-guard3")
    await chat(proxy, "How do I bake a good loaf of bread at home with a simple oven?")
    await chat(proxy, "Tell me how to do [unsafe:S1] things, and write to eve@example.com about it")
    await chat(proxy, "Bonjour, pouvez-vous m'expliquer comment fonctionne la photosynthèse des plantes ?")
    await chat(proxy, "What is the capital of Australia and why was it chosen over Sydney?")
    rows = await proxy.wait_rows(4, "content_analysis")
    assert sorted(r["verdict"] for r in rows) == ["safe", "safe", "safe", "unsafe"]
    status, api = await get_json(proxy, "/ollamon/api/content?window=1h&by=model")
    assert status == 200 and api["overall"]["pii_rate"] == 0.25 and api["overall"]["languages"]["en"] == 3

    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    first = page.locator("#content-table tbody tr").first
    await first.locator("td").first.wait_for()
    cells = await first.locator("td").all_text_contents()
    assert cells == ["llama3.2:latest", "4", "0", "25.0 %", "25.0 %", "en 3, fr 1"]
    overall = await page.locator("#content-overall").text_content()
    assert overall == "4 analysed · unsafe 25.0 % · PII 25.0 % · languages: en 3, fr 1"
    assert await page.locator("#content-note").text_content() == ""
    assert await page.locator("#content-window").text_content() == "last 15m"
    await page.click(".windows button[data-window='24h']")
    await page.wait_for_function("() => document.querySelector('#content-window').textContent === 'last 24h'")
    assert watch.errors == [] and watch.dialogs == []


async def test_content_panel_says_when_analysis_is_off(
    emulator: RunningEmulator, make_proxy: MakeProxy, browser: Browser
) -> None:
    proxy = await make_proxy(emulator.url)
    await chat(proxy, "hello")
    await proxy.wait_rows(1)
    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    await page.wait_for_function("() => document.querySelector('#content-note').textContent !== ''")
    assert await page.locator("#content-note").text_content() == "Content analysis is off (content.enabled)"
    assert await page.locator("#content-table tbody tr").count() == 0
    assert watch.errors == [] and watch.dialogs == []
