"""``/v1/audio/transcriptions`` through ollamon (issue 10): one row per call, audio seconds from the WAV header.

The official ``openai`` SDK talks to the proxy unchanged; the emulator is the upstream and its ground truth
(the transcript it sent) is what the row must say. The bounded multipart reader is tested on its own below,
against hostile bodies and against forms built at random.
"""

from __future__ import annotations

import io
import random
import sqlite3
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.forward.multipart import (
    MAX_HEADER_BYTES,
    MAX_PARTS,
    MultipartError,
    boundary_of,
    parse_form,
    wav_seconds,
)
from proxy.forward.request_facts import inspect_request
from proxy.forward.streams import Flavor
from storage.migrations import MIGRATIONS, apply_migrations
from tests.fixtures.proxy import MakeProxy, ProxyHandle

MODEL = "llama3.2:latest"


def make_wav(seconds: float, rate: int = 16000, channels: int = 1, width: int = 2) -> tuple[bytes, float]:
    """A real WAV file (the ``wave`` module writes it) and its true playing time."""
    frames = round(seconds * rate)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(random.Random(frames).randrange(256) for _ in range(frames * channels * width)))
    return buf.getvalue(), frames / rate


@pytest.fixture
async def oai(proxy: ProxyHandle) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def row_of(proxy: ProxyHandle, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for r in proxy.rows() if r["request_id"] == rid]
        if rows:
            (row,) = rows
            return row
        await _sleep()
    raise AssertionError(f"no row for {rid}")


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.05)


# 1.5 s is a small body (one write upstream); 10.25 s (328 KB) is streamed and parsed after forwarding.
@pytest.mark.parametrize("seconds", [1.5, 10.25])
async def test_sdk_transcription_of_a_wav_is_one_row_with_its_seconds(
    emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI, seconds: float
) -> None:
    data, truth = make_wav(seconds)
    rid = f"tr-wav-{seconds}"
    got = await oai.audio.transcriptions.create(
        model=MODEL,
        file=("speech.wav", data, "audio/wav"),
        language="en",
        temperature=0.2,
        extra_headers={"X-Request-Id": rid},
    )
    gt = emulator.emu.entry(rid)
    assert got.text == gt.response_text and got.text
    row = await row_of(proxy, rid)
    assert row["endpoint"] == "/v1/audio/transcriptions" and row["model_name"] == MODEL
    assert row["status_code"] == 200 and row["success"] == 1 and row["error_message"] is None
    assert row["response_length"] == len(gt.response_text)
    assert row["audio_seconds"] == pytest.approx(truth, abs=1e-9)
    assert row["temperature"] == 0.2 and row["stream"] == 0
    meta = orjson.loads(row["metadata"])
    assert meta["bytes_in"] > len(data) and meta["request"]["file_bytes"] == len(data)
    assert meta["request"]["language"] == "en"


async def test_text_response_format_and_a_non_wav_file(
    emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI
) -> None:
    mp3 = b"ID3\x04\x00" + bytes(random.Random(7).randrange(256) for _ in range(20000))
    got = await oai.audio.transcriptions.create(
        model=MODEL,
        file=("speech.mp3", mp3, "audio/mpeg"),
        response_format="text",
        extra_headers={"X-Request-Id": "tr-mp3"},
    )
    gt = emulator.emu.entry("tr-mp3")
    assert isinstance(got, str) and got == gt.response_text
    row = await row_of(proxy, "tr-mp3")
    assert row["model_name"] == MODEL and row["success"] == 1
    assert row["audio_seconds"] is None
    assert row["response_length"] == len(gt.response_text) == len(got)


async def test_unknown_model_is_a_failed_row(
    emulator: Any, proxy: ProxyHandle, oai: openai.AsyncOpenAI
) -> None:
    data, _ = make_wav(0.5)
    with pytest.raises(openai.NotFoundError):
        await oai.audio.transcriptions.create(
            model="nope:1b", file=("a.wav", data), extra_headers={"X-Request-Id": "tr-404"}
        )
    row = await row_of(proxy, "tr-404")
    assert row["status_code"] == 404 and row["success"] == 0
    assert row["model_name"] == "nope:1b" and row["error_message"] == "model 'nope:1b' not found"


