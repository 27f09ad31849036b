"""Test support: start real ``switchboard serve`` processes (memory or Redis
broker, a unique Redis prefix each), mint tokens, cut connections.

The hub binary is ``$SWITCHBOARD_BIN``, by default the repository's
``target/debug/switchboard`` (``cargo build`` first); Redis is ``$REDIS_URL``
(default ``redis://127.0.0.1:6379``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import pytest
import redis

from switchboard import AsyncApi, Client, mint_token

REPO = Path(__file__).resolve().parents[3]
HUB_BIN = os.environ.get("SWITCHBOARD_BIN") or str(REPO / "target" / "debug" / "switchboard")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
SECRET = "python-tests-secret-32-bytes-or-more"
API_KEY = "test-api-key"
FIXTURES = REPO / "tests" / "fixtures"
WAIT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def delete_prefix(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


class Hub:
    """A ``switchboard serve`` process on 127.0.0.1."""

    def __init__(
        self,
        broker: str = "memory",
        toml: str = "",
        env: Optional[dict[str, str]] = None,
        prefix: Optional[str] = None,
        port: int = 0,
    ) -> None:
        if not os.path.exists(HUB_BIN):
            raise RuntimeError(f"no hub binary at {HUB_BIN}: run `cargo build` (or set SWITCHBOARD_BIN)")
        self.broker = broker
        self.prefix = prefix or f"sbpytest-{uuid.uuid4().hex[:12]}"
        self.dir = tempfile.TemporaryDirectory(prefix="sb-hub-")
        self.config = Path(self.dir.name) / "switchboard.toml"
        self.config.write_text(toml)
        self.log_path = Path(self.dir.name) / "hub.log"
        self.env = {
            **os.environ,
            "SWITCHBOARD__SERVER__HOST": "127.0.0.1",
            "SWITCHBOARD__BROKER__KIND": broker,
            "SWITCHBOARD__REDIS__URL": REDIS_URL,
            "SWITCHBOARD__REDIS__PREFIX": self.prefix,
            "SWITCHBOARD__AUTH__JWT_SECRET": SECRET,
            "SWITCHBOARD__AUTH__API_KEYS": API_KEY,
            "SWITCHBOARD__SERVER__WORKERS": "2",
            "SWITCHBOARD__SERVER__SHUTDOWN_GRACE_S": "2",
            "RUST_LOG": "switchboard=debug,info",
            **(env or {}),
        }
        self.env.pop("SWITCHBOARD_CONFIG", None)
        self.port = port
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def start(self) -> None:
        """Starts the process (again, on the same port after a stop)."""
        env = {**self.env, "SWITCHBOARD__SERVER__PORT": str(self.port)}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [HUB_BIN, "serve", "--config", str(self.config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        try:
            self.port = int(line.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise RuntimeError(f"hub did not start: {line!r}\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, **kw: Any) -> str:
        return mint_token(user, secret=SECRET, **kw)

    def api(self) -> AsyncApi:
        return AsyncApi(self.http_url, API_KEY)

    def client(self, user: str, **kw: Any) -> Client:
        kw.setdefault("token", self.token(user))
        return Client(self.ws_url, **kw)

    def close(self) -> None:
        self.stop()
        if self.broker == "redis":
            delete_prefix(self.prefix)
        self.dir.cleanup()


@pytest.fixture
def hubs(request: pytest.FixtureRequest) -> Iterator[Callable[..., Hub]]:
    """``hubs(broker, toml=…, env=…)`` starts a hub, stopped (and its Redis
    keys deleted) after the test; its log is printed when the test failed."""
    started: list[Hub] = []

    def start(broker: str = "memory", **kw: Any) -> Hub:
        hub = Hub(broker, **kw)
        started.append(hub)
        return hub

    yield start
    failed = getattr(request.node, "rep_call", None)
    for hub in started:
        if failed is not None and failed.failed:
            print(f"---- hub log (port {hub.port}) ----\n{hub.log()[-8000:]}")
        hub.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(params=["memory", "redis"])
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients appended here are closed after the test."""
    made: list[Client] = []
    yield made
    for c in made:
        await c.close()


async def next_event(client: Client, kind: type, timeout: float = WAIT, **match: Any) -> Any:
    """The next event of that class (and those attribute values), skipping others."""

    async def find() -> Any:
        async for event in client.events(kind):
            if all(getattr(event, k) == v for k, v in match.items()):
                return event
        raise AssertionError(f"client closed before a {kind.__name__} {match}")

    return await asyncio.wait_for(find(), timeout)


async def eventually(check: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Polls ``check`` (plain or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout} s (last: {last!r})")


class Proxy:
    """A TCP proxy in front of a hub whose connections a test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: Optional[asyncio.base_events.Server] = None
        self.port = 0

    async def start(self) -> "Proxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.discard(writer)
        self._conns.discard(up_writer)

    def cut(self) -> None:
        """Drops every connection at once (no close frame: a 1006 for the client)."""
        for w in list(self._conns):
            transport = w.transport
            transport.abort()
        self._conns.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
