"""Switchboard for Python: an asyncio client, the backend HTTP API, token
minting, and a task worker for handlers written in Python.

- :class:`Client`: a WebSocket connection that survives disconnects (rooms,
  direct messages, presence, tasks), as the JavaScript client;
- :class:`AsyncApi` / :class:`Api`: what a backend calls over HTTP (publish,
  presence, history, disconnect, task records and progress);
- :func:`mint_token`: the JWTs the hub accepts;
- :class:`Worker`: runs ``@worker.handler("name")`` functions for tasks the
  hub queues on Redis (``kind = "external"``).
"""

from .api import Api, AsyncApi
from .client import Client, TaskHandle
from .errors import ApiError, SwitchboardError, TaskFailedError
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
from .tokens import decode_unverified, mint_token
from .worker import Task, TaskFailed, Worker

__all__ = [
    "Api",
    "ApiError",
    "AsyncApi",
    "Broadcast",
    "Client",
    "Closed",
    "Connected",
    "Direct",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "Joined",
    "JoinResult",
    "Left",
    "Message",
    "Overflow",
    "PresenceEntry",
    "Recovery",
    "Revoked",
    "SwitchboardError",
    "Task",
    "TaskFailed",
    "TaskFailedError",
    "TaskHandle",
    "TaskRecord",
    "TaskUpdate",
    "Welcome",
    "Worker",
    "compare_ids",
    "decode_unverified",
    "mint_token",
]

__version__ = "0.1.0"
