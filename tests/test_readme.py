"""The README stays true: its curl examples and its SQL example work against a proxy in front of the emulator."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from tests.fixtures.proxy import ProxyHandle

README = (Path(__file__).parent.parent / "README.md").read_text()


def readme_commands(prefix: str) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    return [
        line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.startswith(prefix)
    ]


async def test_readme_curl_examples(emulator: Any, proxy: ProxyHandle) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed to check the README's examples"
    commands = readme_commands("curl ")
    assert len(commands) >= 3
    for command in commands:
        argv = shlex.split(command.replace("127.0.0.1:11435", proxy.host_port))
        proc = await asyncio.create_subprocess_exec(
            curl,
            "-sS",
            "--fail-with-body",
            *argv[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, (command, out, err)
        try:
            objects = [json.loads(out)]  # one JSON body (possibly indented)
        except json.JSONDecodeError:
            objects = [json.loads(x) for x in out.decode().splitlines() if x.strip()]  # an NDJSON stream
        assert objects and not any("error" in x for x in objects), (command, out)


async def test_readme_sql_example(emulator: Any, proxy: ProxyHandle) -> None:
    (command,) = readme_commands("sqlite3 ")
    sql = shlex.split(command)[2]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
        ) as r:
            await r.read()
    await proxy.wait_rows(1)
    con = sqlite3.connect(proxy.db_path)
    rows = con.execute(sql).fetchall()
    assert rows and rows[0][1] == "llama3.2:latest"  # the name Ollama resolves
