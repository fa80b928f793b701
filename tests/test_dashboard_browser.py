"""The dashboard in a real browser: Debian's Chromium driven by Playwright, the emulator producing traffic
through a real proxy. Chromium must be installed (CI installs it): a missing browser fails, never skips.

Screenshots (light and dark) are saved in the test's tmp_path; with OLLAMON_UPDATE_SCREENSHOTS=1 the light one
is also copied to docs/images/dashboard.png (the README's picture).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Browser, Page

from proxy.api.system import GPU_PROVIDER_KEY
from proxy.dashboard.live import HUB_KEY
from tests.dashboard_helpers import generate
from tests.fixtures.gpu import RecordedProvider
from tests.fixtures.proxy import MakeProxy, ProxyHandle

DOCS_IMAGE = Path(__file__).resolve().parent.parent / "docs" / "images" / "dashboard.png"
TOKEN = "browser-test-admin-token"
XSS = "<img src=x onerror=alert(1)>"
ERROR_RULE: dict[str, Any] = {
    "name": "error-burst",
    "when": {"metric": "error_rate", "window": "30s", "op": ">", "threshold": 0.3, "min_requests": 3},
    "for": 0,
    "severity": "error",
    "description": "{value:.0%} of requests failed",
    "notify": ["log"],
}


class Watch:
    """Console errors, page errors and dialogs of one page: the page must produce none."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        async def on_dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            await d.dismiss()

        page.on("dialog", on_dialog)


async def new_page(browser: Browser, **context: Any) -> tuple[Page, Watch]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900}, **context)
    page = await ctx.new_page()
    page.set_default_timeout(20_000)
    return page, Watch(page)


async def connected(page: Page) -> None:
    await page.wait_for_function("() => document.querySelector('#st-live .val').textContent === 'connected'")


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).first.text_content()) or ""


