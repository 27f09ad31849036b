"""The FastAPI example end to end: a hub (Redis broker) whose `report` task is
the app's webhook, the app under uvicorn, and a user who logs in, connects,
receives a notification published by a route, submits a report and sees it
done. Run by `bash clients/python/ci.sh`; needs the hub built
(`cargo build`) and Redis ($REDIS_URL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

from switchboard import Client, Message

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HUB_BIN = os.environ.get("SWITCHBOARD_BIN") or str(REPO / "target" / "debug" / "switchboard")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
SECRET = "fastapi-example-test-secret-32-bytes"
API_KEY = "fastapi-example-api-key"
REPORT_SECRET = "fastapi-example-report-secret"

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stack() -> Iterator[dict[str, str]]:
    """The hub and the app, as docker-compose's `fastapi` profile runs them."""
    app_port = free_port()
    prefix = f"sbfastapi-{uuid.uuid4().hex[:10]}"
    tmp = tempfile.TemporaryDirectory()
    config = Path(tmp.name) / "switchboard.toml"
    config.write_text(
        "[tasks.handlers.report]\n"
        'kind = "webhook"\n'
        f'url = "http://127.0.0.1:{app_port}/tasks/report"\n'
        "timeout_s = 30\n"
        f'headers = {{ "X-Report-Secret" = "{REPORT_SECRET}" }}\n'
    )
    hub_log = open(Path(tmp.name) / "hub.log", "wb")
    hub = subprocess.Popen(
        [HUB_BIN, "serve", "--config", str(config)],
        env={
            **os.environ,
            "SWITCHBOARD__SERVER__HOST": "127.0.0.1",
            "SWITCHBOARD__SERVER__PORT": "0",
            "SWITCHBOARD__SERVER__WORKERS": "2",
            "SWITCHBOARD__BROKER__KIND": "redis",
            "SWITCHBOARD__REDIS__URL": REDIS_URL,
            "SWITCHBOARD__REDIS__PREFIX": prefix,
            "SWITCHBOARD__AUTH__JWT_SECRET": SECRET,
            "SWITCHBOARD__AUTH__API_KEYS": API_KEY,
        },
        stdout=subprocess.PIPE,
        stderr=hub_log,
    )
    assert hub.stdout is not None
    line = hub.stdout.readline().decode()
    hub_port = line.strip().rsplit(":", 1)[-1]
    assert hub_port.isdigit(), f"hub did not start: {line!r}"
    app_log = open(Path(tmp.name) / "app.log", "wb")
    app = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(app_port)],
        cwd=HERE,
        env={
            **os.environ,
            "SWITCHBOARD_URL": f"http://127.0.0.1:{hub_port}",
            "SWITCHBOARD_PUBLIC_WS": f"ws://127.0.0.1:{hub_port}/ws",
            "SWITCHBOARD_API_KEY": API_KEY,
            "SWITCHBOARD_JWT_SECRET": SECRET,
            "REPORT_SECRET": REPORT_SECRET,
            "REPORT_STEP_S": "0.2",
        },
        stdout=app_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{app_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health").json().get("hub_ready"):
                    break
            except httpx.HTTPError:
                pass
            assert app.poll() is None and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.1)
        yield {"app": base}
    except BaseException:
        raise
    finally:
        for proc in (app, hub):
            proc.kill()
            proc.wait()
        hub_log.close()
        app_log.close()
        for name in ("hub.log", "app.log"):
            text = (Path(tmp.name) / name).read_text(errors="replace")
            print(f"---- {name} ----\n{text[-4000:]}")
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()
        tmp.cleanup()


async def test_log_in_connect_get_notified_and_run_a_report(stack: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=stack["app"]) as http:
        refused = await http.post("/login", json={"username": "alice", "password": "nope"})
        assert refused.status_code == 401
        alice = (await http.post("/login", json={"username": "alice", "password": "wonderland"})).json()
        bob = (await http.post("/login", json={"username": "bob", "password": "builder"})).json()

        async with Client(alice["ws_url"], token=alice["token"]) as sb:
            await sb.join("notifications")
            sent = await http.post(
                "/notifications",
                json={"text": "the build is green"},
                headers={"authorization": f"Bearer {bob['token']}"},
            )
            assert sent.status_code == 200, sent.text
            note = await anext(sb.events(Message))
            assert (note.id, note.room, note.sender) == (sent.json()["id"], "notifications", "server")
            assert note.data == {"text": "the build is green", "by": "bob"}

            report = await sb.task("report", {"months": 3})
            updates = [u async for u in report]
            assert [u.status for u in updates] == [
                "queued",
                "running",
                "progress",
                "progress",
                "progress",
                "done",
            ]
            assert [u.progress for u in updates if u.status == "progress"] == [33, 66, 100]
            assert updates[-1].result == {
                "user": "alice",
                "rows": [{"month": m, "signups": 10 * m} for m in (1, 2, 3)],
            }
