"""A task worker for handlers written in Python.

.. code-block:: python

    from switchboard import Worker, Task

    worker = Worker("redis://127.0.0.1:6379", prefix="sb", concurrency=4)

    @worker.handler("report")
    async def report(task: Task) -> dict:
        await task.progress(50, "half way")
        return {"rows": 3}

    worker.run()   # until SIGTERM / SIGINT; finishes what it holds first

The hub must leave these tasks to you: declare them ``kind = "external"`` and
run no Switchboard worker on the same prefix (``tasks.workers = 0``).

The worker has ``concurrency`` hands. It reads only as many stream entries as
it has free hands, so a task waiting behind busy hands stays ``queued`` (and
can still be cancelled). Each entry is started only if its record allows it,
renewed while it runs, retried with an exponential backoff after a failed
attempt, and finished only if the record still shows this worker's attempt;
after ``max_attempts`` it is failed and copied to the dead letters. The Redis
side of each of these steps is :mod:`switchboard.task_stream`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from .task_stream import AnyRedis, Entry, Keys, TaskStream

REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
"""What a Redis (or a Redis Cluster) that is away or failing over raises: the
worker waits and tries again."""

log = logging.getLogger("switchboard.worker")

HandlerResult = Any
Handler = Callable[["Task"], Union[Awaitable[HandlerResult], HandlerResult]]

READ_BLOCK_MS = 1000
"""How long one read waits for new entries (a stop is seen after it)."""

LOST_ERROR = "worker lost"
"""The error of a task whose last worker died with its attempts spent."""


class TaskFailed(Exception):
    """Raise from a handler to fail the attempt with this message.

    ``retry=False`` fails the task for good at once (dead-lettered), for
    errors another attempt cannot fix (a malformed payload)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass
class Task:
    """One attempt of a task, as a handler sees it."""

    id: str
    name: str
    user: str
    payload: Any
    attempt: int
    """1 for the first attempt."""
    _entry: Entry = field(repr=False)
    _stream: TaskStream = field(repr=False)

    async def progress(self, percent: int, message: Optional[str] = None) -> bool:
        """Tells the user how far the task is (0-100, and an optional line
        of text). False when this attempt no longer owns the task."""
        percent = max(0, min(100, int(percent)))
        if message is not None:
            message = message[:1024]
        return await self._stream.progress(self._entry, self.attempt, percent, message)


@dataclass
class _Registration:
    fn: Handler
    timeout_s: Optional[float]


