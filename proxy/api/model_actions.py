"""Model actions through Ollama's own API (unload, keep loaded, load, pull) and live counts per model.

Routes, all under ``/ollamon/api/`` so the admin token guards them when one is set (proxy/access.py):

- ``POST models/unload {"model"}``: ``POST /api/generate {"model", "keep_alive": 0}`` (Ollama's unload).
- ``POST models/keep {"model", "keep_alive"}``: ``POST /api/generate {"model", "keep_alive"}``; a Go duration
  (``"30m"``, ``"1h"``, ``"90s"``), a number of seconds, or ``-1`` for forever.
- ``POST models/load {"model"}``: ``POST /api/generate {"model"}`` (an empty prompt loads the model).
- ``POST models/pull {"model"}``: 202; a background task follows Ollama's ``/api/pull`` progress stream.
  One pull per model at a time (409 while one runs). ``GET models/pulls`` lists running and recent pulls.
- ``GET live/models``: requests in flight now per model (proxy/forward/live.py).

Every action needs ``Content-Type: application/json`` (415 otherwise). That is the CSRF defence: a
cross-site HTML form cannot send that type, and a script can only with a CORS preflight, which ollamon
never grants. These calls go straight to the upstream through the app's client session, not through the
forwarder: they are ollamon's own requests, not users', and are not recorded as inferences. Each action
that Ollama carried out becomes a ``model_events`` row (``source`` ``action``, the asking client in
``detail``): ``unload``, ``keep_alive``, ``load``, ``pull_started``, ``pull_done``, ``pull_failed``; the
inventory is then asked to poll soon, and records what it observes (its own ``load``/``unload`` rows, source
``ps``). Upstream errors are 502 ``{"error": <Ollama's text>, "upstream_status": N}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.answers import json_response
from proxy.api.model_input import ActionError, error_text, keep_alive_value, read_body, read_capped
from proxy.forward.headers import client_ip
from proxy.forward.live import live_by_model
from proxy.keys import CONFIG_KEY, FORWARDER_KEY, SESSION_KEY, WRITER_KEY
from proxy.resources.inventory import INVENTORY_KEY, Inventory, model_key
from proxy.upstream_url import Upstream
from storage.records import iso_utc
from storage.resources import ModelEvent
from storage.tasks import spawn
from storage.writer import Writer

__all__ = ["ACTIONS_KEY", "ModelActions", "PullState", "setup"]

PREFIX = "/ollamon/api"
MAX_RUNNING_PULLS = 16
KEEP_FINISHED_PULLS = 20


@dataclasses.dataclass(slots=True)
class PullState:
    """One pull: ``running``, ``success`` or ``failed``, with Ollama's last progress line."""

    model: str
    started_at: str
    client: str | None
    status: str = "running"
    finished_at: str | None = None
    last_status: str | None = None
    digest: str | None = None
    completed: int | None = None
    total: int | None = None
    error: str | None = None
    upstream_status: int | None = None
    answered: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "answered"}
        done, total = self.completed, self.total
        out["percent"] = round(100.0 * done / total, 1) if done is not None and total else None
        return out


