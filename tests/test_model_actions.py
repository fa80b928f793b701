"""Model actions (proxy/api/model_actions.py) against the emulator: what Ollama really did, what was recorded."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.api.model_input import ActionError, keep_alive_value
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy, ProxyHandle

JSON = {"Content-Type": "application/json"}


async def call(
    s: aiohttp.ClientSession,
    proxy: ProxyHandle,
    action: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with s.post(f"{proxy.url}/ollamon/api/models/{action}", data=data, headers=headers or JSON) as r:
        return r.status, orjson.loads(await r.read())


async def ps(s: aiohttp.ClientSession, emulator: Any) -> dict[str, dict[str, Any]]:
    async with s.get(f"{emulator.url}/api/ps") as r:
        return {m["name"]: m for m in (await r.json())["models"]}


async def pulls(s: aiohttp.ClientSession, proxy: ProxyHandle) -> dict[str, dict[str, Any]]:
    async with s.get(f"{proxy.url}/ollamon/api/models/pulls") as r:
        assert r.status == 200
        return {p["model"]: p for p in (await r.json())["pulls"]}


def action_events(proxy: ProxyHandle) -> list[dict[str, Any]]:
    return proxy.rows("model_events", "source = 'action'")


async def eventually(
    check: Callable[[], Awaitable[Any]], within: float = 20.0, what: str = "condition"
) -> Any:
    """Await ``check()`` until it returns something true; return that (AssertionError after ``within`` s)."""
    deadline = time.monotonic() + within
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within:g} s")
        await asyncio.sleep(0.05)
    return result


async def test_load_keep_unload_change_what_ollama_has_loaded(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        assert "llama3.2:latest" not in await ps(s, emulator)
        status, body = await call(s, proxy, "load", {"model": "llama3.2"})
        assert (status, body) == (200, {"ok": True, "model": "llama3.2", "action": "load"})
        assert "llama3.2:latest" in await ps(s, emulator)

        before = dt.datetime.now(dt.UTC)
        status, body = await call(s, proxy, "keep", {"model": "llama3.2", "keep_alive": "30m"})
        assert status == 200 and body["keep_alive"] == "30m"
        expires = dt.datetime.fromisoformat((await ps(s, emulator))["llama3.2:latest"]["expires_at"])
        assert dt.timedelta(minutes=29) < expires - before < dt.timedelta(minutes=31)

        status, _ = await call(s, proxy, "keep", {"model": "llama3.2", "keep_alive": 90})
        expires = dt.datetime.fromisoformat((await ps(s, emulator))["llama3.2:latest"]["expires_at"])
        assert status == 200 and dt.timedelta(seconds=60) < expires - before < dt.timedelta(seconds=120)

        status, _ = await call(s, proxy, "keep", {"model": "llama3.2", "keep_alive": -1})
        expires = dt.datetime.fromisoformat((await ps(s, emulator))["llama3.2:latest"]["expires_at"])
        assert status == 200 and expires - before > dt.timedelta(days=3650)  # forever

        status, body = await call(s, proxy, "unload", {"model": "llama3.2"})
        assert (status, body) == (200, {"ok": True, "model": "llama3.2", "action": "unload"})
        assert "llama3.2:latest" not in await ps(s, emulator)

    # What Ollama received: the bodies the contract names, with no prompt.
    calls = [e for e in emulator.emu.log if e.path == "/api/generate"]
    assert [e.done_reason for e in calls] == ["load", "load", "load", "load", "unload"]
    await proxy.wait_rows(5, "model_events")
    rows = action_events(proxy)
    assert [r["event"] for r in rows] == ["load", "keep_alive", "keep_alive", "keep_alive", "unload"]
    assert {r["model_name"] for r in rows} == {"llama3.2:latest"}
    details = [orjson.loads(r["detail"]) for r in rows]
    assert all(d["client"] == "127.0.0.1" for d in details)
    assert [d.get("keep_alive") for d in details[1:4]] == ["30m", 90, -1]
    # ollamon's own calls are not users' requests: nothing was recorded as an inference.
    assert proxy.rows() == []


async def test_pull_known_and_unknown_models(emulator: Any, make_proxy: MakeProxy) -> None:
    assert emulator.emu.uninstall("qwen3:0.6b")
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, proxy, "pull", {"model": "qwen3:0.6b"})
        assert (status, body) == (202, {"ok": True, "status": "started", "model": "qwen3:0.6b"})
        status, _ = await call(s, proxy, "pull", {"model": "no-such-model"})
        assert status == 202  # Ollama answers 200 and reports the error in its progress stream

        async def both_done() -> dict[str, dict[str, Any]] | None:
            seen = await pulls(s, proxy)
            done = all(seen[m]["status"] != "running" for m in ("qwen3:0.6b", "no-such-model"))
            return seen if done else None

        seen = await eventually(both_done, what="both pulls finished")
        ok, bad = seen["qwen3:0.6b"], seen["no-such-model"]
        assert ok["status"] == "success" and ok["error"] is None and ok["last_status"] == "success"
        spec = emulator.emu.catalogue["qwen3:0.6b"]
        assert ok["total"] == ok["completed"] == spec.size and ok["percent"] == 100.0
        assert ok["digest"] == f"sha256:{spec.digest}"
        assert emulator.emu.resolve("qwen3:0.6b") is not None  # really installed again
        assert bad["status"] == "failed" and bad["error"] == "pull model manifest: file does not exist"

    rows = await proxy.wait_rows(4, "model_events")
    by = {(r["model_name"], r["event"]): orjson.loads(r["detail"]) for r in rows if r["source"] == "action"}
    assert set(by) == {
        ("qwen3:0.6b", "pull_started"),
        ("qwen3:0.6b", "pull_done"),
        ("no-such-model:latest", "pull_started"),
        ("no-such-model:latest", "pull_failed"),
    }
    assert by[("no-such-model:latest", "pull_failed")]["error"] == "pull model manifest: file does not exist"
    assert by[("qwen3:0.6b", "pull_done")]["digest"] == ok["digest"]


async def test_a_second_pull_of_the_same_model_is_refused(make_emulator: Any, make_proxy: MakeProxy) -> None:
    emulator = await make_emulator(pull_step_s=0.3)  # a pull takes about 2.7 s
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        assert (await call(s, proxy, "pull", {"model": "llama3.2"}))[0] == 202
        status, body = await call(s, proxy, "pull", {"model": "Llama3.2:latest"})  # the same model
        assert status == 409 and "already running" in body["error"]
        assert body["pull"]["status"] == "running"
        listed = await pulls(s, proxy)
        assert listed["llama3.2"]["status"] == "running"

        async def finished() -> dict[str, Any] | None:
            p = (await pulls(s, proxy))["llama3.2"]
            return p if p["status"] != "running" else None

        assert (await eventually(finished, within=30))["status"] == "success"
        assert emulator.emu.resolve("llama3.2") is not None
        assert (await call(s, proxy, "pull", {"model": "llama3.2"}))[0] == 202  # finished: may pull again


@pytest.mark.parametrize(
    ("body", "headers", "status", "text"),
    [
        ({"model": "llama3.2"}, {"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
        (b"model=llama3.2", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        (b"{nope", JSON, 400, "not JSON"),
        ([1, 2], JSON, 400, "JSON object"),
        ({}, JSON, 400, "model is required"),
        ({"model": " "}, JSON, 400, "model is required"),
        ({"model": 7}, JSON, 400, "model is required"),
        ({"model": "x" * 351}, JSON, 400, "longer than 350"),
        ({"model": "llama\x1b]0;pwned\x07"}, JSON, 400, "control characters"),
        ({"model": "llama\u202e3.2"}, JSON, 400, "control characters"),
        ({"model": "llama3.2", "prompt": "hi"}, JSON, 400, "unknown field 'prompt'"),
    ],
)
async def test_bad_requests(
    emulator: Any, make_proxy: MakeProxy, body: Any, headers: dict[str, str], status: int, text: str
) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        for action in ("unload", "load", "pull"):
            got, answer = await call(s, proxy, action, body, headers)
            assert got == status and text in answer["error"], (action, answer)
    assert [e for e in emulator.emu.log if e.path in ("/api/generate", "/api/pull")] == []


@pytest.mark.parametrize("value", ["30", "abc", "1d", "-5m", "", True, None, -5, 1.5e300, [1]])
def test_keep_alive_values_refused(value: Any) -> None:
    with pytest.raises(ActionError) as err:
        keep_alive_value(value)
    assert err.value.status == 400


@pytest.mark.parametrize("value", ["30m", "1h", "90s", "1h30m", "1.5h", "0", 0, 3600, 2.5, -1])
def test_keep_alive_values_taken(value: Any) -> None:
    assert keep_alive_value(value) == value


async def test_keep_needs_a_valid_keep_alive(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, proxy, "keep", {"model": "llama3.2"})
        assert status == 400 and "keep_alive is required" in body["error"]
        status, body = await call(s, proxy, "keep", {"model": "llama3.2", "keep_alive": "5 minutes"})
        assert status == 400 and "not a duration" in body["error"]


async def test_upstream_errors_are_502_with_ollamas_text(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        status, body = await call(s, proxy, "load", {"model": "mistyped-model"})
        assert status == 502 and body == {"error": "model 'mistyped-model' not found", "upstream_status": 404}
        status, body = await call(s, proxy, "load", {"model": "bad name with spaces"})
        assert status == 502 and body == {"error": "invalid model name", "upstream_status": 400}
    assert action_events(proxy) == []  # nothing Ollama did: no event

    dead = await make_proxy(f"http://127.0.0.1:{free_port()}")
    async with aiohttp.ClientSession() as s:
        for action in ("unload", "load", "pull"):
            status, body = await call(s, dead, action, {"model": "llama3.2"})
            assert status == 502 and "cannot reach Ollama at" in body["error"], body
        assert (await pulls(s, dead))["llama3.2"]["status"] == "failed"
    rows = await dead.wait_rows(2, "model_events")
    assert [r["event"] for r in rows] == ["pull_started", "pull_failed"]


async def test_admin_token_guards_the_actions(emulator: Any, make_proxy: MakeProxy) -> None:
    token = "t" * 24
    proxy = await make_proxy(emulator.url, admin__token=token)
    auth = {**JSON, "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        for action in ("load", "unload", "pull"):
            assert (await call(s, proxy, action, {"model": "llama3.2"}))[0] == 401
        for path in ("models/pulls", "live/models"):
            async with s.get(f"{proxy.url}/ollamon/api/{path}") as r:
                assert r.status == 401
            async with s.get(f"{proxy.url}/ollamon/api/{path}", headers=auth) as r:
                assert r.status == 200
        assert [e for e in emulator.emu.log if e.path == "/api/generate"] == []
        assert (await call(s, proxy, "load", {"model": "llama3.2"}, auth))[0] == 200
        assert (await call(s, proxy, "unload", {"model": "llama3.2"}, auth))[0] == 200


async def test_inventory_sees_the_action_soon(emulator: Any, make_proxy: MakeProxy) -> None:
    # The inventory would poll /api/ps only every 300 s: the action asks it to poll now.
    proxy = await make_proxy(emulator.url, inventory__enabled=True, inventory__ps_interval_s=300)
    async with aiohttp.ClientSession() as s:

        async def models() -> dict[str, Any]:
            async with s.get(f"{proxy.url}/ollamon/api/models") as r:
                return dict(await r.json())

        assert not {m["model_name"]: m for m in (await models())["models"]}["llama3.2:latest"]["loaded"]
        assert (await call(s, proxy, "load", {"model": "llama3.2"}))[0] == 200

        async def loaded() -> dict[str, Any] | None:
            state = await models()
            return (
                state if {m["model_name"]: m for m in state["models"]}["llama3.2:latest"]["loaded"] else None
            )

        state = await eventually(loaded, what="the inventory shows llama3.2 loaded")
        info = {m["model_name"]: m for m in state["models"]}["llama3.2:latest"]
        assert (
            info["loaded"]
            and info["size_vram_bytes"] == (await ps(s, emulator))["llama3.2:latest"]["size_vram"]
        )
        events = [(e["event"], e["source"]) for e in state["events"]]
        assert ("load", "action") in events and ("load", "ps") in events
        action = next(e for e in state["events"] if e["source"] == "action")
        assert action["model_version"] == info["model_version"]  # the digest the inventory knows


async def test_live_models_counts_requests_in_flight(make_emulator: Any, make_proxy: MakeProxy) -> None:
    emulator = await make_emulator(num_parallel=1)
    proxy = await make_proxy(emulator.url, inventory__num_parallel=1)
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 200}}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/ollamon/api/live/models") as r:
            assert await r.json() == {}
        first_token = asyncio.Event()

        async def hold(first: bool) -> None:
            headers = {"X-Emulate": "interval_ms=40"}
            async with s.post(f"{proxy.url}/api/generate", json=body, headers=headers) as r:
                await r.content.readline()
                if first:
                    first_token.set()
                await r.read()

        tasks = [asyncio.ensure_future(hold(True))]
        await asyncio.wait_for(first_token.wait(), 20)  # the first request is generating
        tasks.append(asyncio.ensure_future(hold(False)))  # the second waits for the only slot

        async def both_live() -> dict[str, Any] | None:
            async with s.get(f"{proxy.url}/ollamon/api/live/models") as r:
                live = dict(await r.json())
            return live if live.get("llama3.2:latest", {}).get("in_flight") == 2 else None

        live = await eventually(both_live, what="two requests in flight")
        in_emulator = [e for e in emulator.emu.log if not e.finished and e.path == "/api/generate"]
        assert len(in_emulator) == 2 and sum(bool(e.token_times) for e in in_emulator) == 1
        assert live == {
            "llama3.2:latest": {"in_flight": 2, "generating": 1, "waiting": 1, "loading": 0, "queued": 1}
        }
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_no_cross_site_way_in(emulator: Any, make_proxy: MakeProxy) -> None:
    """A page elsewhere cannot act: its form cannot send JSON, and a preflight is never granted."""
    proxy = await make_proxy(emulator.url)
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with aiohttp.ClientSession() as s:
        async with s.options(f"{proxy.url}/ollamon/api/models/unload", headers=preflight) as r:
            assert r.status >= 400
            assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        # A form post (a "simple" request a browser sends cross-site without asking) is refused.
        status, _ = await call(s, proxy, "unload", b"model=llama3.2", {"Content-Type": "text/plain"})
        assert status == 415
        status, body = await call(s, proxy, "load", {"model": "x" * 20_000})
        assert status == 413 and "larger than" in body["error"]
    assert [e for e in emulator.emu.log if e.path == "/api/generate"] == []


async def test_a_pull_running_at_shutdown_is_recorded_as_failed(
    make_emulator: Any, make_proxy: MakeProxy
) -> None:
    emulator = await make_emulator(pull_step_s=2.0)  # a pull would take 18 s
    proxy = await make_proxy(emulator.url)
    async with aiohttp.ClientSession() as s:
        assert (await call(s, proxy, "pull", {"model": "llama3.2"}))[0] == 202
    await proxy.stop()  # the writer drains after the pull task recorded its end
    rows = action_events(proxy)
    assert [r["event"] for r in rows] == ["pull_started", "pull_failed"]
    assert orjson.loads(rows[1]["detail"])["error"] == "cancelled: ollamon stopped"
