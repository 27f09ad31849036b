"""Room publishes are safe to retry: every one carries an idempotency key,
and one answered ``unavailable`` (HTTP 503) or cut off by a dropped
connection is sent again with the same key, within its time-out, and stored
once. The outages are real: ``CLIENT PAUSE … WRITE`` on the hub's Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any, Iterator

import httpx
import pytest
import redis

from conftest import API_KEY, REDIS_URL, Proxy, eventually, next_event
from switchboard import Api, ApiError, AsyncApi, Client, Message, SwitchboardError

pytestmark = pytest.mark.timeout(60)


class Spy:
    """The frames a client sends (as sent, with their ``ref``) and the error
    frames it receives."""

    def __init__(self, client: Client) -> None:
        self.sent: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        enqueue, on_frame = client._enqueue, client._on_frame

        def spy_enqueue(req: Any, front: bool = False) -> None:
            self.sent.append(json.loads(req.text))
            enqueue(req, front)

        def spy_on_frame(raw: Any) -> None:
            f = json.loads(raw)
            if isinstance(f, dict) and f.get("type") == "error":
                self.errors.append(f)
            on_frame(raw)

        client._enqueue = spy_enqueue  # type: ignore[method-assign]
        client._on_frame = spy_on_frame  # type: ignore[method-assign]

    def publishes(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("type") == "publish"]


@contextlib.contextmanager
def redis_paused(ms: int) -> Iterator[redis.Redis]:
    """Redis holds every write (scripts included) for ``ms`` milliseconds."""
    r = redis.Redis.from_url(REDIS_URL)
    r.execute_command("CLIENT", "PAUSE", ms, "WRITE")
    try:
        yield r
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        r.close()


def publish_keys(prefix: str, room: str) -> dict[str, str]:
    """The hub's records of keyed publishes to ``room``: key name -> id."""
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        names = list(r.scan_iter(match=f"{prefix}:pub:*", count=1000))
        return {n: str(r.get(n)) for n in names if n.startswith(f"{prefix}:pub:{{{room}}}:")}
    finally:
        r.close()


# -- the key ---------------------------------------------------------------------