class _PullFailed(Exception):
    def __init__(self, message: str, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.upstream_status = message, upstream_status


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ModelActions:
    """Sends the actions to Ollama, follows pulls, and records each action as a model event."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: Upstream,
        writer: Writer,
        inventory: Callable[[], Inventory | None],
    ) -> None:
        self.session, self.upstream, self.writer, self.inventory = session, upstream, writer, inventory
        self.pulls: dict[str, PullState] = {}  # model key -> latest pull, oldest first
        self._tasks: set[asyncio.Task[None]] = set()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return self.session.post(
            self.upstream.url_for(path, ""),
            data=orjson.dumps(body),
            headers={
                "Host": self.upstream.host_header,
                "Content-Type": "application/json",
                "Accept-Encoding": "identity",
                "User-Agent": "ollamon-actions",
            },
        )

    async def generate(self, body: dict[str, Any]) -> None:
        """``POST /api/generate`` with no prompt (load, unload, keep): ActionError 502 unless Ollama agreed."""
        try:
            async with self._post("/api/generate", body) as resp:
                raw = await read_capped(resp)
                if resp.status >= 300:
                    raise ActionError(502, error_text(raw, resp.status), upstream_status=resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ActionError(
                502, f"cannot reach Ollama at {self.upstream}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ActionError(502, f"Ollama answered with no JSON: {error_text(raw, 200)}") from None
        if isinstance(data, dict) and "error" in data:
            raise ActionError(502, error_text(raw, 200), upstream_status=resp.status)

    def record(self, model: str, event: str, client: str | None, **detail: Any) -> None:
        """A ``model_events`` row through the writer (and in the inventory's recent events); poll soon."""
        key = model_key(model)
        inv = self.inventory()
        info = inv.models.get(key) if inv is not None else None
        ev = ModelEvent(
            timestamp=iso_utc(time.time()),
            model_name=key,
            event=event,
            model_version=info.model_version if info is not None else None,
            source="action",
            detail={"client": client, **detail},
        )
        self.writer.submit(ev)
        if inv is not None:
            inv.events.append(ev)
            if event not in ("pull_started", "pull_failed"):  # those change nothing Ollama has
                inv.refresh_soon(tags=event == "pull_done")

    # -- pulls -----------------------------------------------------------------------------------

    def start_pull(self, model: str, client: str | None) -> PullState:
        """Begin following ``/api/pull`` for ``model`` (ActionError 409 while one for it runs)."""
        key = model_key(model)
        current = self.pulls.get(key)
        if current is not None and current.status == "running":
            raise ActionError(409, f"a pull of {current.model!r} is already running", pull=current.as_dict())
        if sum(p.status == "running" for p in self.pulls.values()) >= MAX_RUNNING_PULLS:
            raise ActionError(429, f"{MAX_RUNNING_PULLS} pulls are running already; try again later")
        state = PullState(model=model, started_at=iso_utc(time.time()), client=client)
        self.pulls.pop(key, None)
        self.pulls[key] = state
        finished = [k for k, p in self.pulls.items() if p.status != "running"]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED_PULLS)]:
            del self.pulls[k]
        self.record(model, "pull_started", client)
        task = spawn(self._run_pull(state), name="model-pull")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return state

    async def _run_pull(self, state: PullState) -> None:
        try:
            async with self._post("/api/pull", {"model": state.model}) as resp:
                state.upstream_status = resp.status
                if resp.status >= 300:
                    raise _PullFailed(error_text(await read_capped(resp), resp.status), resp.status)
                state.answered.set()
                await self._follow(state, resp)
        except _PullFailed as exc:
            self._finish(state, exc.message)
        except ActionError as exc:
            self._finish(state, exc.message)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            how = "cannot reach Ollama at" if state.upstream_status is None else "pull from Ollama failed at"
            self._finish(state, f"{how} {self.upstream}: {type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            self._finish(state, "cancelled: ollamon stopped")
            raise
        finally:
            state.answered.set()

    async def _follow(self, state: PullState, resp: aiohttp.ClientResponse) -> None:
        """Read the NDJSON progress lines until ``{"status":"success"}`` or ``{"error": ...}``."""
        async for line in resp.content:
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            if "error" in data:
                raise _PullFailed(str(data["error"])[:1000], resp.status)
            status = data.get("status")
            if isinstance(status, str):
                state.last_status = status[:200]
            if isinstance(data.get("digest"), str):
                state.digest = data["digest"][:100]
            if _int(data.get("total")) is not None:  # only layer lines carry progress: keep the last
                state.total, state.completed = _int(data["total"]), _int(data.get("completed")) or 0
            if status == "success":
                self._finish(state, None)
                return
        raise _PullFailed('the pull stream ended without {"status":"success"}', resp.status)

    def _finish(self, state: PullState, error: str | None) -> None:
        if state.status != "running":
            return
        state.status, state.error = ("failed", error) if error is not None else ("success", None)
        state.finished_at = iso_utc(time.time())
        if error is None:
            self.record(state.model, "pull_done", state.client, digest=state.digest)
        else:
            self.record(state.model, "pull_failed", state.client, error=error)

    async def stop(self) -> None:
        """Cancel running pulls (each records ``pull_failed``) and wait for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


ACTIONS_KEY = web.AppKey("model_actions", ModelActions)


def _client(request: web.Request) -> str | None:
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    return client_ip(request.remote, raw, request.app[CONFIG_KEY].server.trusted_networks)


_EVENTS = {"unload": "unload", "keep": "keep_alive", "load": "load"}


async def _generate_action(request: web.Request, *, action: str) -> web.Response:
    """unload, keep or load: one ``/api/generate`` call without a prompt."""
    actions = request.app[ACTIONS_KEY]
    try:
        model, data = await read_body(request, ("model", "keep_alive") if action == "keep" else ("model",))
        body: dict[str, Any] = {"model": model}
        if action == "unload":
            body["keep_alive"] = 0
        elif action == "keep":
            if "keep_alive" not in data:
                raise ActionError(400, 'keep_alive is required, e.g. "30m", 3600 or -1 (forever)')
            body["keep_alive"] = keep_alive_value(data["keep_alive"])
        await actions.generate(body)
    except ActionError as exc:
        return exc.response()
    detail = {"keep_alive": body["keep_alive"]} if action == "keep" else {}
    actions.record(model, _EVENTS[action], _client(request), **detail)
    return json_response({"ok": True, "model": model, "action": action, **detail})


async def pull(request: web.Request) -> web.Response:
    """202 once Ollama answered the pull (or after 10 s); 502 when it refused or cannot be reached."""
    actions = request.app[ACTIONS_KEY]
    try:
        model, _ = await read_body(request, ("model",))
        state = actions.start_pull(model, _client(request))
    except ActionError as exc:
        return exc.response()
    try:
        await asyncio.wait_for(state.answered.wait(), 10.0)
    except TimeoutError:
        pass  # Ollama is slow to answer: the pull goes on; GET models/pulls tells how it ends
    refused = state.upstream_status is None or state.upstream_status >= 300
    if state.status == "failed" and refused:
        return json_response({"error": state.error, "upstream_status": state.upstream_status}, 502)
    return json_response({"ok": True, "status": "started", "model": model}, 202)


async def pulls(request: web.Request) -> web.Response:
    """Running and recently finished pulls, newest first."""
    items = [p.as_dict() for p in reversed(request.app[ACTIONS_KEY].pulls.values())]
    return json_response({"pulls": items})


async def live_models(request: web.Request) -> web.Response:
    """``{model: {in_flight, generating, waiting, loading, queued}}`` for the requests in flight now."""
    app = request.app
    inv = app.get(INVENTORY_KEY)
    loaded: Callable[[str], bool | None] | None = None
    if inv is not None:
        models = inv.models

        def loaded(name: str) -> bool | None:
            info = models.get(model_key(name))
            return None if info is None else info.loaded

    live = live_by_model(
        app[FORWARDER_KEY].live, loaded=loaded, num_parallel=app[CONFIG_KEY].inventory.num_parallel
    )
    return json_response({name: m.as_dict() for name, m in live.items()})


async def _actions_ctx(app: web.Application) -> AsyncIterator[None]:
    actions = ModelActions(
        app[SESSION_KEY],
        app[CONFIG_KEY].server.upstream_value,
        app[WRITER_KEY],
        lambda: app.get(INVENTORY_KEY),
    )
    app[ACTIONS_KEY] = actions
    yield
    await actions.stop()


def setup(app: web.Application) -> None:
    """Register the model-action routes, the live-count route, and the context that stops running pulls."""
    app.cleanup_ctx.append(_actions_ctx)
    for action in _EVENTS:
        app.router.add_post(f"{PREFIX}/models/{action}", functools.partial(_generate_action, action=action))
    app.router.add_post(f"{PREFIX}/models/pull", pull)
    app.router.add_get(f"{PREFIX}/models/pulls", pulls)
    app.router.add_get(f"{PREFIX}/live/models", live_models)
