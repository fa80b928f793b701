"""The emulator's ``/v1/audio/transcriptions``: OpenAI's multipart form in, a transcript sized by the audio out."""

from __future__ import annotations

import io
import math
import wave
from typing import Any

import aiohttp
import pytest

from proxy.emulator.audio import WORDS_PER_SECOND, wav_seconds


def wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * round(seconds * rate))
    return buf.getvalue()


def form(**fields: Any) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if isinstance(value, bytes):
            data.add_field(name, value, filename="a.bin", content_type="application/octet-stream")
        else:
            data.add_field(name, value)
    return data


async def post(emulator: Any, data: Any, **headers: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(emulator.url + "/v1/audio/transcriptions", data=data, headers=headers) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.read()


@pytest.mark.parametrize("seconds", [0.1, 2.0, 7.3])
async def test_json_transcript_has_one_word_per_0_4_seconds(emulator: Any, seconds: float) -> None:
    audio = wav(seconds)
    assert wav_seconds(audio) == pytest.approx(seconds)
    status, ctype, body = await post(emulator, form(model="llama3.2", file=audio), **{"X-Request-Id": "a1"})
    assert status == 200 and ctype == "application/json"
    assert body.startswith(b'{"text":"') and body.endswith(b'"}\n')
    gt = emulator.emu.entry("a1")
    assert gt.eval_count == max(1, math.ceil(seconds * WORDS_PER_SECOND))
    assert len(gt.response_text.split()) == gt.eval_count
    assert gt.model == "llama3.2" and gt.status == 200


async def test_text_and_verbose_json_formats(emulator: Any) -> None:
    audio = wav(1.0)
    status, ctype, body = await post(emulator, form(model="llama3.2", file=audio, response_format="text"))
    assert status == 200 and ctype.startswith("text/plain") and len(body.split()) == 3
    status, ctype, body = await post(
        emulator, form(model="llama3.2", file=audio, response_format="verbose_json", language="de")
    )
    assert status == 200 and b'"duration":1,' in body and b'"language":"de"' in body


async def test_non_wav_file_is_sized_by_bytes(emulator: Any) -> None:
    status, _, _ = await post(emulator, form(model="llama3.2", file=b"x" * 40_000), **{"X-Request-Id": "a2"})
    assert status == 200 and emulator.emu.entry("a2").eval_count == 40_000 // 4096


@pytest.mark.parametrize(
    ("data", "content_type", "status", "message"),
    [
        (form(model="llama3.2"), None, 400, "file is required"),
        (form(file=b"abc"), None, 400, "model is required"),
        (form(model="nope:1b", file=b"abc"), None, 404, "model 'nope:1b' not found"),
        (form(model="llama3.2", file=b"abc", response_format="mp3"), None, 400, "invalid response_format"),
        (
            b"--x\r\nContent-Disposition: form-data",
            "multipart/form-data; boundary=x",
            400,
            "invalid multipart",
        ),
        (b"{}", "application/json", 400, "invalid multipart"),
    ],
)
async def test_bad_requests_get_openai_errors(
    emulator: Any, data: Any, content_type: str | None, status: int, message: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    got, ctype, body = await post(emulator, data, **headers)
    assert got == status and ctype == "application/json"
    assert body.startswith(b'{"error":{"message":"' + message.encode())
