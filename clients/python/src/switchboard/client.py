"""The asyncio WebSocket client.

.. code-block:: python

    async with Client("ws://localhost:8000/ws", token=get_token) as sb:
        await sb.join("lobby")
        await sb.publish("lobby", {"text": "hello"})
        async for event in sb:
            if isinstance(event, Message):
                print(event.sender, event.data)

What it does about failures, as the JavaScript client does:

- reconnects with exponential backoff and full jitter, except after the
  closes that must not be retried (1008 ``unauthorized``, ``kicked``,
  ``forbidden origin``; ``connection limit`` after a few tries); after 1001
  ``going away`` (an instance draining) it waits a random delay in a window
  (0-5 s by default), so that a draining instance's clients do not all land
  on the others at once;
- remembers the last message id of every room, rejoins with ``since`` and
  never hands the same message to the application twice;
- asks the token function for a token on every connect and shortly before
  the current one expires (sent as ``refresh``);
- every request carries a ``ref`` and waits for the reply with that ``ref``,
  within a time-out; a request that timed out (or was cancelled) before it
  was sent is never sent;
- every ``publish`` carries an ``idempotency_key``, so that it can be sent
  again: after an ``unavailable`` (with a backoff) and after a dropped
  connection (once reconnected), within its time-out;
- outgoing frames are paced under the hub's rate limit, through a bounded
  send buffer: past ``max_queue`` waiting requests, a request is refused at
  once with ``queue_full``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Literal,
    Optional,
    TypeVar,
    Union,
)
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .errors import SwitchboardError, TaskFailedError
from .events import (
    Broadcast,
    Closed,
    Connected,
    Direct,
    Disconnected,
    ErrorEvent,
    Event,
    Joined,
    JoinResult,
    Left,
    Message,
    Overflow,
    PresenceEntry,
    Recovery,
    Revoked,
    TaskRecord,
    TaskUpdate,
    Welcome,
)
from .ids import compare_ids
from .retry import Backoff, publish_key
from .tokens import decode_unverified

log = logging.getLogger("switchboard.client")

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]
OfflinePolicy = Literal["queue", "reject"]
State = Literal["idle", "connecting", "connected", "disconnected", "closed"]
E = TypeVar("E")

NEVER_RETRY_1008 = frozenset({"unauthorized", "kicked", "forbidden origin"})


def websocket_url(url: str) -> str:
    """``ws(s)://`` as is, ``http(s)://`` turned into ``ws(s)://``; a bare
    origin gets ``/ws``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


# -- requests ----------------------------------------------------------------


@dataclass(eq=False)
class _Outgoing:
    """A frame waiting in the send buffer or for its reply."""

    frame: dict[str, Any]
    ref: int
    resolve: Callable[[dict[str, Any]], None]
    reject: Callable[[SwitchboardError], None]
    done: Callable[[], bool]
    """True once nobody waits for it any more: it is then never sent."""
    join_room: Optional[str] = None
    text: str = ""
    """The frame with its ``ref``, as sent."""

    def __post_init__(self) -> None:
        # Encoded now: data that is not JSON fails the call, not the writer.
        self.text = json.dumps({**self.frame, "ref": self.ref}, separators=(",", ":"))


@dataclass(eq=False)
class _Room:
    last_id: Optional[str] = None
    """The id of the last message handed to the app (or given as ``since``)."""
    joined: bool = False
    ever_joined: bool = False
    inflight: Optional[_Outgoing] = None
    waiters: list["asyncio.Future[JoinResult]"] = field(default_factory=list)


