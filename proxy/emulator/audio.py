"""``POST /v1/audio/transcriptions``: a multipart form in, ``{"text": ...}`` (or plain text) out.

Ollama's ``TranscriptionMiddleware`` turns the form into a chat request (spec §2); ollama-api.md does not
spell out the fields, so the emulator follows OpenAI's documented API: ``file``, ``model``, optional
``language``, ``prompt``, ``response_format`` (``json`` default, ``text``, ``verbose_json``, ``srt``,
``vtt``) and ``temperature``. The transcript is deterministic ground truth: one word per 0.4 s of a WAV
file's playing time (read from its header), or one per 4 KiB of any other file, always at least one;
``X-Emulate: tokens=N`` overrides the count. The model runs through the same engine as every route (load,
slots, prompt eval, token pacing), non-streamed. The prompt count is 25 audio tokens per second (one per
KiB without a WAV header), plus the prompt's words, plus 6 for the template. A form that cannot be read,
or one without ``file`` or ``model``, gets a 400 in the OpenAI error envelope; an unknown model a 404.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from aiohttp import BodyPartReader, web

from . import gojson
from .engine import Outcome, Plan, Token, run_inference
from .groundtruth import request_context
from .openai import openai_error
from .parsing import ApiError, knobs_for, lookup_model
from .state import EMULATOR_KEY
from .textgen import count_words, seed_of

__all__ = ["transcriptions", "wav_seconds"]

WORDS_PER_SECOND = 2.5
AUDIO_TOKENS_PER_SECOND = 25
_BYTES_PER_WORD = 4096
_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
_MAX_FIELD = 64 << 10


def wav_seconds(data: bytes) -> float | None:
    """Playing time of a PCM-style RIFF/WAVE file from its header (frames / sample rate), else None."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, rate, align = 12, 0, 0
    while pos + 8 <= len(data):
        chunk = data[pos : pos + 4]
        size: int = struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt " and pos + 24 <= len(data):
            _, _, rate, _, align, _ = struct.unpack_from("<HHIIHH", data, pos + 8)
        elif chunk == b"data":
            if not rate or not align:
                return None
            return (min(size, len(data) - pos - 8) // align) / rate
        pos += 8 + size + (size & 1)
    return None


class TranscriptionRenderer:
    """Non-streamed transcription bodies in the requested ``response_format``."""

    stream_content_type = "text/event-stream"

    def __init__(self, response_format: str, language: str, seconds: float | None) -> None:
        self._format, self._language, self._seconds = response_format, language, seconds

    def token(self, token: Token) -> list[bytes]:
        return []

    def final(self, outcome: Outcome) -> list[bytes]:
        return []

    def mid_error(self, message: str) -> list[bytes]:
        return []

    def single(self, outcome: Outcome) -> tuple[bytes, str]:
        if self._format == "json":
            return gojson.dumps({"text": outcome.text}, newline=True), "application/json"
        if self._format == "verbose_json":
            body: dict[str, Any] = {"task": "transcribe", "language": self._language or "english"}
            body["duration"] = self._seconds or 0.0
            body["text"] = outcome.text
            return gojson.dumps(body, newline=True), "application/json"
        return outcome.text.encode(), "text/plain; charset=utf-8"

    def error(self, status: int, message: str, in_stream: bool) -> web.Response:
        return openai_error(status, message)


async def _read_form(request: web.Request) -> tuple[dict[str, str], bytes | None]:
    """Ordinary fields (first value wins) and the ``file`` part's bytes; ApiError 400 when unreadable."""
    fields: dict[str, str] = {}
    audio: bytes | None = None
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "nested multipart is not supported")
            if part.name == "file" and audio is None:
                audio = bytes(await part.read())
            elif part.name and part.name not in fields:
                fields[part.name] = (await part.read(decode=False))[:_MAX_FIELD].decode("utf-8", "replace")
            else:
                await part.release()
    except ApiError:
        raise
    except Exception as exc:  # aiohttp raises ValueError, AssertionError, KeyError... on bad framing
        raise ApiError(400, f"invalid multipart form: {type(exc).__name__}: {exc}") from None
    return fields, audio


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        fields, audio = await _read_form(request)
        requested = fields.get("model", "")
        entry.model = requested or None
        if audio is None:
            raise ApiError(400, "file is required")
        if not requested:
            raise ApiError(400, "model is required")
        spec = lookup_model(emu, requested, empty_status=400)
        response_format = fields.get("response_format") or "json"
        if response_format not in _FORMATS:
            raise ApiError(400, f"invalid response_format: {response_format[:64]!r}")
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return openai_error(exc.status, exc.message)
    seconds = wav_seconds(audio)
    if seconds is not None:
        words = max(1, math.ceil(seconds * WORDS_PER_SECOND))
        audio_tokens = math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)
    else:
        words = max(1, len(audio) // _BYTES_PER_WORD)
        audio_tokens = len(audio) // 1024
    prompt = fields.get("prompt", "")
    plan = Plan(
        model=spec.name,
        stream=False,
        prompt_eval_count=audio_tokens + count_words(prompt) + 6,
        tokens=knobs.tokens if knobs.tokens is not None else words,
        done_reason="stop",
        seed=seed_of(spec.name, "audio", str(len(audio)), prompt),
        keep_alive_s=emu.config.keep_alive_s,
        knobs=knobs,
    )
    renderer = TranscriptionRenderer(response_format, fields.get("language", ""), seconds)
    return await run_inference(request, emu, entry, plan, renderer, start_ns)
