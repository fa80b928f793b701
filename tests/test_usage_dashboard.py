"""The dashboard's usage panel in a real browser (Debian's Chromium through Playwright, as
tests/test_dashboard_browser.py): figures from real recorded requests, a hostile user id shown as text."""

from __future__ import annotations

import aiohttp
import pytest
from playwright.async_api import Browser

from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy
from tests.test_dashboard_browser import XSS, connected, new_page


async def test_usage_panel_shows_cost_per_model_and_user(
    emulator: RunningEmulator, make_proxy: MakeProxy, browser: Browser
) -> None:
    prices = [{"model": "llama3*", "input_per_1m": 1000.0, "output_per_1m": 2000.0}]
    proxy = await make_proxy(emulator.url, usage__prices=prices)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with aiohttp.ClientSession() as s:
        for user in ("alice", XSS):
            headers = {"X-User-Id": user, "X-Emulate": "tokens=10"}
            async with s.post(f"{proxy.url}/api/chat", json=body, headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
    rows = await proxy.wait_rows(2)
    cost = sum(r["prompt_tokens"] * 1000.0 + r["completion_tokens"] * 2000.0 for r in rows) / 1e6
    assert cost == pytest.approx(sum(r["cost_usd"] for r in rows))

    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    first = page.locator("#usage-table tbody tr").first
    await first.locator("td").first.wait_for()
    cells = await first.locator("td").all_text_contents()
    assert cells[0] == "llama3.2:latest" and cells[1] == "2"
    expected = f"${cost:,.4f}" if cost < 1 else f"${cost:,.2f}"
    assert cells[6] == expected, (cells, cost)
    total = await page.locator("#usage-table tbody tr.total td").all_text_contents()
    assert total[0] == "Total" and total[1] == "2"

    await page.select_option("#usage-by", "user")
    await page.wait_for_function("() => document.querySelector('#usage-group').textContent === 'User'")
    names = await page.locator("#usage-table tbody tr td:first-child").all_text_contents()
    assert sorted(names) == sorted(["alice", XSS, "Total"])
    assert await page.locator("#usage-table img").count() == 0  # shown as text, never as markup
    assert watch.errors == [] and watch.dialogs == []
