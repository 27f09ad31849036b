"""The asyncio client against real hubs: what an application sees."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from conftest import API_KEY, SECRET, Proxy, eventually, free_port, next_event
from switchboard import (
    AsyncApi,
    Client,
    Closed,
    Connected,
    Disconnected,
    Joined,
    Message,
    Recovery,
    SwitchboardError,
    TaskFailedError,
    TaskUpdate,
    mint_token,
)

pytestmark = pytest.mark.timeout(60)


async def test_two_clients_chat_and_see_each_other(hubs: Any, broker: str, clients: list[Client]) -> None:
    hub = hubs(broker)
    alice = hub.client("alice")
    bob = hub.client("bob")
    clients += [alice, bob]
    alice.connect()
    bob.connect()
    assert (await alice.join("lobby")).recovered is None
    await bob.join("lobby")
    assert await next_event(alice, Joined, user="bob") == Joined("lobby", "bob")

    mid = await alice.publish("lobby", {"text": "hello"})
    for c in (alice, bob):
        m = await next_event(c, Message)
        assert (m.id, m.room, m.sender, m.data) == (mid, "lobby", "alice", {"text": "hello"})

    who = await bob.presence("lobby")
    assert sorted((p.user, p.connections) for p in who) == [("alice", 1), ("bob", 1)]
    assert alice.user == "alice" and alice.state == "connected"


async def test_refusals_are_errors_with_the_hubs_code(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("memory")
    c = hub.client("carol", token=hub.token("carol", rooms=["chat.*"]))
    clients.append(c)
    c.connect()
    with pytest.raises(SwitchboardError) as e:
        await c.join("lobby")
    assert e.value.code == "forbidden"
    assert c.joined_rooms == []
    with pytest.raises(SwitchboardError) as e:
        await c.publish("chat.x", "not joined")
    assert e.value.code == "forbidden"
    with pytest.raises(SwitchboardError) as e:
        await c.task("no-such-task", {})
    assert e.value.code == "not_found"
    with pytest.raises(TypeError):
        await c.publish("chat.x", object())  # not JSON: refused at the call
    await c.join("chat.x")
    assert await c.publish("chat.x", "still connected")


async def test_a_timed_out_request_is_never_sent_and_the_buffer_is_bounded(
    hubs: Any, clients: list[Client]
) -> None:
    port = free_port()  # nothing listens there yet
    c = Client(
        f"ws://127.0.0.1:{port}/ws",
        token=_token("dave"),
        max_queue=2,
        backoff_max_s=0.3,
    )
    clients.append(c)
    c.connect()
    joined = asyncio.ensure_future(c.join("lobby", timeout_s=30))
    with pytest.raises(SwitchboardError) as e:
        await c.publish("lobby", {"text": "too late"}, timeout_s=0.3)
    assert e.value.code == "timeout"
    on_time = asyncio.ensure_future(c.publish("lobby", {"text": "on time"}, timeout_s=30))
    second = asyncio.ensure_future(c.publish("lobby", {"text": "also on time"}, timeout_s=30))
    await asyncio.sleep(0)
    with pytest.raises(SwitchboardError) as e:
        await c.publish("lobby", {"text": "one too many"})
    assert e.value.code == "queue_full"

    hub = hubs("memory", port=port)
    await joined
    ids = [await on_time, await second]
    async with hub.api() as api:
        history = await api.history("lobby")
    assert [m.data["text"] for m in history] == ["on time", "also on time"]
    assert [m.id for m in history] == ids


def _token(user: str, **kw: Any) -> str:
    return mint_token(user, secret=SECRET, **kw)


async def test_a_cut_connection_recovers_every_message_once_in_order(
    hubs: Any, broker: str, clients: list[Client]
) -> None:
    hub = hubs(broker)
    proxy = await Proxy(hub.port).start()
    c = Client(proxy.ws_url, token=hub.token("erin"), backoff_initial_s=0.2, backoff_max_s=0.5)
    clients.append(c)
    got: list[str] = []
    c.on(Message, lambda m: got.append(m.id))
    recoveries: list[Recovery] = []
    c.on(Recovery, recoveries.append)
    c.connect()
    await c.join("feed")
    sent: list[str] = []
    async with hub.api() as api:
        for n in range(10):
            sent.append(await api.publish("feed", {"n": n}))
        await eventually(lambda: got[-1:] == sent[-1:], what="first ten delivered")
        proxy.refusing = True
        proxy.cut()
        await eventually(lambda: c.state != "connected", what="the cut seen")
        for n in range(10, 30):
            sent.append(await api.publish("feed", {"n": n}))
        proxy.refusing = False
        await eventually(lambda: recoveries, what="a rejoin")
        for n in range(30, 40):
            sent.append(await api.publish("feed", {"n": n}))
    await eventually(lambda: got[-1:] == sent[-1:], what="all delivered")
    assert recoveries == [Recovery("feed", True, sent[9])]
    assert got == sent, "every message once, in order"
    await proxy.close()


async def test_going_away_reconnects_after_a_delay_in_the_window(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("memory")
    c = hub.client("frank", going_away_delay_s=(0.5, 1.5))
    clients.append(c)
    c.connect()
    await c.join("lobby")
    hub.stop(signal.SIGTERM)
    gone = await next_event(c, Disconnected)
    assert (gone.code, gone.reason, gone.will_reconnect) == (1001, "going away", True)
    assert gone.delay is not None and 0.5 <= gone.delay <= 1.5, gone
    hub.start()
    back = await next_event(c, Connected)
    assert back.reconnected
    assert await c.publish("lobby", "after the restart")


async def test_the_token_is_refreshed_before_it_expires(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("memory")
    issued: list[str] = []

    async def token() -> str:
        issued.append(hub.token("gina", ttl_s=3))
        return issued[-1]

    c = hub.client("gina", token=token)
    clients.append(c)
    c.connect()
    await c.wait_connected(10)
    # Without refreshes the hub would close the connection (1008 token expired) after 3 s.
    await eventually(lambda: len(issued) >= 4, timeout=12, what="three refreshes")
    await c.ping()
    assert not any(isinstance(e, Disconnected) for e in _drain(c)), "never disconnected"


def _drain(c: Client) -> list[Any]:
    out = list(c._events)
    c._events.clear()
    return out


async def test_a_kicked_client_stops_for_good(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("memory")
    c = hub.client("henry")
    clients.append(c)
    c.connect()
    await c.wait_connected(10)
    async with AsyncApi(hub.http_url, API_KEY) as api:
        assert await api.disconnect("henry") == 1
    closed = await next_event(c, Closed)
    assert (closed.code, closed.reason) == (1008, "kicked")
    assert c.state == "closed"
    with pytest.raises(SwitchboardError) as e:
        await c.ping()
    assert e.value.code == "closed"


async def test_a_bad_token_is_not_retried(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("memory")
    c = Client(hub.ws_url, token="not-a-jwt")
    clients.append(c)
    c.connect()
    with pytest.raises(SwitchboardError) as e:
        await c.join("lobby")
    assert e.value.code == "closed"
    closed = await next_event(c, Closed)
    assert (closed.code, closed.reason) == (1008, "unauthorized")


async def test_a_task_is_followed_to_its_result(hubs: Any, broker: str, clients: list[Client]) -> None:
    hub = hubs(broker, toml='[tasks.handlers.echo]\nkind = "echo"\n')
    c = hub.client("ivy")
    clients.append(c)
    c.connect()
    handle = await c.task("echo", {"x": 1}, idempotency_key="k1")
    statuses = [u.status async for u in handle]
    assert statuses == ["queued", "running", "done"]
    assert await handle.result() == {"x": 1}
    again = await c.task("echo", {"x": 2}, idempotency_key="k1")
    assert again.id == handle.id
    record = await c.task_status(handle.id)
    assert (record.status, record.attempts, record.result) == ("done", 1, {"x": 1})
    updates = [e for e in _drain(c) if isinstance(e, TaskUpdate) and e.task_id == handle.id]
    assert updates[0].status == "queued"


async def test_a_failed_task_raises(hubs: Any, clients: list[Client]) -> None:
    hub = hubs(
        "memory",
        toml='[tasks]\nmax_attempts = 1\n[tasks.handlers.down]\nkind = "webhook"\n'
        f'url = "http://127.0.0.1:{free_port()}/nothing"\n',
    )
    c = hub.client("jack")
    clients.append(c)
    c.connect()
    handle = await c.task("down", {})
    with pytest.raises(TaskFailedError):
        await handle.result(timeout_s=20)
