"""The Python task worker against a real hub (Redis broker, the task
declared ``kind = "external"``, no Switchboard worker) and a real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from conftest import REDIS_URL, Hub, next_event
from switchboard import Client, Task, TaskFailed, TaskFailedError, TaskUpdate, Worker
from switchboard.task_stream import GROUP, Keys

pytestmark = pytest.mark.timeout(60)

EXTERNAL = """
[tasks]
workers = 0
visibility_timeout_s = {visibility}
max_attempts = {attempts}
[tasks.handlers.report]
kind = "external"
[tasks.handlers.slow]
kind = "external"
"""


@pytest.fixture
async def r() -> AsyncIterator[aioredis.Redis]:
    conn = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield conn
    await conn.aclose()


class Running:
    """A worker serving in the test's event loop; stopped after the test."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.task = asyncio.ensure_future(worker.serve())

    async def stop(self, grace_s: float = 10) -> None:
        await self.worker.stop(grace_s)
        await asyncio.wait_for(self.task, 15)


@pytest.fixture
async def workers() -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(worker: Worker) -> Running:
        running = Running(worker)
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            await running.stop(1)


def external_hub(hubs: Any, visibility: int = 60, attempts: int = 3) -> Hub:
    hub: Hub = hubs("redis", toml=EXTERNAL.format(visibility=visibility, attempts=attempts))
    return hub


def worker_for(hub: Hub, **kw: Any) -> Worker:
    kw.setdefault("visibility_timeout_s", 60)
    return Worker(REDIS_URL, prefix=hub.prefix, **kw)


async def connected(hub: Hub, user: str, clients: list[Client]) -> Client:
    c = hub.client(user)
    clients.append(c)
    c.connect()
    await c.wait_connected(10)
    return c


async def test_a_task_runs_reports_progress_and_ends_clean(
    hubs: Any, workers: Any, clients: list[Client], r: aioredis.Redis
) -> None:
    hub = external_hub(hubs)
    worker = worker_for(hub)

    @worker.handler("report")
    async def report(task: Task) -> dict[str, Any]:
        assert await task.progress(50, "half way")
        return {"month": task.payload["month"], "by": task.user, "attempt": task.attempt}

    workers(worker)
    c = await connected(hub, "alice", clients)
    handle = await c.task("report", {"month": 11})
    updates = [u async for u in handle]
    assert [u.status for u in updates] == ["queued", "running", "progress", "done"]
    assert (updates[2].progress, updates[2].message) == (50, "half way")
    assert updates[-1].result == {"month": 11, "by": "alice", "attempt": 1}

    keys = Keys(hub.prefix)
    record = await r.hgetall(keys.record(handle.id))
    assert (record["status"], record["attempts"]) == ("done", "1")
    assert json.loads(record["result"]) == updates[-1].result
    assert "payload" not in record, "the payload goes with the outcome"
    assert not await r.sismember(keys.pending("alice"), handle.id)
    assert (await r.xpending(keys.stream, GROUP))["pending"] == 0
    async with hub.api() as api:
        assert (await api.task(handle.id)).status == "done"


async def test_a_failed_attempt_is_retried_then_dead_lettered(
    hubs: Any, workers: Any, clients: list[Client], r: aioredis.Redis
) -> None:
    hub = external_hub(hubs, attempts=2)
    worker = worker_for(hub, max_attempts=2)
    calls: list[int] = []

    @worker.handler("report")
    async def report(task: Task) -> None:
        calls.append(task.attempt)
        raise RuntimeError(f"database down (attempt {task.attempt})")

    @worker.handler("slow")
    async def flaky(task: Task) -> str:
        if task.attempt == 1:
            raise TaskFailed("try again")
        return "second time lucky"

    workers(worker)
    c = await connected(hub, "bob", clients)
    lucky = await c.task("slow", {})
    assert await lucky.result(timeout_s=20) == "second time lucky"
    doomed = await c.task("report", {"n": 1})
    with pytest.raises(TaskFailedError) as e:
        await doomed.result(timeout_s=20)
    assert e.value.error == "RuntimeError: database down (attempt 2)"
    assert calls == [1, 2]

    keys = Keys(hub.prefix)
    assert (await r.hgetall(keys.record(lucky.id)))["attempts"] == "2"
    dead = await r.xrange(keys.dead_letters)
    assert len(dead) == 1
    fields = dead[0][1]
    assert (fields["task_id"], fields["name"], fields["user"], fields["attempts"]) == (
        doomed.id,
        "report",
        "bob",
        "2",
    )
    assert json.loads(fields["payload"]) == {"n": 1}
    assert (await r.xpending(keys.stream, GROUP))["pending"] == 0