class TaskHandle:
    """A submitted task: its ``id``, its updates (``async for update in
    handle``, from ``queued`` to ``done``/``failed``) and its outcome
    (``await handle.result()``)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.last: Optional[TaskUpdate] = None
        self._updates: asyncio.Queue[TaskUpdate] = asyncio.Queue()
        self._finished: asyncio.Future[TaskUpdate] = asyncio.get_running_loop().create_future()

    def _push(self, update: TaskUpdate) -> None:
        self.last = update
        # Progress reports past a thousand unread are dropped; status changes never.
        if update.status != "progress" or self._updates.qsize() < 1000:
            self._updates.put_nowait(update)
        if update.finished and not self._finished.done():
            self._finished.set_result(update)

    def _fail(self, error: SwitchboardError) -> None:
        if not self._finished.done():
            self._finished.set_exception(error)
            self._finished.exception()  # read: no "never retrieved" warning

    def __aiter__(self) -> AsyncIterator[TaskUpdate]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TaskUpdate]:
        while True:
            if self._updates.empty() and self._finished.done():
                self._finished.result()  # raises when the client closed first
                return
            getter = asyncio.ensure_future(self._updates.get())
            await asyncio.wait({getter, self._finished}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            update = getter.result()
            yield update
            if update.finished:
                return

    async def result(self, timeout_s: Optional[float] = None) -> Any:
        """The task's result once ``done``; raises :class:`TaskFailedError`
        when it ``failed``, ``SwitchboardError("closed")`` when the client
        closed first, ``TimeoutError`` after ``timeout_s``."""
        update = await asyncio.wait_for(asyncio.shield(self._finished), timeout_s)
        if update.status == "failed":
            raise TaskFailedError(self.id, update.error or "failed")
        return update.result


# -- the client --------------------------------------------------------------


class Client:
    """A connection to a Switchboard hub that survives disconnects.

    ``token`` is a JWT, or a function (plain or async) returning one, called
    on every connect and shortly before the current token's ``exp``. Every
    ``*_s`` option is in seconds. See the package README for each option."""

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource,
        reconnect: bool = True,
        request_timeout_s: float = 10.0,
        offline: OfflinePolicy = "queue",
        max_queue: int = 100,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 10.0,
        going_away_delay_s: tuple[float, float] = (0.0, 5.0),
        connection_limit_retries: int = 3,
        connect_timeout_s: float = 10.0,
        refresh_before_s: float = 30.0,
        ping_interval_s: Optional[float] = 20.0,
        ping_timeout_s: float = 10.0,
        max_frames_per_second: float = 40.0,
        frame_burst: int = 80,
        max_buffered_events: int = 10_000,
    ) -> None:
        if not token:
            raise TypeError("token is required: a JWT, or a function returning one")
        lo, hi = going_away_delay_s
        if not 0 <= lo <= hi:
            raise ValueError("going_away_delay_s is a window (low, high) with 0 <= low <= high")
        self.url = websocket_url(url)
        self._token_source = token
        self._reconnect = reconnect
        self._request_timeout_s = request_timeout_s
        self._offline: OfflinePolicy = offline
        self._max_queue = max_queue
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._going_away = (lo, hi)
        self._connection_limit_retries = connection_limit_retries
        self._connect_timeout_s = connect_timeout_s
        self._refresh_before_s = refresh_before_s
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._rate = max_frames_per_second
        self._burst = max(1, frame_burst)

        self._state: State = "idle"
        self._welcome: Optional[Welcome] = None
        self._ws: Optional[ClientConnection] = None
        self._runner: Optional[asyncio.Task[None]] = None
        self._wake: Optional[asyncio.Event] = None
        self._closing = False
        self._next_ref = 1
        self._pending: dict[int, _Outgoing] = {}
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._outbox_ready: Optional[asyncio.Event] = None
        self._rooms: dict[str, _Room] = {}
        self._tasks: dict[str, TaskHandle] = {}
        self._failures = 0
        self._limit_strikes = 0
        self._ever_connected = False
        self._connected_at = 0.0
        self._token: Optional[str] = None
        self._token_at = 0.0
        self._refresh_timer: Optional[asyncio.TimerHandle] = None
        self._bucket = float(self._burst)
        self._bucket_at = 0.0
        self._listeners: dict[type, list[Callable[[Any], None]]] = {}
        self._events: collections.deque[Event] = collections.deque()
        self._max_events = max_buffered_events
        self._dropped = 0
        self._events_ready: Optional[asyncio.Event] = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- public state ----------------------------------------------------------

    @property
    def state(self) -> State:
        """``idle`` (not started), ``connecting``, ``connected``,
        ``disconnected`` (waiting to retry), ``closed``."""
        return self._state

    @property
    def welcome(self) -> Optional[Welcome]:
        return self._welcome

    @property
    def user(self) -> Optional[str]:
        return self._welcome.user if self._welcome else None

    @property
    def joined_rooms(self) -> list[str]:
        """Rooms this client is in or joining (and rejoins after a reconnect)."""
        return list(self._rooms)

    def last_message_id(self, room: str) -> Optional[str]:
        """The id of the last message of ``room`` handed to the application."""
        r = self._rooms.get(room)
        return r.last_id if r else None

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> "Client":
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def connect(self) -> None:
        """Starts connecting (in the background; requests wait for the
        connection). While waiting to retry, retries now. Needs a running
        event loop."""
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
            self._outbox_ready = asyncio.Event()
            self._events_ready = asyncio.Event()
        if self._runner is None or self._runner.done():
            if self._state == "closed":
                self._failures = 0
                self._limit_strikes = 0
                self._events.clear()
            self._closing = False
            self._runner = loop.create_task(self._run())
        else:
            self._wake.set()

    async def wait_connected(self, timeout_s: Optional[float] = None) -> None:
        """Returns once connected; ``SwitchboardError("closed")`` if the client
        stops first, ``TimeoutError`` after ``timeout_s``."""
        if self._state == "connected":
            return
        if self._state == "closed":
            raise SwitchboardError("closed", "the client is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_connected(_: Connected) -> None:
            if not fut.done():
                fut.set_result(None)

        def on_closed(c: Closed) -> None:
            if not fut.done():
                fut.set_exception(SwitchboardError("closed", f"closed ({c.code} {c.reason})"))

        off1 = self.on(Connected, on_connected)
        off2 = self.on(Closed, on_closed)
        try:
            await asyncio.wait_for(fut, timeout_s)
        finally:
            off1()
            off2()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Closes for good (until :meth:`connect`): no reconnect; waiting
        requests fail with ``closed``. Rooms are remembered for a later
        :meth:`connect`."""
        if self._state == "closed" or self._runner is None:
            self._set_closed(code, reason, was_connected=False)
            return
        self._closing = True
        was_connected = self._state == "connected"
        ws = self._ws
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(code, reason), 3)
            except (asyncio.TimeoutError, OSError, ConnectionClosed):
                pass
        runner = self._runner
        if runner is not None and not runner.done():
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                pass
        self._set_closed(code, reason, was_connected)

    # -- events ----------------------------------------------------------------

    def on(self, kind: type[E], fn: Callable[[E], None]) -> Callable[[], None]:
        """Calls ``fn(event)`` for every event of that class (``Message``,
        ``Connected``, …), as it arrives, before iterators see it; returns a
        function that removes it. ``fn`` must not block."""
        self._listeners.setdefault(kind, []).append(fn)

        def off() -> None:
            fns = self._listeners.get(kind, [])
            if fn in fns:
                fns.remove(fn)

        return off

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self, *kinds: type) -> AsyncIterator[Any]:
        """Every event from the client's start (buffered until read), in order:
        ``async for event in client.events(Message, Direct)``. Ends after the
        client closed for good. One reader: two loops share the events. When
        ``max_buffered_events`` wait unread, the oldest are dropped and an
        :class:`Overflow` says how many."""
        if self._events_ready is None:
            self._events_ready = asyncio.Event()
        while True:
            while not self._events:
                if self._state == "closed" and self._runner is not None and self._runner.done():
                    return
                self._events_ready.clear()
                await self._events_ready.wait()
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                yield Overflow(dropped)
            event = self._events.popleft()
            if not kinds or isinstance(event, kinds):
                yield event
            if isinstance(event, Closed):
                return

    def _emit(self, event: Event) -> None:
        for kind, fns in list(self._listeners.items()):
            if isinstance(event, kind):
                for fn in list(fns):
                    try:
                        fn(event)
                    except Exception:  # a listener's bug is not the client's
                        log.exception("an event listener raised")
        if self._max_events <= 0:
            return
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self._dropped += 1
            if self._dropped == 1:
                log.warning("event buffer full: dropping the oldest events")
        self._events.append(event)
        if self._events_ready is not None:
            self._events_ready.set()

    # -- requests --------------------------------------------------------------

    async def join(
        self, room: str, *, since: Optional[str] = None, timeout_s: Optional[float] = None
    ) -> JoinResult:
        """Joins a room; remembered and rejoined with ``since`` after every
        reconnect. ``since``: replay what came after this id first (e.g. the
        last one your app has from its backend); then ``recovered`` is in the
        result."""
        self._check_open()
        r = self._rooms.get(room)
        if r is not None and r.joined:
            return JoinResult(room)
        if r is None and self._state != "connected" and self._offline == "reject":
            raise SwitchboardError("offline", f"not connected ({self._state})")
        if r is None:
            r = _Room(last_id=since)
            self._rooms[room] = r
        fut: asyncio.Future[JoinResult] = asyncio.get_running_loop().create_future()
        r.waiters.append(fut)
        if self._state == "connected" and r.inflight is None:
            self._send_join(room, r, first=False)
        timeout = self._request_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout if timeout > 0 else None)
        except asyncio.TimeoutError:
            raise SwitchboardError("timeout", f"join {room}: no reply within {timeout} s") from None
        finally:
            if not fut.done():
                fut.cancel()
            if fut in r.waiters:
                r.waiters.remove(fut)
            self._abandon_join(room, r)

    async def leave(self, room: str, *, timeout_s: Optional[float] = None) -> None:
        """Leaves a room and stops rejoining it (at once when disconnected)."""
        r = self._rooms.pop(room, None)
        if r is not None:
            for w in r.waiters:
                if not w.done():
                    w.set_exception(SwitchboardError("cancelled", f"left {room} before the join was acked"))
            r.waiters.clear()
        if self._state != "connected":
            return
        try:
            await self._request({"type": "leave", "room": room}, timeout_s, offline="reject")
        except SwitchboardError as e:
            if e.code not in ("disconnected", "offline"):
                raise

    async def publish(
        self,
        room: str,
        data: Any,
        *,
        idempotency_key: Optional[str] = None,
        timeout_s: Optional[float] = None,
    ) -> str:
        """Publishes ``data`` to a room you joined; the message id.

        Every publish carries an ``idempotency_key``: yours (1-256 bytes of
        UTF-8; ``ValueError`` otherwise), else a new one. While the hub
        answers ``unavailable``, the same frame is sent again after a backoff
        (0.1 s doubling up to 2 s, jittered); after a dropped connection, again
        once reconnected: the hub stores it once and acks a repeat with the
        first id. When ``timeout_s`` runs out, the last ``unavailable`` (or
        ``disconnected``) error is raised, ``timeout`` when the hub never
        answered; either carries ``idempotency_key`` for a later retry."""
        key = publish_key(idempotency_key)
        frame = {"type": "publish", "room": room, "data": data, "idempotency_key": key}
        self._check_open()
        self._admit()
        loop = asyncio.get_running_loop()
        timeout = self._timeout(timeout_s)
        deadline = loop.time() + timeout if timeout > 0 else None
        backoff = Backoff()
        last: Optional[SwitchboardError] = None
        while True:
            try:
                wait = None if deadline is None else deadline - loop.time()
                if wait is not None and wait <= 0:
                    raise SwitchboardError("timeout", f"publish: no reply within {timeout} s")
                if last is not None:
                    self._check_open()
                ack = await self._attempt(frame, wait, timeout)
                return str(ack.get("id", ""))
            except SwitchboardError as e:
                e.idempotency_key = key
                if e.code == "timeout" and last is not None:
                    raise last from None  # time is up: what the hub last said
                if e.code == "disconnected" and self._reconnect:
                    last = e  # sent again once reconnected (it waits in the buffer)
                    log.debug("publish to %s: disconnected; again after the reconnect", room)
                    continue
                if e.code != "unavailable":
                    raise
                last = e
            delay = backoff.next()
            if deadline is not None and loop.time() + delay >= deadline:
                raise last  # no time for another attempt
            log.debug("publish to %s: unavailable; again in %.2f s, same key", room, delay)
            await asyncio.sleep(delay)

    async def direct(self, user: str, data: Any, *, timeout_s: Optional[float] = None) -> str:
        """Sends ``data`` to every connection of ``user``; the direct's id."""
        ack = await self._request({"type": "direct", "to": user, "data": data}, timeout_s)
        return str(ack.get("id", ""))

    async def presence(self, room: str, *, timeout_s: Optional[float] = None) -> list[PresenceEntry]:
        reply = await self._request({"type": "presence", "room": room}, timeout_s)
        return [PresenceEntry(str(u["user"]), int(u["connections"])) for u in reply.get("users", [])]

    async def task(
        self,
        name: str,
        payload: Any = None,
        *,
        idempotency_key: Optional[str] = None,
        timeout_s: Optional[float] = None,
    ) -> TaskHandle:
        """Submits a task; its handle (``handle.id``, ``async for update in
        handle``, ``await handle.result()``). Updates also arrive as
        :class:`TaskUpdate` events."""
        frame: dict[str, Any] = {"type": "task", "name": name, "payload": payload}
        if idempotency_key is not None:
            frame["idempotency_key"] = idempotency_key
        holder: list[TaskHandle] = []

        def on_ack(ack: dict[str, Any]) -> None:
            # In the reader, before the next frame (the `queued` update) is read.
            task_id = str(ack.get("task_id", ""))
            handle = self._tasks.get(task_id) or TaskHandle(task_id)
            self._tasks[task_id] = handle
            holder.append(handle)

        await self._request(frame, timeout_s, on_reply=on_ack)
        return holder[0]

    async def task_status(self, task_id: str, *, timeout_s: Optional[float] = None) -> TaskRecord:
        """The record of one of your tasks."""
        reply = await self._request({"type": "task_status", "task_id": task_id}, timeout_s)
        return TaskRecord.from_json(reply)

    async def task_cancel(self, task_id: str, *, timeout_s: Optional[float] = None) -> None:
        """Cancels a task that has not started (``forbidden`` once it runs)."""
        await self._request({"type": "task_cancel", "task_id": task_id}, timeout_s)

    async def ping(self, *, timeout_s: Optional[float] = None) -> float:
        """A round trip to the hub; the seconds it took."""
        start = time.monotonic()
        await self._request({"type": "ping"}, timeout_s)
        return time.monotonic() - start

    async def refresh_token(self) -> None:
        """Asks the token function for a token now and sends it as ``refresh``."""
        await self._refresh_now()

    # -- request core -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == "closed":
            raise SwitchboardError("closed", "the client is closed")
        if self._runner is None:
            raise SwitchboardError("closed", "not started: use `async with Client(...)` or connect()")

    async def _request(
        self,
        frame: dict[str, Any],
        timeout_s: Optional[float],
        *,
        offline: Optional[OfflinePolicy] = None,
        on_reply: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> dict[str, Any]:
        self._check_open()
        self._admit(offline)
        timeout = self._timeout(timeout_s)
        return await self._attempt(frame, timeout if timeout > 0 else None, timeout, on_reply)

    def _admit(self, offline: Optional[OfflinePolicy] = None) -> None:
        """Refuses a new request while offline (``offline="reject"``) or when
        the send buffer is full."""
        if self._state != "connected" and (offline or self._offline) == "reject":
            raise SwitchboardError("offline", f"not connected ({self._state})")
        if len(self._outbox) >= self._max_queue:
            raise SwitchboardError(
                "queue_full", f"{self._max_queue} requests already wait to be sent"
            )

    def _timeout(self, timeout_s: Optional[float]) -> float:
        """A request's time-out in seconds (``0``: none)."""
        return self._request_timeout_s if timeout_s is None else timeout_s

    async def _attempt(
        self,
        frame: dict[str, Any],
        wait_s: Optional[float],
        timeout: float,
        on_reply: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> dict[str, Any]:
        """Sends ``frame`` with a new ``ref`` and waits ``wait_s`` (``None``:
        no limit) for its reply; ``timeout`` is the call's, for the error."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def resolve(reply: dict[str, Any]) -> None:
            if fut.done():
                return
            if on_reply is not None:
                on_reply(reply)
            fut.set_result(reply)

        def reject(err: SwitchboardError) -> None:
            if not fut.done():
                fut.set_exception(err)

        req = _Outgoing(frame, self._take_ref(), resolve, reject, fut.done)
        self._enqueue(req)
        try:
            return await asyncio.wait_for(fut, wait_s)
        except asyncio.TimeoutError:
            raise SwitchboardError(
                "timeout", f"{frame['type']}: no reply within {timeout} s"
            ) from None
        finally:
            # Timed out or cancelled: never sent later, a late reply is ignored.
            self._pending.pop(req.ref, None)
            try:
                self._outbox.remove(req)
            except ValueError:
                pass

    def _take_ref(self) -> int:
        ref = self._next_ref
        self._next_ref += 1
        return ref

    def _enqueue(self, req: _Outgoing, front: bool = False) -> None:
        if front:
            self._outbox.appendleft(req)
        else:
            self._outbox.append(req)
        if self._outbox_ready is not None:
            self._outbox_ready.set()

    def _settle(self, frame: dict[str, Any]) -> None:
        ref = frame.get("ref")
        req = self._pending.pop(ref, None) if isinstance(ref, int) else None
        if req is None:
            return  # timed out already, or not ours
        if frame.get("type") == "error":
            req.reject(
                SwitchboardError(str(frame.get("code", "internal")), str(frame.get("message", "")), frame)
            )
        else:
            req.resolve(frame)

    # -- rooms ---------------------------------------------------------------------

    def _send_join(self, room: str, r: _Room, first: bool) -> None:
        since = r.last_id
        frame: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = since

        def resolve(ack: dict[str, Any]) -> None:
            if self._rooms.get(room) is not r or r.inflight is not req:
                if room not in self._rooms:
                    self._leave_quietly(room)  # abandoned meanwhile
                return
            r.inflight = None
            r.joined = True
            rejoin = r.ever_joined
            r.ever_joined = True
            recovered = ack.get("recovered")
            result = JoinResult(room, recovered if isinstance(recovered, bool) else None)
            for w in r.waiters:
                if not w.done():
                    w.set_result(result)
            r.waiters.clear()
            if since is not None and recovered is False:
                # History broke (trimmed, expired, a restarted memory hub): ids need
                # not continue from ours, so the floor goes; the replay sets it again.
                r.last_id = None
            if rejoin:
                self._emit(Recovery(room, since is not None and recovered is True, since))

        def reject(err: SwitchboardError) -> None:
            if self._rooms.get(room) is not r or r.inflight is not req:
                return
            r.inflight = None
            if err.code == "disconnected":
                return  # rejoined after the reconnect
            del self._rooms[room]
            for w in r.waiters:
                if not w.done():
                    w.set_exception(err)
            r.waiters.clear()
            if r.ever_joined:
                self._emit(ErrorEvent(err, "rejoin"))
                self._emit(Revoked((room,), "rejoin", err))

        req = _Outgoing(frame, self._take_ref(), resolve, reject, lambda: False, join_room=room)
        r.inflight = req
        self._enqueue(req, front=first)

    def _abandon_join(self, room: str, r: _Room) -> None:
        """A join whose waiters all gave up, never joined: forget the room
        (and leave it if the join lands)."""
        if r.joined or r.ever_joined or r.waiters or self._rooms.get(room) is not r:
            return
        del self._rooms[room]
        req = r.inflight
        if req is not None and req.ref not in self._pending:
            r.inflight = None
            try:
                self._outbox.remove(req)
            except ValueError:
                pass
        # A join already sent: its ack leaves the room again (see _send_join).

    def _leave_quietly(self, room: str) -> None:
        if self._state != "connected":
            return
        req = _Outgoing(
            {"type": "leave", "room": room}, self._take_ref(), lambda _: None, lambda _: None, lambda: False
        )
        self._enqueue(req)

    # -- the connection -------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        self._state = state

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closing:
            self._set_state("connecting")
            try:
                code, reason = await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not end the reconnect loop
                log.exception("connection failed unexpectedly")
                self._emit(ErrorEvent(e, "connect"))
                code, reason = 1006, "client error"
            if self._closing:
                return
            if not self._may_retry(code, reason):
                self._fail_all("closed", f"connection closed for good ({code} {reason})".strip())
                self._emit(Disconnected(code, reason, will_reconnect=False))
                self._set_closed(code, reason, was_connected=False)
                return
            delay = self._retry_delay(code)
            self._set_state("disconnected")
            log.info("disconnected (%s %s); reconnecting in %.2f s", code, reason, delay)
            self._emit(Disconnected(code, reason, will_reconnect=True, delay=delay))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _retry_delay(self, code: int) -> float:
        if code == 1001:
            # An instance draining: spread its clients over a window.
            self._failures = 0
            lo, hi = self._going_away
            return random.uniform(lo, hi)
        self._failures += 1
        cap = min(self._backoff_max_s, self._backoff_initial_s * 2.0 ** min(self._failures - 1, 30))
        return random.random() * cap

    def _may_retry(self, code: int, reason: str) -> bool:
        if not self._reconnect:
            return False
        if code != 1008:
            return True
        if reason in NEVER_RETRY_1008:
            return False
        if reason == "token expired":
            return callable(self._token_source)  # a fixed token will not get better
        if reason == "connection limit":
            self._limit_strikes += 1
            return self._limit_strikes <= self._connection_limit_retries
        return True

    async def _fetch_token(self) -> str:
        src = self._token_source
        token: Any = src() if callable(src) else src
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError("the token function returned no token")
        self._token = token
        self._token_at = time.time()
        return token

    async def _session(self) -> tuple[int, str]:
        """One connection, from the token to its close: (code, reason)."""
        try:
            token = await asyncio.wait_for(self._fetch_token(), self._connect_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._emit(ErrorEvent(e, "token"))
            return 1006, "token function failed"
        try:
            ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=self._connect_timeout_s,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_timeout_s,
                close_timeout=2,
                max_size=None,
                user_agent_header="switchboard-python",
            )
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as e:
            log.debug("connect failed: %s", e)
            return 1006, "connect failed"
        self._ws = ws
        try:
            try:
                raw = await asyncio.wait_for(ws.recv(), self._connect_timeout_s)
                first = json.loads(raw)
            except asyncio.TimeoutError:
                await ws.close(4000, "no welcome")
                return 1006, "connect timeout"
            except (ConnectionClosed, ValueError):
                return _close_of(ws)
            if not isinstance(first, dict) or first.get("type") != "welcome":
                await ws.close(4000, "no welcome")
                return 1006, "no welcome"
            self._on_welcome(first)
            writer = asyncio.ensure_future(self._writer(ws))
            try:
                async for raw in ws:
                    self._on_frame(raw)
            except ConnectionClosed:
                pass
            finally:
                writer.cancel()
                try:
                    await writer
                except (asyncio.CancelledError, ConnectionClosed):
                    pass
            return _close_of(ws)
        finally:
            self._ws = None
            self._on_socket_closed()

    def _on_welcome(self, f: dict[str, Any]) -> None:
        w = Welcome(
            connection_id=str(f.get("connection_id", "")),
            user=str(f.get("user", "")),
            instance=str(f.get("instance", "")),
            heartbeat_s=int(f.get("heartbeat_s", 0)),
        )
        reconnected = self._ever_connected
        self._ever_connected = True
        self._limit_strikes = 0
        self._welcome = w
        self._connected_at = time.monotonic()
        self._bucket = float(self._burst)  # a new session starts with a full bucket
        self._bucket_at = time.monotonic()
        self._set_state("connected")
        self._schedule_refresh()
        # Rejoins go out first, in order, ahead of the requests that waited.
        rooms = [(room, r) for room, r in self._rooms.items() if not r.joined and r.inflight is None]
        for room, r in reversed(rooms):
            self._send_join(room, r, first=True)
        self._emit(Connected(w, reconnected))

    def _on_socket_closed(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        if self._state == "connected" and time.monotonic() - self._connected_at >= self._stable_after_s:
            self._failures = 0
        for r in self._rooms.values():
            r.joined = False
            r.inflight = None
        # Joins not sent yet are made again at the next welcome.
        self._outbox = collections.deque(q for q in self._outbox if q.join_room is None)
        inflight = list(self._pending.values())
        self._pending.clear()
        code = "closed" if self._closing else "disconnected"
        for req in inflight:
            req.reject(SwitchboardError(code, "the connection closed before the reply"))

    async def _writer(self, ws: ClientConnection) -> None:
        """Sends the buffered frames in order, paced by a token bucket; a
        frame whose request timed out or was cancelled is dropped unsent."""
        assert self._outbox_ready is not None
        while True:
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            if self._outbox[0].done():
                self._outbox.popleft()
                continue
            await self._pace()
            if not self._outbox:
                continue
            req = self._outbox.popleft()
            if req.done():
                continue
            self._pending[req.ref] = req
            try:
                await ws.send(req.text)
            except ConnectionClosed:
                # Not sent: back to the front, for the next connection.
                self._pending.pop(req.ref, None)
                if req.join_room is None:
                    self._outbox.appendleft(req)
                raise

    async def _pace(self) -> None:
        if self._rate <= 0:
            return
        while True:
            now = time.monotonic()
            self._bucket = min(float(self._burst), self._bucket + (now - self._bucket_at) * self._rate)
            self._bucket_at = now
            if self._bucket >= 1:
                self._bucket -= 1
                return
            await asyncio.sleep((1 - self._bucket) / self._rate)

    def _fail_all(self, code: str, message: str) -> None:
        for r in self._rooms.values():
            r.joined = False
            r.inflight = None
            for w in r.waiters:
                if not w.done():
                    w.set_exception(SwitchboardError(code, message))
            r.waiters.clear()
        waiting = list(self._pending.values()) + list(self._outbox)
        self._pending.clear()
        self._outbox.clear()
        for req in waiting:
            req.reject(SwitchboardError(code, message))
        for handle in self._tasks.values():
            handle._fail(SwitchboardError(code, message))
        self._tasks.clear()

    def _set_closed(self, code: int, reason: str, was_connected: bool) -> None:
        if self._state == "closed":
            return
        self._fail_all("closed", "the client was closed")
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        if was_connected:
            self._emit(Disconnected(code, reason, will_reconnect=False))
        self._set_state("closed")
        self._emit(Closed(code, reason))

    # -- frames ---------------------------------------------------------------------

    def _on_frame(self, raw: Union[str, bytes]) -> None:
        try:
            f = json.loads(raw)
        except ValueError as e:
            self._emit(ErrorEvent(e, "frame"))
            return
        if not isinstance(f, dict):
            return
        kind = f.get("type")
        has_ref = f.get("ref") is not None
        if kind in ("ack", "error", "pong", "presence"):
            if has_ref:
                self._settle(f)
            elif kind == "error":
                err = SwitchboardError(str(f.get("code")), str(f.get("message", "")), f)
                self._emit(ErrorEvent(err, "frame"))
        elif kind == "task":
            if has_ref:
                self._settle(f)
            else:
                self._on_task_update(f)
        elif kind == "message":
            self._on_message(f)
        elif kind == "direct":
            self._emit(Direct(str(f.get("id")), str(f.get("from")), f.get("data"), int(f.get("ts", 0))))
        elif kind == "broadcast":
            self._emit(Broadcast(str(f.get("id")), f.get("data"), int(f.get("ts", 0))))
        elif kind == "joined":
            self._emit(Joined(str(f.get("room")), str(f.get("user"))))
        elif kind == "left":
            self._emit(Left(str(f.get("room")), str(f.get("user"))))
        # newer hubs may send more: what we do not know is ignored

    def _on_message(self, f: dict[str, Any]) -> None:
        room, mid = str(f.get("room")), f.get("id")
        r = self._rooms.get(room)
        if r is None:
            return  # left (or never joined) here
        if isinstance(mid, str):
            try:
                if r.last_id is not None and compare_ids(mid, r.last_id) <= 0:
                    return  # seen already
            except ValueError:
                pass
            r.last_id = mid
        self._emit(Message(str(mid), room, str(f.get("from")), f.get("data"), int(f.get("ts", 0))))

    def _on_task_update(self, f: dict[str, Any]) -> None:
        u = TaskUpdate(
            task_id=str(f.get("task_id")),
            status=f.get("status"),  # type: ignore[arg-type]
            progress=f.get("progress"),
            message=f.get("message"),
            result=f.get("result"),
            error=f.get("error"),
        )
        self._emit(u)
        handle = self._tasks.get(u.task_id)
        if handle is not None:
            handle._push(u)
            if u.finished:
                del self._tasks[u.task_id]

    # -- token refresh ----------------------------------------------------------------

    def _schedule_refresh(self, delay: Optional[float] = None) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        if not callable(self._token_source) or not self._token:
            return
        if delay is None:
            exp = (decode_unverified(self._token) or {}).get("exp")
            if not isinstance(exp, (int, float)):
                return
            lifetime = max(0.0, exp - self._token_at)
            margin = min(self._refresh_before_s, lifetime / 3)
            delay = max(0.0, exp - margin - time.time())
        loop = asyncio.get_running_loop()
        self._refresh_timer = loop.call_later(delay, lambda: self._spawn(self._refresh_quietly()))

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh_now()
        except SwitchboardError:
            pass  # told as an ErrorEvent; retried

    async def _refresh_now(self) -> None:
        if self._state != "connected":
            raise SwitchboardError("offline", "not connected")
        exp_before = (decode_unverified(self._token or "") or {}).get("exp")
        src = self._token_source
        try:
            token: Any = src() if callable(src) else src
            if inspect.isawaitable(token):
                token = await token
            if not isinstance(token, str) or not token:
                raise TypeError("the token function returned no token")
        except Exception as e:
            self._emit(ErrorEvent(e, "refresh"))
            self._retry_refresh_later(exp_before)
            raise SwitchboardError("internal", f"token function: {e}") from e
        try:
            ack = await self._request({"type": "refresh", "token": token}, None, offline="reject")
        except SwitchboardError as e:
            if e.code != "disconnected":
                self._emit(ErrorEvent(e, "refresh"))
                self._retry_refresh_later(exp_before)
            raise
        self._token = token
        self._token_at = time.time()
        self._schedule_refresh()
        left = [str(x) for x in ack.get("left", []) or []]
        if left:
            for room in left:
                r = self._rooms.pop(room, None)
                if r is not None:
                    for w in r.waiters:
                        if not w.done():
                            w.set_exception(SwitchboardError("forbidden", f"the new token does not allow {room}"))
            self._emit(Revoked(tuple(left), "refresh"))

    def _retry_refresh_later(self, exp: Any) -> None:
        """After a failed refresh: again half-way to the expiry."""
        if not isinstance(exp, (int, float)) or not callable(self._token_source):
            return
        remaining = exp - time.time()
        if remaining >= 1:
            self._schedule_refresh(remaining / 2)


def _close_of(ws: ClientConnection) -> tuple[int, str]:
    code = ws.close_code
    return (code if code is not None else 1006), (ws.close_reason or "")