async def test_malformed_multipart_is_forwarded_and_recorded_failed(
    emulator: Any, proxy: ProxyHandle
) -> None:
    body = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nllama3.2\r\n--xyz\r\n'
    body += b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF....'  # no closing
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/audio/transcriptions",
            data=body,
            headers={"Content-Type": "multipart/form-data; boundary=xyz", "X-Request-Id": "tr-bad"},
        ) as r:
            assert r.status == 400
            answer = await r.json()
    assert "multipart" in answer["error"]["message"]
    row = await row_of(proxy, "tr-bad")
    assert row["status_code"] == 400 and row["success"] == 0 and row["model_name"] is None
    assert row["audio_seconds"] is None
    meta = orjson.loads(row["metadata"])
    assert meta["request_parse_error"] == "body is not multipart/form-data: no closing boundary"
    err = proxy.rows("error_metrics", "request_id = 'tr-bad'")
    assert len(err) == 1 and err[0]["error_type"] == "upstream_status"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback upstream that keeps each body exactly as received and answers like the route."""
    seen: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(body=b'{"text":"twelve chars"}\n', content_type="application/json")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/audio/transcriptions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


async def test_upload_past_the_inspect_bound_passes_byte_identical_without_facts(
    raw_upstream: tuple[str, list[bytes]], make_proxy: MakeProxy
) -> None:
    url, seen = raw_upstream
    proxy = await make_proxy(url, server__max_inspect_bytes=100_000)
    data, _ = make_wav(5.0)  # 160 KB of audio: past the bound
    form = aiohttp.FormData()
    form.add_field("model", MODEL)
    form.add_field("file", data, filename="big.wav", content_type="audio/wav")
    payload = form()
    sent = io.BytesIO()

    class Sink:
        async def write(self, chunk: bytes) -> None:
            sent.write(chunk)

    await payload.write(Sink())  # type: ignore[arg-type]
    body = sent.getvalue()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/audio/transcriptions",
            data=body,
            headers={"Content-Type": payload.content_type, "X-Request-Id": "tr-big"},
        ) as r:
            assert r.status == 200 and (await r.json()) == {"text": "twelve chars"}
    assert seen == [body]
    row = await row_of(proxy, "tr-big")
    assert row["success"] == 1 and row["status_code"] == 200 and row["response_length"] == 12
    assert row["model_name"] is None and row["audio_seconds"] is None
    meta = orjson.loads(row["metadata"])
    assert meta["bytes_in"] == len(body) and "request" not in meta and "request_parse_error" not in meta


def test_m007_adds_audio_seconds_to_the_m006_schema(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    apply_migrations(conn, [m for m in MIGRATIONS if m.__name__ < "m007"])
    conn.execute(
        "INSERT INTO inference_metrics (timestamp, request_id, success, endpoint, cancelled)"
        " VALUES ('t', 'old', 1, '/api/chat', 0)"
    )
    conn.commit()
    assert apply_migrations(conn, [m for m in MIGRATIONS if m.__name__ <= "m007_audio_seconds"]) == [
        "m007_audio_seconds"
    ]
    types = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(inference_metrics)")}
    assert types["audio_seconds"] == "REAL"
    assert conn.execute("SELECT audio_seconds FROM inference_metrics").fetchall() == [(None,)]


# -- the bounded multipart reader and the WAV header --------------------------------------------------


def build_form(boundary: str, fields: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("rate", "channels", "width", "seconds"),
    [(8000, 1, 1, 0.75), (16000, 1, 2, 2.0), (44100, 2, 2, 1.3), (48000, 2, 3, 0.2), (22050, 6, 4, 0.01)],
)
def test_wav_seconds_equals_the_wave_modules_duration(
    rate: int, channels: int, width: int, seconds: float
) -> None:
    data, truth = make_wav(seconds, rate, channels, width)
    assert wav_seconds(data) == pytest.approx(truth, abs=1e-12)
    assert wav_seconds(data[:30]) is None  # header cut inside fmt
    streaming = data[:40] + b"\xff\xff\xff\xff" + data[44:]  # unknown data size: the bytes present count
    assert wav_seconds(streaming) == pytest.approx(truth, abs=1e-12)
    assert wav_seconds(b"ID3" + data) is None


def test_a_form_reads_back_through_inspect_request() -> None:
    data, truth = make_wav(0.5)
    body = build_form(
        "b0undary", [("model", b"qwen3:0.6b", None), ("prompt", b"names: Ada", None), ("file", data, "x.wav")]
    )
    facts = inspect_request(Flavor.OPENAI_TRANSCRIPTION, body, "multipart/form-data; boundary=b0undary")
    assert facts.parse_error is None and facts.model == "qwen3:0.6b"
    assert facts.prompt_text == "names: Ada" and facts.audio_seconds == pytest.approx(truth)
    wrong = inspect_request(Flavor.OPENAI_TRANSCRIPTION, body, "multipart/form-data; boundary=other")
    assert wrong.model is None and wrong.parse_error == "body is not multipart/form-data: no opening boundary"


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        (None, "no Content-Type"),
        ("application/json", "not multipart/form-data"),
        ("multipart/form-data", "without a boundary"),
        ("multipart/form-data; boundary=" + "a" * 71, "not a valid RFC 2046 boundary"),
        ('multipart/form-data; boundary="a b "', "not a valid RFC 2046 boundary"),
    ],
)
def test_bad_content_types_are_refused(content_type: str | None, reason: str) -> None:
    with pytest.raises(MultipartError, match=reason):
        boundary_of(content_type)


def test_quoted_boundary_and_parameters_in_any_case() -> None:
    assert boundary_of('Multipart/Form-Data; charset=utf-8; BOUNDARY="a:b=c"') == "a:b=c"


def test_hostile_bodies_fail_fast_with_a_reason() -> None:
    huge_header = b"--b\r\nX-Pad: " + b"x" * (4 * MAX_HEADER_BYTES) + b"\r\n\r\nv\r\n--b--"
    cases = {
        b"no boundary at all": "no opening boundary",
        huge_header: "headers unterminated",
        b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n' + b"v" * 100_000: "no closing boundary",
        b"--b\r\n" * (MAX_PARTS + 5): "headers unterminated",  # boundary lines where headers belong
        b"--bXX": "not followed by CRLF",
        b"--b\r\nno colon here\r\n\r\nv\r\n--b--": "without a colon",
        b"--b\r\nContent-Type: text/plain\r\n\r\nv\r\n--b--": "without Content-Disposition",
    }
    for body, reason in cases.items():
        started = time.perf_counter()
        with pytest.raises(MultipartError, match=reason):
            parse_form(body, "b")
        assert time.perf_counter() - started < 1.0
    many = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n' for _ in range(MAX_PARTS + 1)
    )
    with pytest.raises(MultipartError, match=f"more than {MAX_PARTS} parts"):
        parse_form(many + b"--b--", "b")


names = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=8)
values = st.binary(max_size=300).filter(lambda v: b"\r\n--" not in v)


@settings(max_examples=200, deadline=None)
@given(
    boundary=st.text(st.sampled_from("abcXYZ0189'()+_,-./:=?"), min_size=1, max_size=70),
    fields=st.lists(st.tuples(names, values, st.none() | names), max_size=6),
    preamble=st.binary(max_size=40).filter(lambda v: b"--" not in v),
)
def test_random_forms_read_back_exactly(
    boundary: str, fields: list[tuple[str, bytes, str | None]], preamble: bytes
) -> None:
    body = build_form(boundary, fields)
    if preamble:
        body = preamble + b"\r\n" + body
    form = parse_form(body, boundary_of(f'multipart/form-data; boundary="{boundary}"'))
    assert form.parts == len(fields)
    expect_fields: dict[str, str] = {}
    for name, value, filename in fields:
        if filename is None:
            expect_fields.setdefault(name, value.decode("utf-8", "replace"))
    assert form.fields == expect_fields
    files = [(f.name, body[f.start : f.end], f.filename) for f in form.files]
    assert files == [(n, v, fn) for n, v, fn in fields if fn is not None]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400), cut=st.integers(0, 400))
def test_arbitrary_bytes_only_ever_give_multipart_error(body: bytes, cut: int) -> None:
    good = build_form("b", [("model", b"m", None), ("file", body, "f.wav")])
    for candidate in (body, good[:cut], b"--b\r\n" + body, good):
        try:
            parse_form(candidate, "b")
        except MultipartError:
            pass
        facts = inspect_request(Flavor.OPENAI_TRANSCRIPTION, candidate, "multipart/form-data; boundary=b")
        assert facts.prompt_chars == len(facts.prompt_text)
    assert wav_seconds(body) is None or wav_seconds(body) >= 0


def test_an_rfc2231_filename_alone_still_makes_a_file_part() -> None:
    data, truth = make_wav(0.25)
    body = (
        b"--q\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''s%C3%A9.wav\r\n\r\n"
        + data
        + b'\r\n--q\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--q--\r\n'
    )
    facts = inspect_request(Flavor.OPENAI_TRANSCRIPTION, body, "multipart/form-data; boundary=q")
    assert facts.model == "m" and facts.audio_seconds == pytest.approx(truth)