async def test_no_retry_for_a_permanent_failure_or_an_unknown_name(
    hubs: Any, workers: Any, clients: list[Client]
) -> None:
    hub = external_hub(hubs)
    worker = worker_for(hub)

    @worker.handler("report")
    async def report(task: Task) -> None:
        raise TaskFailed("month out of range", retry=False)

    workers(worker)
    c = await connected(hub, "carol", clients)
    bad = await c.task("report", {"month": 13})
    with pytest.raises(TaskFailedError) as e:
        await bad.result(timeout_s=10)
    assert e.value.error == "month out of range"
    unknown = await c.task("slow", {})
    with pytest.raises(TaskFailedError) as e:
        await unknown.result(timeout_s=10)
    assert e.value.error == "no handler for 'slow' on this worker"
    async with hub.api() as api:
        assert (await api.task(bad.id)).attempts == 1


async def test_a_task_behind_busy_hands_stays_queued_and_can_be_cancelled(
    hubs: Any, workers: Any, clients: list[Client]
) -> None:
    hub = external_hub(hubs)
    worker = worker_for(hub, concurrency=1)
    release = asyncio.Event()
    ran: list[str] = []

    @worker.handler("slow")
    async def slow(task: Task) -> str:
        ran.append(task.id)
        await release.wait()
        return "finished"

    workers(worker)
    c = await connected(hub, "dave", clients)
    first = await c.task("slow", {})
    await next_event(c, TaskUpdate, task_id=first.id, status="running")
    second = await c.task("slow", {})
    await asyncio.sleep(0.5)  # the worker would have read it by now, had it a free hand
    assert (await c.task_status(second.id)).status == "queued"
    await c.task_cancel(second.id)
    release.set()
    assert await first.result(timeout_s=10) == "finished"
    with pytest.raises(TaskFailedError) as e:
        await second.result(timeout_s=10)
    assert e.value.error == "cancelled"
    third = await c.task("slow", {})
    assert await third.result(timeout_s=10) == "finished"
    assert ran == [first.id, third.id], "the cancelled task never ran"


async def test_a_silent_workers_task_is_taken_over(
    hubs: Any, workers: Any, clients: list[Client], r: aioredis.Redis
) -> None:
    hub = external_hub(hubs, visibility=1)
    keys = Keys(hub.prefix)
    c = await connected(hub, "erin", clients)
    handle = await c.task("report", {"n": 7})
    # A worker reads the entry, starts it, and dies without a word.
    got = await r.xreadgroup(GROUP, "dead-worker", {keys.stream: ">"}, count=1)
    assert got, "the entry was read by the dead worker"
    await r.hset(keys.record(handle.id), mapping={"status": "running", "attempts": 1})

    worker = worker_for(hub, visibility_timeout_s=1)

    @worker.handler("report")
    async def report(task: Task) -> int:
        return int(task.attempt)

    workers(worker)
    assert await handle.result(timeout_s=15) == 2, "the takeover is the second attempt"
    assert (await r.xpending(keys.stream, GROUP))["pending"] == 0


async def test_a_long_attempt_keeps_its_claim(
    hubs: Any, workers: Any, clients: list[Client]
) -> None:
    hub = external_hub(hubs, visibility=1)
    calls: list[str] = []

    def make() -> Worker:
        w = worker_for(hub, visibility_timeout_s=1)

        @w.handler("slow", timeout_s=10)
        async def slow(task: Task) -> str:
            calls.append(task.id)
            await asyncio.sleep(3)  # three visibility timeouts
            return "once"

        return w

    workers(make())
    workers(make())
    c = await connected(hub, "frank", clients)
    handle = await c.task("slow", {})
    assert await handle.result(timeout_s=20) == "once"
    assert calls == [handle.id], "run by one worker, once"
    async with hub.api() as api:
        assert (await api.task(handle.id)).attempts == 1


async def test_a_worker_that_lost_its_claim_writes_nothing(
    hubs: Any, workers: Any, clients: list[Client], r: aioredis.Redis
) -> None:
    hub = external_hub(hubs)
    keys = Keys(hub.prefix)
    worker = worker_for(hub)
    taken_over = asyncio.Event()

    @worker.handler("report")
    async def report(task: Task) -> str:
        # Meanwhile another worker took the task over: a new attempt.
        await r.hincrby(keys.record(task.id), "attempts", 1)
        taken_over.set()
        return "stale result"

    running = workers(worker)
    c = await connected(hub, "gina", clients)
    handle = await c.task("report", {})
    await asyncio.wait_for(taken_over.wait(), 10)
    await running.stop()
    record = await r.hgetall(keys.record(handle.id))
    assert (record["status"], record["attempts"]) == ("running", "2")
    assert "result" not in record
    assert (await r.xpending(keys.stream, GROUP))["pending"] == 1, "left to its new owner"


