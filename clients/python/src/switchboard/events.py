"""What the client hands to the application: the hub's frames as typed
values, and the client's own connection events.

``async for event in client`` yields any of these; use ``match`` or
``isinstance`` to pick (``client.events(Message)`` yields only room
messages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .errors import SwitchboardError

TaskStatus = Literal["queued", "running", "progress", "done", "failed"]


@dataclass(frozen=True)
class Welcome:
    connection_id: str
    user: str
    instance: str
    heartbeat_s: int


@dataclass(frozen=True)
class Message:
    """A room message. ``sender`` is the frame's ``from`` (the publishing
    user, or ``"server"``)."""

    id: str
    room: str
    sender: str
    data: Any
    ts: int


@dataclass(frozen=True)
class Direct:
    """A message to every connection of this user."""

    id: str
    sender: str
    data: Any
    ts: int


@dataclass(frozen=True)
class Broadcast:
    """A message to everyone, from the backend API."""

    id: str
    data: Any
    ts: int


@dataclass(frozen=True)
class Joined:
    """A user's first connection joined a room this client is in."""

    room: str
    user: str


@dataclass(frozen=True)
class Left:
    """A user's last connection left a room this client is in."""

    room: str
    user: str


@dataclass(frozen=True)
class TaskUpdate:
    task_id: str
    status: TaskStatus
    progress: Optional[int] = None
    message: Optional[str] = None
    result: Any = None
    error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


@dataclass(frozen=True)
class TaskRecord:
    """A task's record (``task_status``, ``GET /api/tasks/{id}``)."""

    task_id: str
    name: str
    user: str
    status: str
    attempts: int
    created_at: int
    updated_at: int
    progress: Optional[int] = None
    result: Any = None
    error: Optional[str] = None

    @staticmethod
    def from_json(d: dict[str, Any]) -> "TaskRecord":
        return TaskRecord(
            task_id=str(d.get("task_id", "")),
            name=str(d.get("name", "")),
            user=str(d.get("user", "")),
            status=str(d.get("status", "")),
            attempts=int(d.get("attempts", 0)),
            created_at=int(d.get("created_at", 0)),
            updated_at=int(d.get("updated_at", 0)),
            progress=d.get("progress"),
            result=d.get("result"),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class PresenceEntry:
    user: str
    connections: int


@dataclass(frozen=True)
class JoinResult:
    room: str
    recovered: Optional[bool] = None
    """Present when the join carried ``since``: whether everything after it
    was replayed."""


@dataclass(frozen=True)
class Recovery:
    """After each rejoin on a reconnect. ``recovered=False``: messages may be
    missing; reload the room from your backend (``since=None``: no message
    had been seen there)."""

    room: str
    recovered: bool
    since: Optional[str]


@dataclass(frozen=True)
class Revoked:
    """Rooms the client is no longer in and will not rejoin: ``refresh`` (the
    new token does not allow them) or ``rejoin`` (the hub refused the rejoin)."""

    rooms: tuple[str, ...]
    reason: Literal["refresh", "rejoin"]
    error: Optional[SwitchboardError] = None


@dataclass(frozen=True)
class Connected:
    welcome: Welcome
    reconnected: bool


@dataclass(frozen=True)
class Disconnected:
    """The connection went down. ``delay`` (seconds) is when the next
    attempt comes, when ``will_reconnect``."""

    code: int
    reason: str
    will_reconnect: bool
    delay: Optional[float] = None


@dataclass(frozen=True)
class Closed:
    """The client stopped: ``close()``, or a close it must not retry."""

    code: int
    reason: str


@dataclass(frozen=True)
class ErrorEvent:
    """Something went wrong outside a request: ``during`` is ``token``,
    ``refresh``, ``rejoin``, ``frame`` or ``connect``."""

    error: BaseException
    during: str


@dataclass(frozen=True)
class Overflow:
    """The client's event buffer was full: ``dropped`` events (the oldest)
    were discarded before this one. Read events faster, or raise
    ``max_buffered_events``."""

    dropped: int = field(default=0)


Event = Union[
    Message,
    Direct,
    Broadcast,
    Joined,
    Left,
    TaskUpdate,
    Recovery,
    Revoked,
    Connected,
    Disconnected,
    Closed,
    ErrorEvent,
    Overflow,
]
