"""The request side of ``POST /v1/audio/transcriptions``: a multipart form, not JSON (spec §1, §2).

ollama-api.md names the route (``TranscriptionMiddleware``, multipart → ChatHandler) but not its fields, so
they are OpenAI's documented ones: ``file`` (the audio), ``model``, and optional ``language``, ``prompt``,
``response_format`` (``json``, ``text``, ``verbose_json``, ``srt``, ``vtt``) and ``temperature``. Fields
are read as Go's ``FormValue`` reads them (the first value of a name wins). The audio is never decoded:
a WAV file's header gives its playing time (``multipart.wav_seconds``); other formats give None.
"""

from __future__ import annotations

import math

from proxy.forward.multipart import MultipartError, boundary_of, parse_form, wav_seconds
from proxy.forward.request_json import RequestFacts, small

__all__ = ["inspect_transcription"]

_EXTRA_FIELDS = ("language", "response_format", "timestamp_granularities[]", "stream")


def _temperature(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def inspect_transcription(body: bytes, content_type: str | None) -> RequestFacts:
    """Model, prompt, temperature and the audio file's facts from a transcription form; never raises."""
    facts = RequestFacts()
    if not body:
        facts.parse_error = "missing request body"
        return facts
    try:
        form = parse_form(body, boundary_of(content_type))
    except MultipartError as exc:
        facts.parse_error = f"body is not multipart/form-data: {exc}"
        return facts
    fields = form.fields
    facts.model = fields.get("model")
    facts.prompt_text = fields.get("prompt", "")
    facts.prompt_chars = len(facts.prompt_text)
    if "temperature" in fields:
        facts.temperature = _temperature(fields["temperature"])
        if facts.temperature is None:
            facts.extra["temperature"] = small(fields["temperature"])
    for key in _EXTRA_FIELDS:
        if key in fields:
            facts.extra[key.removesuffix("[]")] = small(fields[key])
    audio = next((f for f in form.files if f.name == "file"), None)
    if audio is None:
        facts.extra["file"] = "missing"
        return facts
    facts.extra["file_bytes"] = audio.size
    if audio.content_type:
        facts.extra["file_type"] = small(audio.content_type)
    facts.audio_seconds = wav_seconds(memoryview(body)[audio.start : audio.end])
    return facts