async def test_stop_finishes_the_running_task_first(
    hubs: Any, workers: Any, clients: list[Client], r: aioredis.Redis
) -> None:
    hub = external_hub(hubs)
    worker = worker_for(hub)
    started = asyncio.Event()

    @worker.handler("slow")
    async def slow(task: Task) -> str:
        started.set()
        await asyncio.sleep(1)
        return "done before the stop"

    running = workers(worker)
    c = await connected(hub, "henry", clients)
    handle = await c.task("slow", {})
    await asyncio.wait_for(started.wait(), 10)
    await running.stop(grace_s=10)
    assert await handle.result(timeout_s=5) == "done before the stop"
    consumers = await r.xinfo_consumers(Keys(hub.prefix).stream, GROUP)
    assert worker.name not in [c["name"] for c in consumers], "a stopped worker leaves the group"


async def test_a_plain_function_runs_in_a_thread(
    hubs: Any, workers: Any, clients: list[Client]
) -> None:
    hub = external_hub(hubs)
    worker = worker_for(hub)

    @worker.handler("report")
    def report(task: Task) -> list[int]:
        return sorted(task.payload)

    workers(worker)
    c = await connected(hub, "ivy", clients)
    handle = await c.task("report", [3, 1, 2])
    assert await handle.result(timeout_s=10) == [1, 2, 3]


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[str]:
    """A Redis Cluster of three primaries on free ports (``redis-server
    --cluster-enabled yes`` joined by ``redis-cli --cluster create``); its
    nodes as the hub's ``redis.url`` lists them. Stopped by PID after."""
    import shutil
    import subprocess
    import time

    from conftest import free_port

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for a cluster")

    def cluster_port() -> int:
        # A node also listens on its port + 10000 (the cluster bus).
        import socket

        while True:
            port = free_port()
            if port + 10000 > 65535:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port

    ports: list[int] = []
    while len(ports) < 3:
        port = cluster_port()
        if port not in ports:
            ports.append(port)
    servers = []
    for port in ports:
        servers.append(
            subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp_path), "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for port in ports:
            for _ in range(100):
                ping = subprocess.run(["redis-cli", "-p", str(port), "ping"],
                                      capture_output=True, text=True)
                if ping.stdout.strip() == "PONG":
                    break
                time.sleep(0.05)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-yes"],
            capture_output=True, text=True,
        )
        assert created.returncode == 0, f"cluster create: {created.stdout}{created.stderr}"
        for _ in range(200):
            states = [
                subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"],
                               capture_output=True, text=True).stdout
                for p in ports
            ]
            if all("cluster_state:ok" in st for st in states):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        yield ",".join(f"redis://127.0.0.1:{p}" for p in ports)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)


async def test_on_a_redis_cluster_tasks_run_and_their_updates_reach_the_user(
    cluster: str, hubs: Any, workers: Any, clients: list[Client]
) -> None:
    """Hub in cluster mode (sharded pub/sub), the worker given the same seed
    list: every update is heard (the worker sends them with SPUBLISH), a
    retry included, and the record ends clean in the cluster."""
    hub: Hub = hubs(
        "redis",
        toml=EXTERNAL.format(visibility=60, attempts=3),
        env={"SWITCHBOARD__REDIS__MODE": "cluster", "SWITCHBOARD__REDIS__URL": cluster},
    )
    worker = Worker(cluster, prefix=hub.prefix, visibility_timeout_s=60)
    tries: list[int] = []

    @worker.handler("report")
    async def report(task: Task) -> dict[str, Any]:
        tries.append(task.attempt)
        if task.attempt == 1:
            raise RuntimeError("first try fails")
        assert await task.progress(50, "half way")
        return {"month": task.payload["month"], "attempt": task.attempt}

    workers(worker)
    c = await connected(hub, "alice", clients)
    handle = await c.task("report", {"month": 11})
    updates = [u async for u in handle]
    assert [u.status for u in updates] == ["queued", "running", "running", "progress", "done"]
    assert updates[-1].result == {"month": 11, "attempt": 2}
    assert tries == [1, 2]

    from redis.asyncio.cluster import RedisCluster

    rc = RedisCluster.from_url(cluster.split(",")[0], decode_responses=True)
    try:
        keys = Keys(hub.prefix)
        record = await rc.hgetall(keys.record(handle.id))
        assert (record["status"], record["attempts"]) == ("done", "2")
        assert "payload" not in record
        assert not await rc.zscore(keys.pending("alice"), handle.id)
        assert (await rc.xpending(keys.stream, GROUP))["pending"] == 0
    finally:
        await rc.aclose()
