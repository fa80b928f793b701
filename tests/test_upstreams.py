"""Several Ollama hosts (issue 16): three real emulators as upstreams, real HTTP on loopback.

Routing prefers the host with the model loaded, then installed; active checks and passive failures eject a
killed host and let it back; weights and least-outstanding spread load; the retry rule; the /api/tags and
/api/ps unions against the emulators' real answers (parsed by the official ollama client's models); config
errors name file, key and reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ollama import ListResponse, ProcessResponse

from proxy.config import load_config
from proxy.emulator import ModelSpec
from proxy.emulator.config import default_models
from proxy.errors import ConfigError
from proxy.upstream_url import Upstream
from proxy.upstreams import (
    FailedBeforeFirstByte,
    Host,
    HostPool,
    HostSpec,
    NoUpstreamError,
    Outcome,
    PoolSettings,
    is_management,
    may_retry,
    send_with_retry,
)
from tests.fixtures.upstream_hosts import EmulatorHost, StartHosts
from tests.polling import until

pytestmark = pytest.mark.timeout(120)

OTHER_DIGEST = "b" * 64
DISPOSED: list[str] = []  # hosts whose failed answer send_with_retry disposed of before retrying


class FakeClock:
    """Monotonic time a test moves by hand, so cooldowns need no sleeping on a busy machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def settings_for(hosts: Sequence[EmulatorHost], weights: Sequence[float] = (), **kwargs: Any) -> PoolSettings:
    specs = tuple(
        HostSpec(name="abcdefgh"[i], upstream=Upstream.parse(h.url), weight=weights[i] if weights else 1.0)
        for i, h in enumerate(hosts)
    )
    return PoolSettings(hosts=specs, **{"check_timeout_s": 10.0, **kwargs})


async def three(emulator_hosts: StartHosts) -> list[EmulatorHost]:
    """A: the default catalogue. B: llama3.2 under another digest, and qwen3. C: only mistral:7b."""
    b_models = [ModelSpec(name="llama3.2:latest", digest=OTHER_DIGEST), default_models()[1]]
    return await emulator_hosts(
        3, per_host=[{}, {"models": b_models}, {"models": [ModelSpec(name="mistral:7b", family="mistral")]}]
    )


async def generate(session: aiohttp.ClientSession, host: Host, model: str = "llama3.2") -> dict[str, Any]:
    """A non-streamed /api/generate on ``host``; failures before an answer raise FailedBeforeFirstByte."""
    up = host.upstream
    try:
        async with session.post(
            up.url_for("/api/generate", ""),
            json={"model": model, "prompt": "hi", "stream": False},
            headers={"Host": up.host_header},
        ) as resp:
            if resp.status >= 500:
                raise FailedBeforeFirstByte(
                    f"HTTP {resp.status}",
                    status=resp.status,
                    answer=await resp.read(),  # the host's own bytes, for the client if no retry follows
                    dispose=lambda: DISPOSED.append(host.name),
                )
            data: dict[str, Any] = await resp.json()
            return data
    except aiohttp.ClientConnectionError as exc:
        raise FailedBeforeFirstByte(f"{type(exc).__name__}: {exc}") from exc


def served(host: EmulatorHost, path: str = "/api/generate") -> int:
    assert host.emu is not None
    return sum(1 for e in host.emu.log if e.path == path)


# -- model-aware routing -------------------------------------------------------------------------------


