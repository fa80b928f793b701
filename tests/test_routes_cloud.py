"""Cloud models (issue 10): a model with an explicit cloud source is recorded with ``cloud`` set.

The rule is Ollama's ``types/modelref`` (spec §2): the part after the last ``:`` is ``cloud``, or ends in
``-cloud``. The emulator serves such names like any other model, so the rows come from real traffic.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.emulator import ModelSpec
from storage.model_names import is_cloud_model
from tests.fixtures.emulator import MakeEmulator
from tests.fixtures.proxy import MakeProxy


@pytest.mark.parametrize(
    ("name", "cloud"),
    [
        ("gpt-oss:20b-cloud", True),
        ("gpt-oss:20b:cloud", True),
        ("glm-4.6:cloud", True),
        ("GLM-4.6:CLOUD", True),
        ("qwen3-coder:480b-Cloud", True),
        ("registry.ollama.ai/library/glm-4.6:cloud", True),
        ("llama3.2:latest", False),
        ("llama3.2", False),
        ("cloud", False),  # a model called cloud, tag latest
        ("cloud-model:7b", False),
        ("gpt-oss:20b:local", False),
        ("gpt-oss:20b-cloud:local", False),  # the explicit local source wins
        ("gpt-oss:20b-cloud:cloud", False),  # two sources: Ollama refuses the name
        ("gpt-oss:local:cloud", False),
        ("host:5000/ns/model-cloud", False),  # a port, not a tag
        ("", False),
        (None, False),
    ],
)
def test_explicit_cloud_source(name: str | None, cloud: bool) -> None:
    assert is_cloud_model(name) is cloud


async def test_cloud_rows_are_flagged_and_the_api_shows_it(
    make_emulator: MakeEmulator, make_proxy: MakeProxy
) -> None:
    models = [
        ModelSpec(name="llama3.2:latest", capabilities=("completion", "tools")),
        ModelSpec(name="gpt-oss:20b-cloud", capabilities=("completion", "tools")),
        ModelSpec(name="glm-4.6:cloud", capabilities=("completion", "tools")),
    ]
    emu = await make_emulator(models=models)
    proxy = await make_proxy(emu.url)
    messages = [{"role": "user", "content": "hello"}]
    sent = [
        ("/api/chat", "gpt-oss:20b-cloud", True),
        ("/v1/chat/completions", "GLM-4.6:cloud", True),
        ("/api/chat", "llama3.2", False),
    ]
    ids: dict[str, bool] = {}
    async with aiohttp.ClientSession() as s:
        for path, model, cloud in sent:
            body: dict[str, Any] = {"model": model, "messages": messages, "stream": False}
            async with s.post(proxy.url + path, json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
                ids[r.headers["X-Request-Id"]] = cloud
        rows = await proxy.wait_rows(3)
        assert {r["request_id"]: r["cloud"] for r in rows} == {k: int(v) for k, v in ids.items()}
        assert {r["model_name"] for r in rows if r["cloud"]} == {"gpt-oss:20b-cloud", "glm-4.6:cloud"}
        async with s.get(f"{proxy.url}/ollamon/api/requests?limit=10") as r:
            assert r.status == 200
            listed = (await r.json())["requests"]
    # The API row reads like the record: a boolean, as success / stream / cancelled are.
    assert {row["request_id"]: row["cloud"] for row in listed} == ids
    assert all(type(row["cloud"]) is bool for row in listed)
