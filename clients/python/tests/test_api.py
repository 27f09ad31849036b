"""The backend HTTP API and token minting against real hubs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import API_KEY, FIXTURES, next_event
from switchboard import (
    Api,
    ApiError,
    AsyncApi,
    Broadcast,
    Client,
    Direct,
    Message,
    TaskUpdate,
    mint_token,
)

pytestmark = pytest.mark.timeout(60)


async def test_a_backend_publishes_to_a_room_a_user_and_everyone(
    hubs: Any, broker: str, clients: list[Client]
) -> None:
    hub = hubs(broker)
    alice = hub.client("alice")
    clients.append(alice)
    alice.connect()
    await alice.join("lobby")
    async with hub.api() as api:
        mid = await api.publish("lobby", {"text": "deploy done"})
        m = await next_event(alice, Message)
        assert (m.id, m.sender, m.data) == (mid, "server", {"text": "deploy done"})

        did = await api.send_to_user("alice", {"n": 1})
        d = await next_event(alice, Direct)
        assert (d.id, d.sender, d.data) == (did, "server", {"n": 1})

        bid = await api.broadcast("maintenance at 18:00")
        b = await next_event(alice, Broadcast)
        assert (b.id, b.data) == (bid, "maintenance at 18:00")

        assert [(p.user, p.connections) for p in await api.presence("lobby")] == [("alice", 1)]
        assert await api.connections("alice") == 1
        later = await api.publish("lobby", {"text": "second"})
        assert [h.id for h in await api.history("lobby")] == [mid, later]
        assert [h.data for h in await api.history("lobby", since=mid)] == [{"text": "second"}]
        assert [h.id for h in await api.history("lobby", limit=1)] == [later]
        assert (await api.stats())["connections"] == 1
        assert await api.ready()
        assert await api.disconnect("alice") == 1


async def test_the_blocking_api_does_the_same(hubs: Any) -> None:
    hub = hubs("memory")

    def calls() -> tuple[str, list[Any]]:
        with Api(hub.http_url, API_KEY) as api:
            mid = api.publish("news", {"headline": "hello"})
            return mid, [m.id for m in api.history("news")]

    mid, history = await asyncio.to_thread(calls)
    assert history == [mid]


async def test_refusals_are_api_errors(hubs: Any) -> None:
    hub = hubs("memory", toml='[tasks.handlers.echo]\nkind = "echo"\n')
    async with AsyncApi(hub.http_url, "wrong-key") as api:
        with pytest.raises(ApiError) as e:
            await api.publish("lobby", 1)
        assert (e.value.status, e.value.code) == (401, "unauthorized")
    async with hub.api() as api:
        with pytest.raises(ApiError) as e:
            await api.publish("not a room!", 1)
        assert (e.value.status, e.value.code) == (400, "bad_request")
        with pytest.raises(ApiError) as e:
            await api.task("no-such-task")
        assert e.value.status == 404
        with pytest.raises(ApiError) as e:
            await api.history("lobby", since="yesterday")
        assert (e.value.status, e.value.code) == (400, "bad_request")


async def test_progress_for_a_finished_task_is_a_conflict(
    hubs: Any, broker: str, clients: list[Client]
) -> None:
    hub = hubs(broker, toml='[tasks.handlers.echo]\nkind = "echo"\n')
    c = hub.client("bob")
    clients.append(c)
    c.connect()
    handle = await c.task("echo", {"x": 1})
    await handle.result(timeout_s=10)
    async with hub.api() as api:
        record = await api.task(handle.id)
        assert (record.status, record.user, record.name) == ("done", "bob", "echo")
        with pytest.raises(ApiError) as e:
            await api.task_progress(handle.id, 50)
        assert (e.value.status, e.value.code) == (409, "conflict")
    assert not any(
        isinstance(ev, TaskUpdate) and ev.status == "progress" for ev in list(c._events)
    )


@pytest.mark.parametrize(
    "algorithm,key",
    [
        ("HS384", None),
        ("HS512", None),
        ("RS256", "rsa"),
        ("ES256", "ec"),
    ],
)
async def test_minted_tokens_are_accepted_for_each_algorithm(
    hubs: Any, clients: list[Client], algorithm: str, key: Any
) -> None:
    env = {"SWITCHBOARD__AUTH__JWT_ALGORITHM": algorithm}
    kw: dict[str, Any] = {"algorithm": algorithm}
    if key:
        env["SWITCHBOARD__AUTH__JWT_PUBLIC_KEY_FILE"] = str(FIXTURES / f"{key}_public.pem")
        kw["private_key"] = (FIXTURES / f"{key}_private.pem").read_text()
    else:
        kw["secret"] = "a-secret-for-this-test-" + "x" * 64
        env["SWITCHBOARD__AUTH__JWT_SECRET"] = kw["secret"]
    env["SWITCHBOARD__AUTH__AUDIENCE"] = "chat"
    env["SWITCHBOARD__AUTH__ISSUER"] = "backend"
    hub = hubs("memory", env=env)
    token = mint_token("zoe", rooms=["chat.*"], audience="chat", issuer="backend", **kw)
    c = Client(hub.ws_url, token=token)
    clients.append(c)
    c.connect()
    await c.wait_connected(10)
    assert c.user == "zoe"
    await c.join("chat.1")


def test_mint_token_refuses_what_the_hub_would() -> None:
    with pytest.raises(ValueError):
        mint_token("zoe", algorithm="none", secret="s")
    with pytest.raises(ValueError):
        mint_token("zoe", algorithm="RS256", secret="s")
    with pytest.raises(ValueError):
        mint_token("", secret="s")