async def test_a_model_loaded_on_one_host_is_routed_there(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    a, b, c = await three(emulator_hosts)
    pool = HostPool(settings_for([a, b, c]), session)
    await generate(session, pool.by_name["b"])  # loads llama3.2 on B only
    await pool.check_now()
    assert pool.by_name["b"].loaded == {"llama3.2:latest"} and not pool.by_name["a"].loaded
    before_a = served(a)
    for _ in range(10):  # sequential: all hosts idle each time, yet the loaded copy wins
        host = pool.acquire("Llama3.2")
        await generate(session, host)
        pool.release(host, Outcome.OK)
    assert served(b) == 11 and served(a) == before_a == 0
    # Installed only on C (nothing loaded): C. Installed on A and B: never C.
    assert pool.choose("mistral:7b").name == "c"
    assert {pool.acquire("qwen3:0.6b").name for _ in range(4)} == {"a", "b"}
    # A host whose `models` excludes the model is never chosen for it.
    pinned = PoolSettings(
        hosts=(
            HostSpec("a", Upstream.parse(a.url), models=("qwen3*",)),
            HostSpec("b", Upstream.parse(b.url), models=("llama3*",)),
        )
    )
    only = HostPool(pinned, session)
    assert {only.acquire("llama3.2").name for _ in range(6)} == {"b"}
    assert {only.acquire("qwen3:0.6b").name for _ in range(6)} == {"a"}
    assert {only.acquire("mistral").name for _ in range(6)} == {"a", "b"}  # no host lists it: any


async def test_a_killed_host_is_ejected_by_the_active_check_and_comes_back(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    a, b, c = await three(emulator_hosts)
    async with HostPool(settings_for([a, b, c], check_interval_s=0.05), session) as pool:
        hc = pool.by_name["c"]
        await until(lambda: hc.state(pool.clock()) == "up" and "mistral:7b" in hc.installed, 30, "C up")
        assert pool.choose("mistral:7b").name == "c"
        await c.stop()
        await until(lambda: hc.state(pool.clock()) == "down", 30, "C marked down")
        assert hc.last_error and "/api/version" in hc.last_error
        assert all(pool.acquire("mistral:7b").name != "c" for _ in range(12))
        await c.start()
        await until(lambda: hc.state(pool.clock()) == "up", 30, "C back up")
        assert pool.choose("mistral:7b").name == "c"
        assert pool.snapshot()["hosts"][2]["state"] == "up"


async def test_passive_failures_eject_a_killed_host_then_a_trial_brings_it_back(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    a, b, c = await three(emulator_hosts)
    clock = FakeClock()
    pool = HostPool(settings_for([a, b, c], eject_after=3, eject_cooldown_s=30), session, clock=clock)
    hc = pool.by_name["c"]
    await c.stop()
    for _ in range(3):  # real requests to the dead host, each refused before any answer
        host = pool.acquire(None, exclude=("a", "b"))
        with pytest.raises(FailedBeforeFirstByte):
            await generate(session, host)
        pool.release(host, Outcome.FAILURE)
    assert hc.state(clock()) == "ejected" and hc.ejections == 1 and hc.outstanding == 0
    assert all(pool.acquire(None).name != "c" for _ in range(30))
    clock.now += 31  # cooldown over: half-open, one trial at a time
    await c.start()
    trial = pool.acquire(None, exclude=("a", "b"))
    assert trial is hc and hc.state(clock()) == "half_open" and not hc.available(clock())
    await generate(session, trial, "mistral:7b")
    pool.release(trial, Outcome.OK)
    assert hc.state(clock()) == "unknown" and hc.failures == 0  # circuit closed (no active check ran)
    # A failed trial ejects again at once, without waiting for eject_after failures.
    for _ in range(3):
        pool.release(pool.acquire(None, exclude=("a", "b")), Outcome.FAILURE)
    clock.now += 31
    pool.release(pool.acquire(None, exclude=("a", "b")), Outcome.FAILURE)
    assert hc.state(clock()) == "ejected" and hc.ejections == 3


async def test_a_pool_of_one_always_routes_to_its_host(session: aiohttp.ClientSession) -> None:
    upstream = Upstream.parse("http://127.0.0.1:9")  # nothing listens: every check fails
    pool = HostPool(PoolSettings.single(upstream, check_timeout_s=5.0), session)
    await pool.check_now()
    only = pool.hosts[0]
    assert pool.single and only.state(pool.clock()) == "down" and only.name == "127.0.0.1:9"
    for _ in range(5):
        pool.release(pool.acquire("llama3.2"), Outcome.FAILURE)
    assert pool.choose("llama3.2") is only and pool.choose(None).upstream == upstream
    with pytest.raises(NoUpstreamError):
        pool.choose("llama3.2", exclude=(only,))


# -- load spreading --------------------------------------------------------------------------------


def fake_pool(weights: Sequence[float]) -> HostPool:
    specs = tuple(
        HostSpec(f"h{i}", Upstream.parse(f"http://127.0.0.1:{1000 + i}"), weight=w)
        for i, w in enumerate(weights)
    )
    return HostPool(PoolSettings(hosts=specs), session=None)  # type: ignore[arg-type]  # no I/O here


def test_weights_share_sequential_and_concurrent_requests() -> None:
    pool = fake_pool([1, 3])
    counts = {"h0": 0, "h1": 0}
    for _ in range(400):  # one at a time: ties every time, smooth weighted round-robin decides
        host = pool.acquire(None)
        counts[host.name] += 1
        pool.release(host, Outcome.OK)
    assert counts == {"h0": 100, "h1": 300}
    held = [pool.acquire(None) for _ in range(8)]  # concurrent: in flight per unit of weight
    assert [h.outstanding for h in pool.hosts] == [2, 6]
    for h in held:
        pool.release(h, Outcome.OK)


def test_least_outstanding_wins_over_round_robin() -> None:
    pool = fake_pool([1, 1, 1])
    busy = [pool.acquire(None, exclude=("h1", "h2")) for _ in range(4)]
    picks = [pool.acquire(None).name for _ in range(8)]
    assert picks.count("h0") == 0 and picks.count("h1") == picks.count("h2") == 4
    for h in busy:
        pool.release(h, Outcome.NEUTRAL)  # neutral outcomes leave the circuit alone
    assert pool.hosts[0].outstanding == 0 and pool.hosts[0].failures == 0


async def test_concurrent_real_requests_spread_by_weight(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    hosts = await emulator_hosts(3, token_interval_s=0.01, num_parallel=16)
    pool = HostPool(settings_for(hosts, weights=(1, 1, 2)), session)

    async def one() -> None:
        host, _ = await send_with_retry(pool, "llama3.2", lambda h: generate(session, h), replayable=True)
        pool.release(host, Outcome.OK)

    await asyncio.gather(*(one() for _ in range(40)))
    assert [served(h) for h in hosts] == [10, 10, 20]
    assert all(h.outstanding == 0 for h in pool.hosts)


# -- the retry rule ----------------------------------------------------------------------------------


def test_may_retry_states_the_rule() -> None:
    ok = {"attempt": 1, "client_bytes": 0, "replayable": True, "management": False}
    assert may_retry(**ok) and may_retry(**ok, status=503) and may_retry(**ok, status=500)
    assert not may_retry(**ok, status=404) and not may_retry(**ok, status=200)
    assert not may_retry(**{**ok, "client_bytes": 1})  # a stream is never retried after its first byte
    assert not may_retry(**{**ok, "attempt": 2})  # once only
    assert not may_retry(**{**ok, "replayable": False})
    assert not may_retry(**{**ok, "management": True})


async def test_a_failure_before_the_first_byte_is_retried_once_on_another_host(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    DISPOSED.clear()
    busy, good = await emulator_hosts(2, per_host=[{"emulate": "error_status=503"}, {}])
    pool = HostPool(settings_for([busy, good], weights=(5, 1)), session)
    assert pool.choose("llama3.2").name == "a"  # the first pick is the failing host
    host, answer = await send_with_retry(pool, "llama3.2", lambda h: generate(session, h), replayable=True)
    pool.release(host, Outcome.OK)
    assert host.name == "b" and answer["done"] is True and DISPOSED == ["a"]
    assert served(busy) == 1 and served(good) == 1
    assert pool.by_name["a"].request_failures == 1 and pool.by_name["a"].outstanding == 0
    # A dead host (connection refused) is retried the same way.
    await busy.stop()
    pool.by_name["a"].failures = 0
    host, _ = await send_with_retry(pool, None, lambda h: generate(session, h), replayable=True)
    pool.release(host, Outcome.OK)
    assert host.name == "b" and pool.by_name["a"].request_failures == 2


@pytest.mark.parametrize("case", ["not_replayable", "management", "pool_of_one", "both_fail"])
async def test_no_second_attempt_when_the_rule_says_no(
    case: str, emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    DISPOSED.clear()
    n = 1 if case == "pool_of_one" else 2
    hosts = await emulator_hosts(n, emulate="error_status=503")
    pool = HostPool(settings_for(hosts), session)
    with pytest.raises(FailedBeforeFirstByte) as err:
        await send_with_retry(
            pool,
            "llama3.2",
            lambda h: generate(session, h),
            replayable=case != "not_replayable",
            management=case == "management",
        )
    # The client can be given the last host's own answer, byte for byte.
    assert err.value.status == 503 and err.value.answer.startswith(b'{"error":')
    assert DISPOSED == (["a"] if case == "both_fail" else [])
    assert sum(served(h) for h in hosts) == (2 if case == "both_fail" else 1)
    assert all(h.outstanding == 0 for h in pool.hosts)


def test_management_calls_are_recognised_and_routed_as_configured() -> None:
    assert is_management("POST", "/api/pull") and is_management("DELETE", "/api/delete")
    assert is_management("POST", "/api/blobs/sha256:" + "0" * 64) and is_management("POST", "/api/copy")
    assert not is_management("POST", "/api/generate") and not is_management("GET", "/api/pull")
    specs = tuple(HostSpec(n, Upstream.parse(f"http://127.0.0.1:{p}")) for n, p in (("x", 1), ("y", 2)))
    assert [h.name for h in HostPool(PoolSettings(specs), None).management_targets()] == ["x", "y"]  # type: ignore[arg-type]
    one = HostPool(PoolSettings(specs, management="y"), None)  # type: ignore[arg-type]
    assert [h.name for h in one.management_targets()] == ["y"]


# -- unions --------------------------------------------------------------------------------------------


async def test_tags_and_ps_unions_from_the_emulators_real_answers(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    a, b, c = await three(emulator_hosts)
    pool = HostPool(settings_for([a, b, c]), session)
    for name in ("a", "b"):
        await generate(session, pool.by_name[name])  # llama3.2 loaded on A and on B
    status, body = await pool.union("/api/tags")
    assert status == 200 and body.startswith(b'{"models":[{"name":"llama3.2:latest"')
    tags = ListResponse.model_validate_json(body)  # the official client reads it
    assert [m.model for m in tags.models] == [
        "llama3.2:latest",
        "qwen3:0.6b",
        "all-minilm:latest",
        "mistral:7b",
    ]
    assert tags.models[0].digest != OTHER_DIGEST  # the first host in config order wins
    status, body = await pool.union("/api/ps")
    ps = ProcessResponse.model_validate_json(body)
    assert status == 200 and [m.model for m in ps.models] == ["llama3.2:latest", "llama3.2:latest"]
    assert [m.digest for m in ps.models][1] == OTHER_DIGEST  # every loaded copy, A's then B's
    status, body = await pool.union("/v1/models")  # the OpenAI list, by id, first host wins
    listed = json.loads(body)
    assert status == 200 and listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [
        "llama3.2:latest",
        "qwen3:0.6b",
        "all-minilm:latest",
        "mistral:7b",
    ]
    # A dead host is left out; the others still answer.
    await c.stop()
    status, body = await pool.union("/api/tags")
    assert status == 200 and b"mistral" not in body and b"qwen3" in body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"models": {"a": 1}}', "no models list"),
        (b'{"models": [NaN]}', "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_unusable_answers_are_refused_whole(body: bytes, reason: str) -> None:
    from proxy.upstreams import AnswerError, parse_models

    with pytest.raises(AnswerError, match=reason):
        parse_models(body)


def test_bad_entries_are_dropped_and_the_count_is_bounded() -> None:
    from proxy.upstreams import merge_openai_models, merge_tags, parse_models
    from proxy.upstreams.unions import MAX_ENTRIES, encode_go_json

    body = (
        b'{"models": [1, "x", null, {"name": 5}, {"name": ""}, {"name": "'
        + b"n" * 400
        + b'"}, {"model": "m"},'
    )
    body += b'{"name": "Llama3.2", "digest": "<&>"}]}'
    entries = parse_models(body)
    assert entries == [{"name": "Llama3.2", "digest": "<&>"}]
    assert (
        encode_go_json(merge_tags([entries]))
        == b'{"models":[{"name":"Llama3.2","digest":"\\u003c\\u0026\\u003e"}]}'
    )
    many = b'{"models": [' + b",".join(b'{"name": "m%d"}' % i for i in range(MAX_ENTRIES + 50)) + b"]}"
    assert len(parse_models(many)) == MAX_ENTRIES
    # /v1/models with no models says "data":null, as Ollama does.
    assert parse_models(b'{"object":"list","data":null}', "data", "id") == []
    assert encode_go_json(merge_openai_models([[], []])) == b'{"object":"list","data":null}'
    # Dedupe by canonical name: the first spelling (first host) wins.
    assert merge_tags([[{"name": "a"}], [{"name": "A:latest", "x": 1}, {"name": "b"}]]) == {
        "models": [{"name": "a"}, {"name": "b"}]
    }


async def test_a_hostile_host_is_bounded_and_left_out(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    from aiohttp import web

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked, no Content-Length: only counting can stop it
        await resp.prepare(request)
        await resp.write(b'{"models":[' + b'{"name":"x"},' * 200_000)
        return resp

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b'{"models": "everything"}')

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/ps", huge)
    app.router.add_get("/api/tags", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        (good,) = await emulator_hosts(1)
        bad_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        specs = (HostSpec("good", Upstream.parse(good.url)), HostSpec("bad", Upstream.parse(bad_url)))
        pool = HostPool(PoolSettings(specs, max_answer_bytes=1 << 20, check_timeout_s=10.0), session)
        await pool.check_now()
        bad = pool.by_name["bad"]
        assert bad.state(pool.clock()) == "up" and not bad.loaded and not bad.installed
        assert bad.last_error is not None and "/api/tags" in bad.last_error
        status, body = await pool.union("/api/ps")
        assert status == 200 and body == b'{"models":[]}'  # good has nothing loaded; bad is over 1 MiB
        status, body = await pool.union("/api/tags")
        assert status == 200 and len(ListResponse.model_validate_json(body).models) == 3
        await good.stop()
        status, body = await pool.union("/api/tags")
        assert status == 502 and body.startswith(b'{"error":"no upstream answered GET /api/tags (good: ')
    finally:
        await runner.cleanup()


# -- configuration ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_config_hosts_in_both_forms(tmp_path: Path) -> None:
    full = write(
        tmp_path,
        "upstreams:\n  management: gpu-b\n  hosts:\n"
        "    - {url: 'http://10.0.0.1:11434', name: gpu-a, weight: 2}\n"
        "    - {url: '10.0.0.2', name: gpu-b, models: [Llama3*, qwen3:0.6b]}\n",
    )
    c = load_config(full, env={})
    s = c.upstreams.settings(c.server.upstream)
    assert [(h.name, str(h.upstream), h.weight, h.models) for h in s.hosts] == [
        ("gpu-a", "http://10.0.0.1:11434", 2.0, ()),
        ("gpu-b", "http://10.0.0.2:11434", 1.0, ("llama3*", "qwen3:0.6b")),
    ]
    assert s.management == "gpu-b"
    short = write(tmp_path, "upstreams:\n  - http://10.0.0.1:1\n  - url: http://10.0.0.1:2\n")
    c = load_config(short, env={})
    assert [h.name for h in c.upstreams.settings(c.server.upstream).hosts] == ["10.0.0.1:1", "10.0.0.1:2"]
    none = load_config(write(tmp_path, "server:\n  upstream: http://10.9.9.9:7\n"), env={})
    (only,) = none.upstreams.settings(none.server.upstream).hosts
    assert str(only.upstream) == "http://10.9.9.9:7"


@pytest.mark.parametrize(
    ("hosts", "key", "reason"),
    [
        (
            "[{url: 'http://a:1'}, {url: 'http://b:1'}, {url: 'ftp://c'}]",
            "upstreams.hosts[2].url",
            "unsupported scheme",
        ),
        ("[{name: x}]", "upstreams.hosts[0].url", "required"),
        ("[{url: 'http://a:1', weight: 0}]", "upstreams.hosts[0].weight", "must be > 0"),
        ("[{url: 'http://a:1', weight: true}]", "upstreams.hosts[0].weight", "expected a number"),
        ("[{url: 'http://a:1', models: 5}]", "upstreams.hosts[0].models", "non-empty list"),
        ("[{url: 'http://a:1', models: [llama3, 7]}]", "upstreams.hosts[0].models[1]", "model name or glob"),
        ("[{url: 'http://a:1', port: 5}]", "upstreams.hosts[0].port", "unknown key"),
        ("[{url: 'http://a:1', name: 'has space'}]", "upstreams.hosts[0].name", "letters, digits"),
        ("[{url: 'http://a:1', name: all}]", "upstreams.hosts[0].name", "letters, digits"),
        ("['http://a:1', 'http://a:1']", "upstreams.hosts[1].name", "already the name of upstreams.hosts[0]"),
        ("[7]", "upstreams.hosts[0]", "expected a mapping"),
        ("{url: 'http://a:1'}", "upstreams.hosts", "expected a list"),
    ],
)
def test_config_errors_name_file_key_and_reason(tmp_path: Path, hosts: str, key: str, reason: str) -> None:
    cfg = write(tmp_path, f"upstreams:\n  hosts: {hosts}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env={})
    assert (err.value.source, err.value.key) == (str(cfg), key) and reason in err.value.reason, str(err.value)


def test_config_errors_for_management_and_intervals(tmp_path: Path) -> None:
    cfg = write(tmp_path, "upstreams:\n  hosts: [{url: 'http://a:1', name: a}]\n  management: b\n")
    with pytest.raises(ConfigError, match=r"upstreams\.management: 'b' is not a host name \(names: a"):
        load_config(cfg, env={})
    cfg = write(tmp_path, "upstreams:\n  eject_after: 0\n")
    with pytest.raises(ConfigError, match=r"upstreams\.eject_after: must be > 0"):
        load_config(cfg, env={})
    cfg = write(tmp_path, "upstreams:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"upstreams\.bogus: unknown key"):
        load_config(cfg, env={})


async def test_management_fan_out_to_all_hosts_and_to_a_named_one(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    from proxy.upstreams import combined, fan_out, final_line

    a, b, c = await three(emulator_hosts)
    pool = HostPool(settings_for([a, b, c]), session)
    body, headers = b'{"model": "qwen3:0.6b"}', {"Content-Type": "application/json"}
    answers = await fan_out(session, pool.management_targets(), "DELETE", "/api/delete", body, headers)
    # A and B deleted it; C never had it: the client gets C's 404, named.
    assert [x.status for x in answers] == [200, 200, 404]
    status, out = combined(answers)
    assert status == 404 and out == b'{"error":"c: model \'qwen3:0.6b\' not found"}'
    assert a.emu is not None and b.emu is not None
    assert "qwen3:0.6b" not in a.emu.installed and "qwen3:0.6b" not in b.emu.installed
    # Named: only that host pulls; its streamed progress ends in success.
    named = HostPool(PoolSettings(pool.settings.hosts, management="a"), session)
    pull = b'{"model": "qwen3:0.6b"}'
    (only,) = await fan_out(session, named.management_targets(), "POST", "/api/pull", pull, headers)
    assert only.host.name == "a" and only.error is None and only.body.endswith(b'{"status":"success"}\n')
    assert "qwen3:0.6b" in a.emu.installed and "qwen3:0.6b" not in b.emu.installed
    # A 200 stream whose last line is an error is a failure (C's registry has no qwen3).
    (failed,) = await fan_out(session, [pool.by_name["c"]], "POST", "/api/pull", pull, headers)
    assert failed.status == 200 and failed.error == "pull model manifest: file does not exist"
    assert final_line(b'{"status":"success"}\n', [only, failed]) == (
        b'{"error":"c: pull model manifest: file does not exist"}\n'
    )
    # A relayed progress stream keeps its success line only if every other host succeeded.
    assert final_line(b'{"status":"success"}\n', [only]) == b'{"status":"success"}\n'
    await b.stop()
    (dead,) = await fan_out(session, [pool.by_name["b"]], "POST", "/api/pull", pull, headers)
    assert final_line(b'{"status":"success"}\n', [dead]).startswith(b'{"error":"b: ClientConnectorError')
    assert combined([only, dead])[0] == 502


async def test_killing_a_host_mid_run_loses_no_request_that_had_not_started_streaming(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    """Issue 16's acceptance at the pool's level: the test is the client, reading each stream to its end."""
    hosts = await emulator_hosts(3, token_interval_s=0.02, default_tokens=20, num_parallel=16)
    pool = HostPool(settings_for(hosts), session)
    outcomes: list[tuple[str, str]] = []  # (host, "done" | "cut")

    async def send(host: Host) -> aiohttp.ClientResponse:
        up = host.upstream
        try:
            resp = await session.post(
                up.url_for("/api/generate", ""),
                json={"model": "llama3.2", "prompt": "hi"},
                headers={"Host": up.host_header},
            )
        except aiohttp.ClientConnectionError as exc:
            raise FailedBeforeFirstByte(type(exc).__name__) from exc
        if resp.status >= 500:
            resp.release()
            raise FailedBeforeFirstByte(f"HTTP {resp.status}", status=resp.status)
        return resp

    async def one() -> None:
        host, resp = await send_with_retry(pool, "llama3.2", send, replayable=True)
        lines = []
        try:
            async for line in resp.content:  # from here on bytes have reached the client: never retried
                lines.append(line)
        except aiohttp.ClientError:
            pass
        finally:
            resp.release()
        done = bool(lines) and b'"done":true' in lines[-1]
        pool.release(host, Outcome.OK if done else Outcome.FAILURE)
        outcomes.append((host.name, "done" if done else "cut"))

    async def killer() -> None:
        await until(lambda: pool.by_name["a"].outstanding >= 2, 30, "streams running on A")
        await hosts[0].kill()

    tasks = []
    for _ in range(45):
        tasks.append(asyncio.ensure_future(one()))
        if len(tasks) == 9:
            tasks.append(asyncio.ensure_future(killer()))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert len(outcomes) == 45
    cut = [h for h, o in outcomes if o == "cut"]
    assert cut and set(cut) == {"a"}, outcomes  # only streams already running on A were cut
    # Every other request ended "done": those that found A dead (refused, or a pooled connection reset
    # before any answer) were retried on B or C; send_with_retry would have raised otherwise.
    assert pool.by_name["a"].request_failures >= len(cut) and all(h.outstanding == 0 for h in pool.hosts)


async def test_poke_runs_a_health_round_at_once(
    emulator_hosts: StartHosts, session: aiohttp.ClientSession
) -> None:
    (a,) = await emulator_hosts(1)
    async with HostPool(settings_for([a], check_interval_s=3600), session) as pool:
        await until(lambda: pool.rounds == 1, 30, "first round")
        assert a.emu is not None and "qwen3:0.6b" in pool.hosts[0].installed
        del a.emu.installed["qwen3:0.6b"]
        pool.poke()
        await until(lambda: pool.rounds == 2, 30, "poked round")
        assert "qwen3:0.6b" not in pool.hosts[0].installed
