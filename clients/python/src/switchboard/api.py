"""The hub's HTTP API for backends: publish to a room, a user or everyone,
presence, history, connections, disconnect, task records and progress.

``AsyncApi`` is for asyncio code (FastAPI, aiohttp); ``Api`` is the same
calls, blocking (Django, Flask, scripts). Both take the hub's base URL and an
API key from ``auth.api_keys``; any instance of a cluster will do.

.. code-block:: python

    async with AsyncApi("http://localhost:8000", api_key="my-api-key") as api:
        await api.publish("lobby", {"text": "deploy done"})
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional
from urllib.parse import quote

import httpx

from .errors import ApiError
from .events import Message, PresenceEntry, TaskRecord
from .retry import Backoff, publish_key

log = logging.getLogger("switchboard.api")


def _path(part: str) -> str:
    return quote(part, safe="")


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        code, message = str(body.get("error", "error")), str(body.get("message", ""))
    except ValueError:
        code, message = "error", resp.text[:200]
    raise ApiError(resp.status_code, code, message)


def _message(frame: dict[str, Any]) -> Message:
    return Message(
        id=str(frame["id"]),
        room=str(frame["room"]),
        sender=str(frame.get("from", "server")),
        data=frame.get("data"),
        ts=int(frame.get("ts", 0)),
    )


class _Calls:
    """How each call maps to a request and its answer (shared by both APIs)."""

    @staticmethod
    def publish_body(
        room: Optional[str],
        user: Optional[str],
        broadcast: bool,
        data: Any,
        idempotency_key: Optional[str] = None,
    ) -> dict[str, Any]:
        if sum((room is not None, user is not None, broadcast)) != 1:
            raise ValueError("give exactly one of room=, user= or broadcast=True")
        body: dict[str, Any] = {"data": data}
        if room is not None:
            body["room"] = room
            body["idempotency_key"] = publish_key(idempotency_key)
        elif user is not None:
            body["user"] = user
        else:
            body["broadcast"] = True
        return body

    @staticmethod
    def history_params(since: Optional[str], limit: Optional[int]) -> dict[str, str]:
        params = {}
        if since is not None:
            params["since"] = since
        if limit is not None:
            params["limit"] = str(limit)
        return params


class _PublishRetry:
    """The schedule of a room publish's attempts: again after a 503
    (``unavailable``) with a backoff, while its time-out (the API's
    ``timeout_s``, all attempts together) allows."""

    def __init__(self, body: dict[str, Any], timeout_s: float, now: float) -> None:
        self.key = str(body["idempotency_key"])
        self.room = str(body["room"])
        self.deadline = now + timeout_s
        self.backoff = Backoff()
        self.last: Optional[ApiError] = None

    def wait(self, now: float) -> float:
        """The time left for the next attempt (the HTTP time-out it gets)."""
        return max(0.001, self.deadline - now)

    def failed(self, e: Exception, now: float) -> float:
        """After an attempt that raised ``e``: the delay before the next one,
        or raises what the call raises."""
        if isinstance(e, ApiError):
            e.idempotency_key = self.key
            if e.status != 503:
                raise e
            self.last = e
        elif self.last is not None and isinstance(e, httpx.TimeoutException):
            raise self.last from None  # time is up: what the hub last said
        else:
            raise e
        delay = self.backoff.next()
        if now + delay >= self.deadline:
            raise self.last  # no time for another attempt
        log.debug("publish to %s: 503; again in %.2f s, same key", self.room, delay)
        return delay


def _headers(api_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}", "user-agent": "switchboard-python"}


class AsyncApi:
    """The HTTP API, for asyncio code. Use as ``async with``, or call
    :meth:`aclose` when done."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        self._timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, headers=_headers(api_key)
        )

    async def __aenter__(self) -> "AsyncApi":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        resp = await self._http.request(method, path, **kw)
        _raise_for(resp)
        return resp.json()

    async def publish(self, room: str, data: Any, *, idempotency_key: Optional[str] = None) -> str:
        """Publishes ``data`` to a room (stored in its history); the message id.

        Sent with ``idempotency_key`` (yours, 1-256 bytes of UTF-8, else a new
        one), and sent again with it after a 503 while ``timeout_s`` allows:
        stored once. When the time is up, the last 503 ``ApiError`` is raised
        (its ``idempotency_key`` set)."""
        body = _Calls.publish_body(room, None, False, data, idempotency_key)
        retry = _PublishRetry(body, self._timeout_s, time.monotonic())
        while True:
            try:
                reply = await self._call(
                    "POST", "/api/publish", json=body, timeout=retry.wait(time.monotonic())
                )
                return str(reply["id"])
            except (ApiError, httpx.TimeoutException) as e:
                delay = retry.failed(e, time.monotonic())
            await asyncio.sleep(delay)

    async def send_to_user(self, user: str, data: Any) -> str:
        """A ``direct`` from ``server`` to every connection of ``user``; its id."""
        body = _Calls.publish_body(None, user, False, data)
        return str((await self._call("POST", "/api/publish", json=body))["id"])

    async def broadcast(self, data: Any) -> str:
        """A ``broadcast`` to every connection of every instance; its id."""
        body = _Calls.publish_body(None, None, True, data)
        return str((await self._call("POST", "/api/publish", json=body))["id"])

    async def presence(self, room: str) -> list[PresenceEntry]:
        body = await self._call("GET", f"/api/rooms/{_path(room)}/presence")
        return [PresenceEntry(str(u["user"]), int(u["connections"])) for u in body["users"]]

    async def history(
        self, room: str, *, since: Optional[str] = None, limit: Optional[int] = None
    ) -> list[Message]:
        """The retained messages after ``since`` (all when None), oldest first,
        at most ``limit`` (the latest ones)."""
        params = _Calls.history_params(since, limit)
        body = await self._call("GET", f"/api/rooms/{_path(room)}/history", params=params)
        return [_message(m) for m in body["messages"]]

    async def connections(self, user: str) -> int:
        """How many connections ``user`` holds, on all instances."""
        return int((await self._call("GET", f"/api/users/{_path(user)}/connections"))["connections"])

    async def disconnect(self, user: str) -> int:
        """Closes every connection of ``user`` (1008 ``kicked``); how many."""
        return int((await self._call("POST", f"/api/users/{_path(user)}/disconnect"))["disconnected"])

    async def task(self, task_id: str) -> TaskRecord:
        """A task's record; ``ApiError`` 404 when there is none."""
        return TaskRecord.from_json(await self._call("GET", f"/api/tasks/{_path(task_id)}"))

    async def task_progress(self, task_id: str, progress: int, message: Optional[str] = None) -> None:
        """Reports how far a running task is (0-100); its user gets a
        ``progress`` frame. ``ApiError`` 409 when it is not running, 404 when
        unknown."""
        body: dict[str, Any] = {"progress": int(progress)}
        if message is not None:
            body["message"] = message
        await self._call("POST", f"/api/tasks/{_path(task_id)}/progress", json=body)

    async def stats(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/api/stats"))

    async def ready(self) -> bool:
        """Whether the instance answers ``/health/ready`` with 200."""
        resp = await self._http.get("/health/ready")
        return resp.status_code == 200


class Api:
    """The HTTP API, blocking. Use as ``with``, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        self._timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, headers=_headers(api_key)
        )

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, **kw)
        _raise_for(resp)
        return resp.json()

    def publish(self, room: str, data: Any, *, idempotency_key: Optional[str] = None) -> str:
        body = _Calls.publish_body(room, None, False, data, idempotency_key)
        retry = _PublishRetry(body, self._timeout_s, time.monotonic())
        while True:
            try:
                reply = self._call(
                    "POST", "/api/publish", json=body, timeout=retry.wait(time.monotonic())
                )
                return str(reply["id"])
            except (ApiError, httpx.TimeoutException) as e:
                delay = retry.failed(e, time.monotonic())
            time.sleep(delay)

    def send_to_user(self, user: str, data: Any) -> str:
        body = _Calls.publish_body(None, user, False, data)
        return str(self._call("POST", "/api/publish", json=body)["id"])

    def broadcast(self, data: Any) -> str:
        body = _Calls.publish_body(None, None, True, data)
        return str(self._call("POST", "/api/publish", json=body)["id"])

    def presence(self, room: str) -> list[PresenceEntry]:
        body = self._call("GET", f"/api/rooms/{_path(room)}/presence")
        return [PresenceEntry(str(u["user"]), int(u["connections"])) for u in body["users"]]

    def history(
        self, room: str, *, since: Optional[str] = None, limit: Optional[int] = None
    ) -> list[Message]:
        params = _Calls.history_params(since, limit)
        body = self._call("GET", f"/api/rooms/{_path(room)}/history", params=params)
        return [_message(m) for m in body["messages"]]

    def connections(self, user: str) -> int:
        return int(self._call("GET", f"/api/users/{_path(user)}/connections")["connections"])

    def disconnect(self, user: str) -> int:
        return int(self._call("POST", f"/api/users/{_path(user)}/disconnect")["disconnected"])

    def task(self, task_id: str) -> TaskRecord:
        return TaskRecord.from_json(self._call("GET", f"/api/tasks/{_path(task_id)}"))

    def task_progress(self, task_id: str, progress: int, message: Optional[str] = None) -> None:
        body: dict[str, Any] = {"progress": int(progress)}
        if message is not None:
            body["message"] = message
        self._call("POST", f"/api/tasks/{_path(task_id)}/progress", json=body)

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/stats"))

    def ready(self) -> bool:
        return self._http.get("/health/ready").status_code == 200