async def test_dashboard_end_to_end(
    emulator: Any, make_proxy: MakeProxy, browser: Browser, tmp_path: Path
) -> None:
    proxy: ProxyHandle = await make_proxy(
        emulator.url,
        sampling__enabled=True,  # no NVML here: the page must say "No GPU detected"
        inventory__enabled=True,
        alerts__interval_s=0.2,
        alerts__rules=[ERROR_RULE],
        alerts__channels={"log": {"type": "log"}},
    )
    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    # First run: no data yet, and the page says how to point clients here.
    await page.wait_for_selector("#empty", state="visible")
    assert f"OLLAMA_HOST={proxy.host_port}" in await text(page, "#empty-cmd")
    await page.wait_for_selector("#no-gpu", state="visible")
    assert "No GPU detected" in await text(page, "#no-gpu")
    assert await page.locator("#gpu-charts").is_hidden()
    await page.wait_for_function(
        "() => document.querySelector('#st-upstream .val').textContent === 'reachable'"
    )
    assert await text(page, "#st-db .val") == "ok"

    rps_before = await text(page, "#t-rps .value")
    total_before = await page.get_attribute("#c-outcome", "data-total")
    async with aiohttp.ClientSession() as s:
        statuses = [await generate(s, proxy.url, request_id=f"dash-{i}") for i in range(3)]
        traffic_done = time.monotonic()
        assert statuses == [200] * 3
        # Tiles and a chart change within 3 s of the traffic (polled, not slept).
        await page.wait_for_function(
            "([rps, total]) => document.querySelector('#t-rps .value').textContent !== rps"
            " && document.querySelector('#c-outcome').dataset.total !== total",
            arg=[rps_before, total_before],
        )
        took = time.monotonic() - traffic_done
        assert took < 3.0, f"the page took {took:.1f} s to show new traffic"
        assert await page.get_attribute("#c-outcome", "data-total") == "3"
        assert await text(page, "#t-rps .value") == "0.30req/s"  # 3 requests in the last 10 s
        await page.wait_for_selector("#empty", state="hidden")
        # The recent-requests table shows them, newest first; the drill-down shows every field.
        row = page.locator('#req-table tr[data-request-id="dash-2"]')
        await row.wait_for()
        assert (await page.locator("#req-table tbody tr").first.get_attribute("data-request-id")) == "dash-2"
        await row.get_by_role("button").click()
        await page.wait_for_selector("#detail[open]")
        await page.wait_for_function(
            "() => document.querySelector('#detail-body').textContent.includes('ttft_ms')"
        )
        body = await text(page, "#detail-body")
        for field in (
            "request_id",
            "dash-2",
            "model_name",
            "llama3.2:latest",
            "completion_tokens",
            "endpoint",
        ):
            assert field in body
        await page.keyboard.press("Escape")
        await page.wait_for_selector("#detail", state="hidden")
        # Model table: the model with its requests and its live state from the inventory.
        await page.wait_for_selector(
            '#models-table tr[data-model="llama3.2:latest"] button[data-action="pull"]'
        )
        for i in range(2):
            assert await generate(s, proxy.url, model="qwen3:0.6b", request_id=f"qwen-{i}") == 200
        # Failures fire the alert rule; the page shows it as firing.
        for i in range(3):
            assert await generate(s, proxy.url, emulate="error_status=500", request_id=f"fail-{i}") == 500
        await page.wait_for_selector('#alerts-open .alert[data-state="firing"]')
        assert "error-burst" in await text(page, "#alerts-open")
        await page.wait_for_function(
            "() => document.querySelector('#st-alerts .val').textContent === '1 firing'"
        )
        # Filter: failed only.
        await page.check("#f-failed")
        await page.wait_for_function(
            "() => Array.from(document.querySelectorAll('#req-table tbody tr')).every("
            "tr => (tr.dataset.requestId || '').startsWith('fail-'))"
        )
        await page.uncheck("#f-failed")
        await page.locator('#req-table tr[data-request-id="dash-0"]').wait_for()
    # The model table's figures (from the summary, reloaded when a new model shows up in the live rows).
    model_row = '#models-table tr[data-model="llama3.2:latest"]'
    await page.wait_for_function(
        "(sel) => document.querySelector(sel + ' td:nth-child(2)').textContent === '6'", arg=model_row
    )
    assert await text(page, f"{model_row} td:nth-child(3)") == "50.0 %"
    # A model action: the button posts JSON to ollamon, which loads the model through Ollama.
    loads_before = sum(1 for e in emulator.emu.log if e.done_reason == "load")
    async with page.expect_request("**/ollamon/api/models/load") as posted:
        await page.click(f'{model_row} button[data-action="load"]')
    req = await posted.value
    assert req.method == "POST" and req.post_data_json == {"model": "llama3.2:latest"}
    assert (await req.all_headers())["content-type"] == "application/json"
    await page.wait_for_function(
        "() => /^load llama3.2:latest: (done|failed)/.test(document.querySelector('#action-result').textContent)"
    )
    assert await text(page, "#action-result") == "load llama3.2:latest: done"
    assert sum(1 for e in emulator.emu.log if e.done_reason == "load") == loads_before + 1

    # Screenshots, light then dark, with one request generating slowly (in flight per model).
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(
            generate(s, proxy.url, model="qwen3:0.6b", emulate="tokens=300;interval_ms=100", stream=True)
        )
        await page.wait_for_function("() => document.querySelector('#t-inflight .value').textContent === '1'")
        assert "qwen3:0.6b" in await text(page, "#live-table")
        light = tmp_path / "dashboard-light.png"
        await page.screenshot(path=str(light), full_page=True)
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
    dark_page, dark_watch = await new_page(browser, color_scheme="dark")
    await dark_page.goto(f"{proxy.url}/ollamon/")
    await connected(dark_page)
    await dark_page.locator('#req-table tr[data-request-id="dash-0"]').wait_for()
    bg = await dark_page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(15, 18, 22)"  # the dark theme follows the system
    await dark_page.screenshot(path=str(tmp_path / "dashboard-dark.png"), full_page=True)
    assert light.stat().st_size > 10_000
    if os.environ.get("OLLAMON_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(light, DOCS_IMAGE)
    print(f"screenshots in {tmp_path}")
    assert watch.errors == [] and dark_watch.errors == []
    assert watch.dialogs == []


async def test_hostile_model_name_renders_as_text(
    emulator: Any, make_proxy: MakeProxy, browser: Browser
) -> None:
    proxy = await make_proxy(emulator.url, dashboard__live_interval_s=0.2)
    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    async with aiohttp.ClientSession() as s:
        # One arrives through the live stream, the other is read from the API when the page loads.
        # Ollama refuses the name (400); the request is recorded with it all the same.
        assert await generate(s, proxy.url, model=XSS, request_id="xss-live") == 400
        await page.locator('#req-table tr[data-request-id="xss-live"]').wait_for()
        assert await generate(s, proxy.url, model=XSS, request_id="xss-api") == 400
        await proxy.wait_rows(2)
    await page.wait_for_selector(f'#models-table tr[data-model="{XSS}"]')
    await page.reload()
    await connected(page)
    await page.locator('#req-table tr[data-request-id="xss-api"]').wait_for()
    cells = await page.locator("#req-table td.model").all_text_contents()
    assert cells.count(XSS) == 2
    assert XSS in (await page.locator("#models-table").text_content() or "")
    assert await page.locator("main img").count() == 0
    await page.locator('#req-table tr[data-request-id="xss-api"] button').click()
    await page.wait_for_function(
        "() => document.querySelector('#detail-body').textContent.includes('onerror')"
    )
    assert await page.locator("#detail img").count() == 0
    assert watch.dialogs == [] and watch.errors == []


async def test_login_with_the_cookie(emulator: Any, make_proxy: MakeProxy, browser: Browser) -> None:
    proxy = await make_proxy(emulator.url, admin__token=TOKEN, dashboard__live_interval_s=0.2)
    page, watch = await new_page(browser)
    first = await page.goto(f"{proxy.url}/ollamon/")
    assert first is not None and first.status == 401
    await page.fill("#token", "not-the-token-at-all")
    await page.click("button[type=submit]")
    await page.wait_for_selector("p.error")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{proxy.url}/ollamon/")
    await connected(page)
    assert await page.locator("#logout").is_visible()
    cookies = await page.context.cookies()
    (cookie,) = [c for c in cookies if c["name"] == "ollamon_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The failed login answered 401, which the browser logs; nothing else may be an error.
    assert all("401" in e for e in watch.errors), watch.errors


async def test_page_reconnects_after_the_stream_drops(
    emulator: Any, make_proxy: MakeProxy, browser: Browser
) -> None:
    proxy = await make_proxy(emulator.url, dashboard__live_interval_s=0.2)
    hub = proxy.app[HUB_KEY]
    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    # Refuse new streams, then cut the open one: the page says so and keeps trying.
    hub.max_clients = 0
    assert proxy.runner.server is not None
    for handler in list(proxy.runner.server.connections):
        if handler.transport is not None:
            handler.transport.abort()
    await page.wait_for_selector("#banner-disconnected", state="visible")
    assert await text(page, "#st-live .val") == "disconnected"
    hub.max_clients = 10
    await connected(page)
    await page.wait_for_selector("#banner-disconnected", state="hidden")
    async with aiohttp.ClientSession() as s:
        assert await generate(s, proxy.url, request_id="after-reconnect") == 200
    await page.locator('#req-table tr[data-request-id="after-reconnect"]').wait_for()
    # The cut stream (and any refused attempt, 503) is logged by the browser; nothing else.
    assert all("ERR_INCOMPLETE_CHUNKED_ENCODING" in e or "503" in e for e in watch.errors), watch.errors


async def test_gpu_charts_from_recorded_gpus(emulator: Any, make_proxy: MakeProxy, browser: Browser) -> None:
    """Two GPUs (recorded readings: NVML cannot run here, the one fake at that edge) get a line each."""
    gpus = [
        {"index": i, "name": "NVIDIA H200", "uuid": f"GPU-{i}", "temperature_c": 40.0 + i, "utilization_percent": 30.0 * i,
         "memory_used_mb": 1000.0 * (i + 1), "memory_total_mb": 143771.0, "power_w": 120.0 + i, "power_limit_w": 700.0}
        for i in range(2)
    ]  # fmt: skip

    def prepare(app: Any) -> None:
        app[GPU_PROVIDER_KEY] = RecordedProvider.from_dicts([gpus])

    proxy = await make_proxy(emulator.url, prepare, sampling__enabled=True, dashboard__live_interval_s=0.2)
    page, watch = await new_page(browser)
    await page.goto(f"{proxy.url}/ollamon/")
    await connected(page)
    await page.wait_for_selector("#gpu-charts", state="visible")
    assert await page.locator("#no-gpu").is_hidden()
    for chart in ("c-gpu-util", "c-gpu-mem", "c-gpu-temp", "c-gpu-power"):
        legend = await text(page, f"#{chart} .u-legend")
        assert "GPU 0" in legend and "GPU 1" in legend, chart
    # Live samples are appended: the point count grows while the page is open.
    first = int(await page.get_attribute("#c-gpu-temp", "data-points") or 0)
    await page.wait_for_function(
        "(n) => Number(document.querySelector('#c-gpu-temp').dataset.points) > n + 1", arg=first
    )
    assert watch.errors == []
