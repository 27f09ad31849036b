"""The errors of the client, the backend API and the token helpers."""

from __future__ import annotations

from typing import Any, Optional


class SwitchboardError(Exception):
    """A refused or failed request.

    ``code`` is the hub's error code (``bad_request``, ``forbidden``,
    ``limit_exceeded``, ``rate_limited``, ``not_found``, ``unavailable`` (a
    backend such as Redis is away: retry), ``internal``) or one of the
    client's: ``timeout`` (no reply in time; a request that timed out
    is never sent later), ``disconnected`` (the connection went down after
    the request was sent: it may or may not have been carried out, so it is
    not sent again), ``offline`` (not connected, with ``offline="reject"``),
    ``queue_full`` (the send buffer is full), ``closed`` (the client was
    closed or gave up), ``cancelled`` (a join undone by ``leave``).

    A ``publish`` retries ``unavailable`` and ``disconnected`` itself within
    its time-out; the error it raises then carries ``idempotency_key``."""

    def __init__(self, code: str, message: str, frame: Optional[dict[str, Any]] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame
        """The hub's ``error`` frame, when there was one."""
        self.idempotency_key: Optional[str] = None
        """On an error of ``publish``: the key it was sent with. A publish
        sent again with it later (within 120 s) takes effect once."""


class ApiError(Exception):
    """An HTTP API call the hub refused: ``status`` (401, 400, 404, 409,
    413, 503…) and the body's ``error`` code and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.idempotency_key: Optional[str] = None
        """On an error of a room ``publish``: the key it was sent with. A
        publish sent again with it later (within 120 s) takes effect once."""


class TaskFailedError(Exception):
    """A task ended ``failed``; ``error`` is its error (``cancelled`` when it
    was cancelled)."""

    def __init__(self, task_id: str, error: str) -> None:
        super().__init__(f"task {task_id} failed: {error}")
        self.task_id = task_id
        self.error = error
