"""Several Ollama hosts through the real proxy (issue 16): three emulators as upstreams, real HTTP on loopback,
records read back from the real SQLite file.

A model loaded on one host is routed there and its rows say so; killing a host mid-run loses no request that
had not started streaming, and the streams already running on it are recorded as cut; /api/tags and /api/ps
are the union (read by the official ollama client); management calls go where ``upstreams.management`` says;
with one upstream, rows carry its name and nothing else changes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import ollama
import pytest

from proxy.emulator import ModelSpec
from proxy.emulator.config import default_models
from proxy.keys import FORWARDER_KEY, HOSTS_KEY
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.fixtures.upstream_hosts import EmulatorHost, StartHosts
from tests.polling import until

pytestmark = pytest.mark.timeout(180)


def served(host: EmulatorHost, path: str = "/api/generate") -> int:
    assert host.emu is not None
    return sum(1 for e in host.emu.log if e.path == path)


async def routed_proxy(make_proxy: MakeProxy, hosts: list[EmulatorHost], **overrides: Any) -> ProxyHandle:
    """The proxy in front of ``hosts``, named a, b, c ... (server.upstream points nowhere: never used)."""
    entries = [{"url": h.url, "name": "abcdefgh"[i]} for i, h in enumerate(hosts)]
    values = {"upstreams__hosts": entries, "upstreams__check_interval_s": 60.0, **overrides}
    return await make_proxy("http://127.0.0.1:9", **values)


async def generate(
    session: aiohttp.ClientSession, url: str, model: str = "llama3.2", stream: bool = False
) -> aiohttp.ClientResponse:
    return await session.post(f"{url}/api/generate", json={"model": model, "prompt": "hi", "stream": stream})


def errors_by_request(proxy: ProxyHandle) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in proxy.rows("error_metrics")}


async def test_a_model_loaded_on_one_host_is_routed_there(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    a, b, c = await emulator_hosts(3)
    async with aiohttp.ClientSession() as session:
        async with await generate(session, b.url) as resp:  # loads llama3.2 on B only, behind the proxy
            assert resp.status == 200
        proxy = await routed_proxy(make_proxy, [a, b, c])
        pool = proxy.app[HOSTS_KEY]
        await until(lambda: pool.by_name["b"].loaded == {"llama3.2:latest"}, 30, "B's /api/ps seen")
        assert not pool.by_name["a"].loaded and not pool.by_name["c"].loaded
        for _ in range(6):  # sequential: every host idle each time, yet the loaded copy wins
            async with await generate(session, proxy.url, "Llama3.2") as resp:
                assert resp.status == 200 and (await resp.json())["done"] is True
        rows = await proxy.wait_rows(6)
    assert [r["upstream"] for r in rows] == ["b"] * 6
    assert served(b) == 7 and served(a) == served(c) == 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/v1/models/llama3.2") as resp:  # routed by the model in the path
            assert resp.status == 200 and (await resp.json())["id"] == "llama3.2"
    assert b.emu is not None and b.emu.log[-1].path == "/v1/models/llama3.2"
    health = await _health(proxy)
    # server.upstream points nowhere: health and readiness ask the pool, whose hosts are all up.
    assert health["status"] == "ok" and health["upstream"]["hosts_up"] == 3
    assert [h["name"] for h in health["upstreams"]["hosts"]] == ["a", "b", "c"]
    assert health["upstreams"]["hosts"][1]["loaded"] == ["llama3.2:latest"]
    assert health["upstreams"]["hosts"][1]["requests"] == 7
    for host in (a, b, c):
        await host.stop()
    await pool.check_now()
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/ollamon/ready") as resp:
        assert resp.status == 503 and "unreachable" in (await resp.json())["reasons"][0]


async def _health(proxy: ProxyHandle) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/ollamon/health") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_killing_a_host_mid_run_loses_no_request_that_had_not_started_streaming(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    """Streams run on A (the model is loaded there only); A dies; every request that had received no byte
    yet is retried on B and completes; the streams that were running on A are cut, and recorded as cut."""
    a, b = await emulator_hosts(2, token_interval_s=0.05, default_tokens=60, num_parallel=32)
    async with aiohttp.ClientSession() as session:
        async with await generate(session, a.url) as resp:
            assert resp.status == 200
        proxy = await routed_proxy(make_proxy, [a, b])
        pool = proxy.app[HOSTS_KEY]
        await until(lambda: bool(pool.by_name["a"].loaded), 30, "A's /api/ps seen")
        outcomes: list[tuple[str, bool, str]] = []  # (request id, got a first byte before the kill, done|cut)
        killed = asyncio.Event()
        started: list[str] = []  # requests whose first line has reached the client

        async def one() -> None:
            early = False
            lines: list[bytes] = []
            async with await generate(session, proxy.url, stream=True) as resp:
                rid = resp.headers["X-Request-Id"]
                assert resp.status == 200
                try:
                    async for line in resp.content:
                        if not lines:
                            early = not killed.is_set()
                            started.append(rid)
                        lines.append(line)
                except aiohttp.ClientError:
                    pass
            done = bool(lines) and b'"done":true' in lines[-1]
            outcomes.append((rid, early, "done" if done else "cut"))

        first = [asyncio.ensure_future(one()) for _ in range(6)]
        await until(lambda: len(started) == 6, 60, "six streams running on A")
        assert pool.by_name["a"].outstanding == 6
        await a.kill()
        killed.set()
        later = [asyncio.ensure_future(one()) for _ in range(12)]  # A is still "up": these go to it first
        await asyncio.wait_for(asyncio.gather(*first, *later), 120)
        rows = await proxy.wait_rows(18)
    assert len(outcomes) == 18
    by_id = {r["request_id"]: r for r in rows}
    errors = errors_by_request(proxy)
    cut = [rid for rid, _, o in outcomes if o == "cut"]
    assert len(cut) == 6 and all(early for rid, early, o in outcomes if o == "cut"), outcomes
    for rid in cut:  # the streams already running on A: recorded as cut by A
        assert by_id[rid]["upstream"] == "a" and by_id[rid]["success"] == 0
        assert errors[rid]["error_type"] == "upstream_closed" and errors[rid]["upstream"] == "a"
    for rid, _, o in outcomes:
        if o == "done":  # every request that had not started streaming: retried on B, complete
            assert by_id[rid]["upstream"] == "b" and by_id[rid]["success"] == 1, by_id[rid]
    assert sum(1 for _, _, o in outcomes if o == "done") == 12
    assert pool.by_name["a"].request_failures >= 6 and all(h.outstanding == 0 for h in pool.hosts)


async def test_tags_and_ps_are_the_union_of_all_hosts(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    c_models = [ModelSpec(name="mistral:7b", family="mistral")]
    a, b, c = await emulator_hosts(3, per_host=[{}, {"models": default_models()[1:]}, {"models": c_models}])
    async with aiohttp.ClientSession() as session:
        for host, model in ((a, "llama3.2"), (c, "mistral:7b")):
            async with await generate(session, host.url, model) as resp:
                assert resp.status == 200
        proxy = await routed_proxy(make_proxy, [a, b, c])
        client = ollama.AsyncClient(host=proxy.url)
        await _union_checks(session, client, proxy, a, b, c)
        await client.close()  # type: ignore[no-untyped-call]


async def _union_checks(
    session: aiohttp.ClientSession,
    client: ollama.AsyncClient,
    proxy: ProxyHandle,
    a: EmulatorHost,
    b: EmulatorHost,
    c: EmulatorHost,
) -> None:
    tags = await client.list()
    names = [m.model for m in tags.models]
    singles: list[str] = []
    for host in (a, b, c):
        async with session.get(f"{host.url}/api/tags") as resp:
            singles += [m["name"] for m in (await resp.json())["models"] if m["name"] not in singles]
    assert names == singles and "mistral:7b" in names and len(names) == len(set(names))
    ps = await client.ps()
    assert sorted(str(m.model) for m in ps.models) == ["llama3.2:latest", "mistral:7b"]
    async with session.head(f"{proxy.url}/api/tags") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with session.get(f"{proxy.url}/api/tags") as resp:
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert "Server" not in resp.headers and json.loads(await resp.read())["models"]
    # One host down: it is left out, the union still answers.
    await b.stop()
    assert [m.model for m in (await client.list()).models] == [
        n for n in singles if n in {m["name"] for m in await _tags(session, a, c)}
    ]


async def _tags(session: aiohttp.ClientSession, *hosts: EmulatorHost) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for host in hosts:
        async with session.get(f"{host.url}/api/tags") as resp:
            out += (await resp.json())["models"]
    return out


async def test_management_calls_go_where_configured(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    a, b, c = await emulator_hosts(3)
    named = await routed_proxy(make_proxy, [a, b, c], upstreams__management="c")
    client = ollama.AsyncClient(host=named.url)
    await client.delete("qwen3:0.6b")
    assert [served(h, "/api/delete") for h in (a, b, c)] == [0, 0, 1]
    assert c.emu is not None and "qwen3:0.6b" not in c.emu.installed
    progress = [p async for p in await client.pull("qwen3:0.6b", stream=True)]
    assert progress[-1].status == "success" and [served(h, "/api/pull") for h in (a, b, c)] == [0, 0, 1]
    await client.close()  # type: ignore[no-untyped-call]
    await named.stop()

    every = await routed_proxy(make_proxy, [a, b, c])
    client = ollama.AsyncClient(host=every.url)
    await client.delete("qwen3:0.6b")  # on every host at once
    assert [served(h, "/api/delete") for h in (a, b, c)] == [1, 1, 2]
    assert a.emu is not None and b.emu is not None
    assert all("qwen3:0.6b" not in h.emu.installed for h in (a, b, c) if h.emu is not None)
    progress = [p async for p in await client.pull("qwen3:0.6b", stream=True)]
    assert progress[-1].status == "success" and [served(h, "/api/pull") for h in (a, b, c)] == [1, 1, 2]
    assert all("qwen3:0.6b" in h.emu.installed for h in (a, b, c) if h.emu is not None)
    # One host fails: the client gets that host's status, its error named (C no longer has llama3.2).
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{c.url}/api/delete", json={"model": "llama3.2"}) as resp:
            assert resp.status == 200
    with pytest.raises(ollama.ResponseError) as err:
        await client.delete("llama3.2")
    await client.close()  # type: ignore[no-untyped-call]
    assert err.value.status_code == 404
    assert err.value.error == "c: model 'llama3.2' not found"
    assert all("llama3.2:latest" not in h.emu.installed for h in (a, b) if h.emu is not None)


async def test_with_one_upstream_rows_carry_its_name_and_nothing_else_changes(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url)
    name = emulator.url.removeprefix("http://")
    assert proxy.app[HOSTS_KEY].single and proxy.app[HOSTS_KEY].hosts[0].name == name
    assert proxy.app[FORWARDER_KEY].routed is None  # the single-upstream path, unchanged
    async with aiohttp.ClientSession() as session:
        async with await generate(session, proxy.url) as resp:
            assert resp.status == 200
        async with session.get(f"{proxy.url}/api/tags") as resp:
            relayed = await resp.read()
        async with session.get(f"{emulator.url}/api/tags") as resp:
            direct = await resp.read()
    assert relayed == direct  # relayed byte for byte, not merged
    (row,) = await proxy.wait_rows(1)
    assert row["upstream"] == name
    health = await _health(proxy)
    assert "upstreams" not in health and health["forwarding"]["upstream_connects"] >= 1
    assert proxy.app[HOSTS_KEY].rounds == 0  # no health checks for a pool of one


async def test_one_unreachable_upstream_is_named_in_its_error_row(make_proxy: MakeProxy) -> None:
    from tests.fixtures.ports import free_port

    port = free_port()
    proxy = await make_proxy(f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/api/version") as resp:
        assert resp.status == 502
    (err,) = await proxy.wait_rows(1, "error_metrics")
    assert err["error_type"] == "upstream_unreachable" and err["upstream"] == f"127.0.0.1:{port}"


async def test_a_pull_to_every_host_streams_the_first_hosts_progress_and_names_a_failing_host(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    """B pulls slowly; C's registry lacks the model. The client sees A's progress at once, and a last line
    that waits for B and C and names C (a 200 stream ending in an error, as Ollama ends a failed pull)."""
    c_models = [ModelSpec(name="mistral:7b", family="mistral")]
    a, b, c = await emulator_hosts(3, per_host=[{}, {"pull_step_s": 0.25}, {"models": c_models}])
    proxy = await routed_proxy(make_proxy, [a, b, c])
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/api/pull", json={"model": "qwen3:0.6b"}) as resp,
    ):
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/x-ndjson"
        lines: list[tuple[float, dict[str, Any]]] = []
        async for line in resp.content:
            lines.append((loop.time(), json.loads(line)))
    assert [served(h, "/api/pull") for h in (a, b, c)] == [1, 1, 1]
    assert lines[-1][1] == {"error": "c: pull model manifest: file does not exist"}
    assert len(lines) > 2 and all("status" in doc for _, doc in lines[:-1])
    # Live: A's progress came before B's slow pull had ended, so well before the held last line.
    assert lines[-1][0] - lines[0][0] >= 0.5
    assert b.emu is not None and "qwen3:0.6b" in b.emu.installed


async def test_a_5xx_before_the_first_byte_is_retried_once_and_the_last_answer_relayed_as_sent(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    a, b = await emulator_hosts(2)
    fail = {"X-Emulate": "error_status=503; error_message=server busy", "X-Request-Id": "busy-1"}
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{b.url}/api/generate", json=body, headers=fail) as resp:
            direct = (resp.status, await resp.read())
        proxy = await routed_proxy(make_proxy, [a, b])
        async with session.post(f"{proxy.url}/api/generate", json=body, headers=fail) as resp:
            assert (resp.status, await resp.read()) == direct == (503, b'{"error":"server busy"}')
        # Both hosts were asked once: the first failed before any byte, so the other got the retry.
        assert served(a) + served(b) == 3 and served(a) >= 1 and served(b) >= 2
        (row,) = await proxy.wait_rows(1)
        assert row["status_code"] == 503 and row["upstream"] in ("a", "b")
        pool = proxy.app[HOSTS_KEY]
        assert sum(h.request_failures for h in pool.hosts) == 2 and all(
            h.outstanding == 0 for h in pool.hosts
        )
        # upstreams.retry off: one host, one attempt.
        once = await routed_proxy(make_proxy, [a, b], upstreams__retry=False)
        async with session.post(f"{once.url}/api/generate", json=body, headers=fail) as resp:
            assert resp.status == 503
        assert served(a) + served(b) == 4


async def test_the_analytics_api_filters_by_upstream(
    emulator_hosts: StartHosts, make_proxy: MakeProxy
) -> None:
    """Per-upstream figures: ``upstream=`` on the summary, the time series and the recent requests."""
    a, b = await emulator_hosts(2)
    proxy = await routed_proxy(make_proxy, [a, b])
    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # two idle hosts with the model installed: shared one at a time
            async with await generate(session, proxy.url) as resp:
                assert resp.status == 200
        rows = await proxy.wait_rows(4)
        counts = {name: sum(1 for r in rows if r["upstream"] == name) for name in ("a", "b")}
        assert counts == {"a": 2, "b": 2}
        api = f"{proxy.url}/ollamon/api"
        for name in ("a", "b"):
            async with session.get(f"{api}/summary", params={"window": "1h", "upstream": name}) as resp:
                body = await resp.json()
            assert resp.status == 200, body
            assert body["filters"]["upstream"] == name and body["exact"] is True
            assert body["overall"]["requests"] == counts[name]
            async with session.get(f"{api}/requests", params={"upstream": name}) as resp:
                listed = (await resp.json())["requests"]
            assert [r["upstream"] for r in listed] == [name] * counts[name]
            params = {"window": "1h", "upstream": name, "metric": "requests", "bucket": "1h"}
            async with session.get(f"{api}/timeseries", params=params) as resp:
                assert resp.status == 200
        params = {"window": "1h", "upstream": "a", "exact": "false"}
        async with session.get(f"{api}/summary", params=params) as resp:
            assert resp.status == 400 and "upstream" in (await resp.json())["error"]
