"""The guard model: ask a safety classifier served by the same Ollama, and parse its verdict.

Ollama users run Llama Guard 3 (``llama-guard3``) and ShieldGemma (``shieldgemma``) as ordinary chat
models: the conversation to judge goes in as the ``messages`` (the model's own template wraps it in its
policy prompt), and the answer is the verdict.

* Llama Guard 3 answers ``safe``, or ``unsafe`` and on the next line the violated hazard categories,
  comma-separated (``unsafe\\nS1,S10``); ``CATEGORIES`` names the 14 of the MLCommons taxonomy.
* ShieldGemma answers ``Yes`` (the text violates the policy) or ``No``, with no categories.

``parse_verdict`` is pure; ``GuardClient`` sends one non-streamed ``/api/chat`` straight to the upstream
(never through ollamon itself, so the check is not recorded and analysed in turn).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import aiohttp

__all__ = ["CATEGORIES", "GuardClient", "GuardError", "Verdict", "parse_verdict"]

CATEGORIES = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
_CODE = re.compile(r"S\d{1,2}")
MAX_REPLY_CHARS = 4096  # a guard verdict is a few bytes; anything longer is not one


class GuardError(Exception):
    """The guard model could not give a verdict: unreachable, an error status, or an answer not a verdict."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """``verdict`` is ``safe`` or ``unsafe``; ``categories`` the hazard codes (Llama Guard only)."""

    verdict: str
    categories: tuple[str, ...] = ()


def parse_verdict(reply: str) -> Verdict:
    """Parse a Llama Guard (``safe`` / ``unsafe\\nS1,S2``) or ShieldGemma (``Yes`` / ``No``) answer."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        raise GuardError("the guard model answered nothing")
    head = lines[0].lower().rstrip(".")
    if head == "safe":
        return Verdict("safe")
    if head == "unsafe":
        codes = _CODE.findall(" ".join(lines[1:2]).upper())
        return Verdict("unsafe", tuple(dict.fromkeys(c for c in codes if c in CATEGORIES)))
    if head == "no":
        return Verdict("safe")
    if head == "yes":
        return Verdict("unsafe")
    # The answer itself is not quoted: a misconfigured (chat) model may echo the text it was given.
    raise GuardError(f"not a guard verdict ({len(reply)} characters; is guard_model a guard model?)")


class GuardClient:
    """Asks ``model`` at ``url`` (the upstream Ollama's ``/api/chat``) to judge one exchange."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.url = url
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.headers = headers or {}

    async def judge(self, prompt: str, response: str | None) -> tuple[Verdict, float]:
        """(verdict, latency in ms); raises ``GuardError`` when there is none."""
        messages = [{"role": "user", "content": prompt}]
        if response:
            messages.append({"role": "assistant", "content": response})
        body = {"model": self.model, "messages": messages, "stream": False, "options": {"temperature": 0}}
        started = time.perf_counter()
        try:
            async with self.session.post(
                self.url, json=body, timeout=self.timeout, headers=self.headers
            ) as resp:
                if resp.status != 200:
                    raise GuardError(f"the guard model answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise GuardError(f"the guard model did not answer: {type(exc).__name__}: {exc}") from exc
        latency_ms = (time.perf_counter() - started) * 1000
        content = data.get("message", {}).get("content") if isinstance(data, dict) else None
        if not isinstance(content, str):
            raise GuardError("the guard model's answer has no message.content")
        return parse_verdict(content[:MAX_REPLY_CHARS]), latency_ms