class Worker:
    """Runs Python handlers for tasks queued by Switchboard hubs on Redis.

    ``prefix``, ``visibility_timeout_s``, ``max_attempts``,
    ``result_ttl_s`` and ``max_record_bytes_per_user`` must match the hub's
    ``redis.prefix`` and ``tasks.*`` keys."""

    def __init__(
        self,
        redis_url: str = "redis://127.0.0.1:6379",
        *,
        prefix: str = "sb",
        concurrency: int = 4,
        visibility_timeout_s: float = 60,
        max_attempts: int = 3,
        result_ttl_s: float = 86400,
        max_record_bytes_per_user: int = 4 * 1024 * 1024,
        name: Optional[str] = None,
        redis: Optional[AnyRedis] = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.concurrency = concurrency
        self.visibility_timeout_s = float(visibility_timeout_s)
        self.max_attempts = max_attempts
        self.name = name or f"py-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._redis_url = redis_url
        self._redis = redis
        self._keys = Keys(prefix)
        self._result_ttl_ms = int(result_ttl_s * 1000)
        self._max_record_bytes = max_record_bytes_per_user
        self._handlers: dict[str, _Registration] = {}
        self._stopping: Optional[asyncio.Event] = None
        self._hands: set[asyncio.Task[None]] = set()

    # -- handlers ------------------------------------------------------------

    def handler(
        self, name: str, *, timeout_s: Optional[float] = None
    ) -> Callable[[Handler], Handler]:
        """Registers ``fn(task)`` for tasks named ``name``. Its return value
        (anything ``json.dumps`` takes) is the result; an exception fails the
        attempt. A plain ``def`` runs in a thread. ``timeout_s`` bounds one
        attempt (default: the visibility timeout)."""

        def register(fn: Handler) -> Handler:
            self.add_handler(name, fn, timeout_s=timeout_s)
            return fn

        return register

    def add_handler(self, name: str, fn: Handler, *, timeout_s: Optional[float] = None) -> None:
        if name in self._handlers:
            raise ValueError(f"a handler for {name!r} is registered already")
        self._handlers[name] = _Registration(fn, timeout_s)

    # -- running ---------------------------------------------------------------

    def run(self, grace_s: float = 10.0) -> None:
        """Runs until SIGTERM or SIGINT, then stops taking work and finishes
        what it holds within ``grace_s`` (what is left is taken over by
        another worker after the visibility timeout)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (NotImplementedError, RuntimeError):
                    pass
            serving = asyncio.create_task(self.serve())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                await self.stop(grace_s)
            stopped.cancel()
            await serving

        asyncio.run(main())

    async def serve(self) -> None:
        """Takes and runs tasks until :meth:`stop`."""
        if not self._handlers:
            raise RuntimeError("no handlers: register some with @worker.handler(name)")
        own_redis = self._redis is None
        r = self._redis or await connect(self._redis_url)
        stream = TaskStream(r, self._keys, self._result_ttl_ms, self._max_record_bytes)
        self._stopping = asyncio.Event()
        log.info(
            "worker %s started: tasks %s, %d hands",
            self.name,
            ", ".join(sorted(self._handlers)),
            self.concurrency,
        )
        try:
            await self._loop(stream)
        finally:
            if self._hands:
                await asyncio.gather(*self._hands, return_exceptions=True)
            try:
                await stream.forget_consumer(self.name)
            except REDIS_ERRORS:
                pass
            if own_redis:
                await r.aclose()
            log.info("worker %s stopped", self.name)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stops taking work; waits at most ``grace_s`` for the running tasks,
        then abandons them (their entries stay claimed until the visibility
        timeout, then another worker takes them over)."""
        if self._stopping is None:
            return
        self._stopping.set()
        hands = set(self._hands)
        if hands:
            _done, pending = await asyncio.wait(hands, timeout=grace_s)
            for t in pending:
                t.cancel()

    async def _loop(self, stream: TaskStream) -> None:
        assert self._stopping is not None
        visibility_ms = int(self.visibility_timeout_s * 1000)
        loop = asyncio.get_running_loop()
        next_takeover = 0.0
        cursor = "0-0"
        failures = 0
        group_ready = False
        while not self._stopping.is_set():
            free = self.concurrency - len(self._hands)
            if free <= 0:
                await self._wait_for_a_hand()
                continue
            try:
                if not group_ready:
                    await stream.ensure_group()
                    group_ready = True
                entries: list[tuple[Entry, bool]] = []
                if loop.time() >= next_takeover:
                    taken, cursor = await stream.take_over(self.name, free, visibility_ms, cursor)
                    entries = [(e, True) for e in taken]
                    if cursor == "0-0":  # scanned to the end: again in half a timeout
                        next_takeover = loop.time() + self.visibility_timeout_s / 2
                if not entries:
                    fresh = await stream.read_new(self.name, free, READ_BLOCK_MS)
                    entries = [(e, False) for e in fresh]
                failures = 0
            except REDIS_ERRORS as e:
                if isinstance(e, ResponseError) and "NOGROUP" in str(e):
                    group_ready = False  # the stream was deleted: make it again
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5))
                log.warning("reading tasks failed (%s); retrying in %.1f s", e, delay)
                await self._sleep_unless_stopping(delay)
                continue
            for entry, taken_over in entries:
                hand = asyncio.create_task(self._run_entry(stream, entry, taken_over))
                self._hands.add(hand)
                hand.add_done_callback(self._hands.discard)

    async def _wait_for_a_hand(self) -> None:
        assert self._stopping is not None
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({*self._hands, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- one entry ---------------------------------------------------------------

    async def _run_entry(self, stream: TaskStream, entry: Entry, taken_over: bool) -> None:
        try:
            started = await stream.start(entry, self.max_attempts, taken_over, LOST_ERROR)
            if started.exhausted_error is not None:
                log.info("task %s failed: its attempts are spent", entry.task_id)
                await stream.close_entry(entry, started.exhausted_error, started.attempt)
                return
            if started.attempt == 0:
                await stream.skip(entry)  # cancelled, finished, or its record expired
                return
            await self._attempts(stream, entry, started.attempt)
        except asyncio.CancelledError:
            log.warning("task %s abandoned at stop; it will be taken over", entry.task_id)
            raise
        except REDIS_ERRORS as e:
            log.warning("task %s: a step failed on Redis (%s); it will be taken over", entry.task_id, e)
        except Exception:
            log.exception("task %s: unexpected error; it will be taken over", entry.task_id)

    async def _attempts(self, stream: TaskStream, entry: Entry, attempt: int) -> None:
        while True:
            ok, value, retry = await self._attempt_renewed(stream, entry, attempt)
            if ok:
                if not await stream.finish(entry, attempt, value, None):
                    log.warning("task %s: result dropped, another worker owns it now", entry.task_id)
                return
            if not retry or attempt >= self.max_attempts:
                if not await stream.finish(entry, attempt, None, value):
                    log.warning("task %s: failure dropped, another worker owns it now", entry.task_id)
                return
            if not await self._backoff_renewed(stream, entry, attempt):
                return
            attempt = await stream.retry(entry, attempt, value)
            if attempt == 0:
                return  # another worker owns it now

    async def _attempt_renewed(
        self, stream: TaskStream, entry: Entry, attempt: int
    ) -> tuple[bool, str, bool]:
        """Runs one attempt while renewing the claim: (succeeded, result JSON
        or error, whether a failure may be retried)."""
        work = asyncio.create_task(self._call(stream, entry, attempt))
        keeper = asyncio.create_task(self._keep(stream, entry, attempt))
        try:
            return await work
        finally:
            keeper.cancel()
            if not work.done():
                work.cancel()

    async def _keep(self, stream: TaskStream, entry: Entry, attempt: int) -> None:
        every = max(0.2, self.visibility_timeout_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                if not await stream.renew(self.name, entry, attempt):
                    log.warning("task %s: claim lost to another worker", entry.task_id)
                    return
            except REDIS_ERRORS as e:
                log.warning("task %s: renewing the claim failed (%s)", entry.task_id, e)

    async def _backoff_renewed(self, stream: TaskStream, entry: Entry, attempt: int) -> bool:
        """Waits before the next attempt (1 s, 2 s, 4 s… at most a third of
        the visibility timeout), keeping the claim."""
        cap = max(1.0, self.visibility_timeout_s / 3)
        delay = min(cap, float(2 ** min(attempt - 1, 16)))
        keeper = asyncio.create_task(self._keep(stream, entry, attempt))
        try:
            await asyncio.sleep(delay)
        finally:
            keeper.cancel()
        return await stream.owns(entry, attempt)

    async def _call(self, stream: TaskStream, entry: Entry, attempt: int) -> tuple[bool, str, bool]:
        reg = self._handlers.get(entry.name)
        if reg is None:
            return False, f"no handler for {entry.name!r} on this worker", False
        try:
            payload = json.loads(entry.payload)
        except ValueError:
            return False, "the payload is not JSON", False
        task = Task(entry.task_id, entry.name, entry.user, payload, attempt, entry, stream)
        timeout = reg.timeout_s if reg.timeout_s is not None else self.visibility_timeout_s
        try:
            if inspect.iscoroutinefunction(reg.fn):
                result = await asyncio.wait_for(reg.fn(task), timeout)
            else:
                result = await asyncio.wait_for(asyncio.to_thread(reg.fn, task), timeout)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, timeout)
        except asyncio.TimeoutError:
            return False, "handler timed out", True
        except TaskFailed as e:
            return False, str(e) or "failed", e.retry
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler's error is the attempt's error
            log.info("task %s attempt %d failed: %r", entry.task_id, attempt, e)
            return False, f"{type(e).__name__}: {e}"[:1024], True
        try:
            return True, json.dumps(result, separators=(",", ":")), True
        except (TypeError, ValueError) as e:
            return False, f"the result is not JSON: {e}", False


async def connect(url: str) -> AnyRedis:
    """A client for ``url``: one Redis server, or the whole cluster when it
    is a Redis Cluster node. ``url`` may list several (comma-separated, as
    the hub's ``redis.url`` in cluster mode): the first that answers is
    used. When none answers yet, a client of the first, which the worker
    loop retries until it does."""
    urls = [u.strip() for u in url.split(",") if u.strip()] or [url]
    for u in urls:
        probe = aioredis.Redis.from_url(u)
        try:
            info = await probe.info("cluster")
        except REDIS_ERRORS:
            await probe.aclose()
            continue
        if str(info.get("cluster_enabled", "0")) == "1":
            await probe.aclose()
            return RedisCluster.from_url(u)
        return probe
    return aioredis.Redis.from_url(urls[0])