async def test_every_publish_carries_an_idempotency_key(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("redis")
    c = hub.client("alice")
    clients.append(c)
    spy = Spy(c)
    c.connect()
    await c.join("lobby")

    first = await c.publish("lobby", {"n": 1})
    second = await c.publish("lobby", {"n": 1})
    generated = [f["idempotency_key"] for f in spy.publishes()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in generated), generated
    assert generated[0] != generated[1], "a new key per call"
    assert first != second, "two calls are two messages"

    mine = await c.publish("lobby", {"n": 2}, idempotency_key="order-42")
    again = await c.publish("lobby", {"n": 2}, idempotency_key="order-42")
    assert [f["idempotency_key"] for f in spy.publishes()[2:]] == ["order-42", "order-42"]
    assert again == mine, "the same key: acked with the first id"
    widest = "é" * 128  # 256 bytes of UTF-8: the longest key the hub takes
    assert await c.publish("lobby", {"n": 3}, idempotency_key=widest)

    records = publish_keys(hub.prefix, "lobby")
    for key, mid in [(generated[0], first), (generated[1], second), ("order-42", mine)]:
        assert [v for n, v in records.items() if n.endswith(f":{key}")] == [mid], records
    async with hub.api() as api:
        history = await api.history("lobby")
    assert [m.data for m in history] == [{"n": 1}, {"n": 1}, {"n": 2}, {"n": 3}]


async def test_a_bad_idempotency_key_is_refused_at_the_call() -> None:
    c = Client("ws://127.0.0.1:9/ws", token="never-sent")  # never connected
    for bad in ["", "x" * 257, "é" * 129, "\ud800"]:
        with pytest.raises(ValueError, match="idempotency_key"):
            await c.publish("lobby", 1, idempotency_key=bad)
    with pytest.raises(TypeError, match="idempotency_key"):
        await c.publish("lobby", 1, idempotency_key=42)  # type: ignore[arg-type]
    with Api("http://127.0.0.1:9", API_KEY) as api:
        with pytest.raises(ValueError, match="idempotency_key"):
            api.publish("lobby", 1, idempotency_key="")
    async with AsyncApi("http://127.0.0.1:9", API_KEY) as aapi:
        with pytest.raises(ValueError, match="idempotency_key"):
            await aapi.publish("lobby", 1, idempotency_key="x" * 257)


async def test_the_http_api_sends_a_key_with_room_publishes_only(hubs: Any) -> None:
    hub = hubs("redis")
    bodies: list[dict[str, Any]] = []

    async def record(request: httpx.Request) -> None:
        if request.url.path == "/api/publish":
            bodies.append(json.loads(request.content))

    async with hub.api() as api:
        api._http.event_hooks["request"].append(record)
        mid = await api.publish("news", {"n": 1})
        assert await api.publish("news", {"n": 2}, idempotency_key="k") == await api.publish(
            "news", {"n": 2}, idempotency_key="k"
        )
        await api.send_to_user("alice", 1)
        await api.broadcast(1)
        assert [m.id for m in await api.history("news")][0] == mid
        assert len(await api.history("news")) == 2
    assert re.fullmatch(r"[0-9a-f]{32}", bodies[0]["idempotency_key"])
    assert [b.get("idempotency_key") for b in bodies[1:]] == ["k", "k", None, None]


# -- retries against a real outage ---------------------------------------------------------


@pytest.mark.parametrize("via", ["client", "http"])
async def test_a_publish_answered_unavailable_is_retried_with_its_key_and_stored_once(
    hubs: Any, clients: list[Client], via: str
) -> None:
    hub = hubs("redis", env={"SWITCHBOARD__REDIS__TIMEOUT_S": "1"})
    listener = hub.client("listener")
    publisher = hub.client("alice")
    clients += [listener, publisher]
    heard: list[Message] = []
    listener.on(Message, heard.append)
    listener.connect()
    publisher.connect()
    await listener.join("lobby")
    await publisher.join("lobby")
    earlier = await publisher.publish("lobby", {"n": 0})
    await eventually(lambda: [m.id for m in heard] == [earlier], what="the first message heard")

    spy = Spy(publisher)
    statuses: list[int] = []
    bodies: list[dict[str, Any]] = []

    async def on_request(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))

    async def on_response(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    async with AsyncApi(hub.http_url, API_KEY, timeout_s=10) as api:
        api._http.event_hooks = {"request": [on_request], "response": [on_response]}
        with redis_paused(2500):
            if via == "client":
                mid = await publisher.publish("lobby", {"n": 1}, timeout_s=10)
            else:
                mid = await api.publish("lobby", {"n": 1})

    if via == "client":
        assert [e["code"] for e in spy.errors] and {e["code"] for e in spy.errors} == {"unavailable"}
        attempts = spy.publishes()
        assert len(attempts) == len(spy.errors) + 1, (attempts, spy.errors)
        assert len({a["ref"] for a in attempts}) == len(attempts), "a fresh ref each time"
    else:
        assert statuses[:-1] and set(statuses[:-1]) == {503} and statuses[-1] == 200, statuses
        attempts = bodies
    assert len({a["idempotency_key"] for a in attempts}) == 1, "the same key each time"

    await eventually(lambda: mid in [m.id for m in heard], what="the retried message heard")
    await asyncio.sleep(1.5)  # a duplicate would come by now
    assert [(m.id, m.data) for m in heard] == [(earlier, {"n": 0}), (mid, {"n": 1})]

    late = hub.client("late")
    clients.append(late)
    late.connect()
    await late.join("lobby", since=earlier)
    replayed = await next_event(late, Message)
    assert (replayed.id, replayed.data) == (mid, {"n": 1})
    await asyncio.sleep(0.5)
    assert not [e for e in list(late._events) if isinstance(e, Message)], "replayed once"
    async with hub.api() as api:
        assert [m.data for m in await api.history("lobby", since=earlier)] == [{"n": 1}]


async def test_time_up_raises_the_last_unavailable_with_the_key(hubs: Any, clients: list[Client]) -> None:
    hub = hubs("redis", env={"SWITCHBOARD__REDIS__TIMEOUT_S": "1"})
    c = hub.client("alice")
    clients.append(c)
    spy = Spy(c)
    c.connect()
    await c.join("lobby")
    async with AsyncApi(hub.http_url, API_KEY, timeout_s=2) as api:
        with redis_paused(4500):
            with pytest.raises(SwitchboardError) as e:
                await c.publish("lobby", {"n": 1}, idempotency_key="k-1", timeout_s=2)
            with pytest.raises(ApiError) as http_e:
                await api.publish("lobby", {"n": 2}, idempotency_key="k-2")
    assert e.value.code == "unavailable" and e.value.idempotency_key == "k-1", e.value
    assert len(spy.publishes()) >= 2, "retried before the time was up"
    assert (http_e.value.status, http_e.value.idempotency_key) == (503, "k-2"), http_e.value

    # Later, the same keys: a publish that went through meanwhile is not made twice.
    mid = await c.publish("lobby", {"n": 1}, idempotency_key="k-1")
    async with hub.api() as api:
        sid = await api.publish("lobby", {"n": 2}, idempotency_key="k-2")
        history = await api.history("lobby")
    assert sorted((m.sender, m.id) for m in history) == [("alice", mid), ("server", sid)]


async def test_a_publish_cut_off_by_a_dropped_connection_is_sent_again_once(
    hubs: Any, clients: list[Client]
) -> None:
    hub = hubs("redis")  # redis.timeout_s 5: a paused write waits
    proxy = await Proxy(hub.port).start()
    listener = hub.client("listener")
    publisher = Client(proxy.ws_url, token=hub.token("alice"), backoff_initial_s=0.2, backoff_max_s=0.3)
    clients += [listener, publisher]
    heard: list[Message] = []
    listener.on(Message, heard.append)
    listener.connect()
    publisher.connect()
    await listener.join("lobby")
    await publisher.join("lobby")
    spy = Spy(publisher)

    with redis_paused(2500):
        pending = asyncio.ensure_future(publisher.publish("lobby", {"n": 1}, timeout_s=15))
        await eventually(lambda: spy.publishes(), what="the publish sent")
        await asyncio.sleep(0.3)
        proxy.cut()  # the hub holds the publish, waiting on Redis
        mid = await pending

    attempts = spy.publishes()
    assert len(attempts) == 2, attempts
    assert attempts[0]["idempotency_key"] == attempts[1]["idempotency_key"]
    await eventually(lambda: mid in [m.id for m in heard], what="the message heard")
    await asyncio.sleep(1.5)
    assert [(m.id, m.data) for m in heard] == [(mid, {"n": 1})]
    async with hub.api() as api:
        assert [m.id for m in await api.history("lobby")] == [mid]
    await proxy.close()
