"""The README's three ten-line programs, run as they are written (only the
addresses, secret, key and prefix are this test hub's)."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import API_KEY, REDIS_URL, SECRET, Hub, next_event
from switchboard import Broadcast, Client, Direct, Message

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parents[1] / "README.md"


def block(name: str, hub: Hub) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- readme: {name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"no `{name}` block in the README"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 12, f"the {name} block is no longer ten lines or so"
    return (
        code.replace("ws://localhost:8000", f"ws://127.0.0.1:{hub.port}")
        .replace("http://localhost:8000", hub.http_url)
        .replace('secret="change-me"', f'secret="{SECRET}"')
        .replace('"my-api-key"', f'"{API_KEY}"')
        .replace('prefix="sb"', f'prefix="{hub.prefix}"')
        .replace('"redis://127.0.0.1:6379"', f'"{REDIS_URL}"')
    )


async def run(code: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_the_chat_block(hubs: Any) -> None:
    hub = hubs("memory")
    proc = await run(block("chat", hub))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.decode().strip() == "alice: hello"
    finally:
        proc.kill()
        await proc.wait()


async def test_the_backend_block(hubs: Any, broker: str, clients: list[Client]) -> None:
    hub = hubs(broker)
    alice = hub.client("alice")
    clients.append(alice)
    alice.connect()
    await alice.join("lobby")
    code, output = await finish(await run(block("backend", hub)))
    assert code == 0, output
    assert (await next_event(alice, Message)).data == {"text": "deploy done"}
    assert (await next_event(alice, Direct)).data == {"text": "report ready"}
    assert (await next_event(alice, Broadcast)).data == {"text": "maintenance at 18:00"}
    assert "PresenceEntry(user='alice', connections=1)" in output
    assert "server {'text': 'deploy done'}" in output


async def test_the_worker_block(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("redis", toml='[tasks]\nworkers = 0\n[tasks.handlers.report]\nkind = "external"\n')
    proc = await run(block("worker", hub))
    try:
        c = hub.client("bob")
        clients.append(c)
        c.connect()
        handle = await c.task("report", {"month": 11})
        assert [u.status async for u in handle] == ["queued", "running", "progress", "done"]
        assert await handle.result() == {"rows": 3, "for": "bob"}
    finally:
        proc.send_signal(signal.SIGTERM)
        code, output = await finish(proc)
    assert code == 0, f"a SIGTERM is a clean stop: {output}"
