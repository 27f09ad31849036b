"""The seed: a FastAPI + Redis real-time hub written the way the tutorial teaches.

Benchmark peer for Switchboard. It follows the tutorial's shape on purpose,
including its weaknesses, because it is the baseline Switchboard is measured
against:

* a ``ConnectionManager`` that keeps connections, users and rooms in dicts,
  enforces at most 5 connections per user (on this process only) and records
  every connection with ``HSET connections <conn_id> <user>`` in Redis (and
  ``HDEL`` on disconnect; nothing cleans up after a crash);
* ``/ws?token=<jwt>``: the JWT (HS256) is checked before anything else; a bad
  token is accepted and then closed with 1008;
* room publishes go out through Redis pub/sub (one channel per room,
  ``room:<name>``) and a background task started at startup forwards what
  arrives to the local members, so several workers/instances share traffic;
* the forwarder sends to members one after another with ``send_json`` (one
  serialization per recipient), as the tutorial's ``broadcast`` does;
* ``/health`` pings Redis.

Wire protocol: the subset of Switchboard's (docs/protocol.md) that the
benchmark uses: ``welcome``; ``join``/``leave`` + ``ack``; ``publish`` +
``ack`` with ``id``; ``message``; ``ping``/``pong``; ``error``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
import uuid
from contextlib import asynccontextmanager

import jwt
import redis.asyncio as redis
from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

REDIS_URL = os.getenv("REDIS_URL", "redis://localhost:6379/0")
JWT_SECRET = os.getenv("JWT_SECRET", "change-me")
JWT_ALGORITHM = "HS256"
MAX_CONNECTIONS_PER_USER = int(os.getenv("MAX_CONNECTIONS_PER_USER", "5"))
INSTANCE_ID = os.getenv("INSTANCE_ID", f"seed-{os.getpid()}")
HEARTBEAT_S = 20
ROOM_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

log = logging.getLogger("seed")
redis_client: redis.Redis | None = None
_ids = itertools.count(1)


def verify_token(token: str | None) -> tuple[str | None, str]:
    """Return (user_id, "") or (None, close reason)."""
    if not token:
        return None, "unauthorized"
    try:
        claims = jwt.decode(
            token, JWT_SECRET, algorithms=[JWT_ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError:
        return None, "token expired"
    except jwt.PyJWTError:
        return None, "unauthorized"
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        return None, "unauthorized"
    return sub, ""


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: dict[str, WebSocket] = {}
        self.connection_user: dict[str, str] = {}
        self.user_connections: dict[str, set[str]] = {}
        self.rooms: dict[str, set[str]] = {}
        self.connection_rooms: dict[str, set[str]] = {}

    async def connect(self, websocket: WebSocket, user_id: str) -> str | None:
        await websocket.accept()
        if len(self.user_connections.get(user_id, ())) >= MAX_CONNECTIONS_PER_USER:
            await websocket.close(code=1008, reason="connection limit")
            return None
        conn_id = uuid.uuid4().hex
        self.active_connections[conn_id] = websocket
        self.connection_user[conn_id] = user_id
        self.user_connections.setdefault(user_id, set()).add(conn_id)
        self.connection_rooms[conn_id] = set()
        await redis_client.hset("connections", conn_id, user_id)
        return conn_id

    async def disconnect(self, conn_id: str) -> None:
        if self.active_connections.pop(conn_id, None) is None:
            return
        user_id = self.connection_user.pop(conn_id, None)
        conns = self.user_connections.get(user_id)
        if conns is not None:
            conns.discard(conn_id)
            if not conns:
                del self.user_connections[user_id]
        for room in self.connection_rooms.pop(conn_id, set()):
            members = self.rooms.get(room)
            if members is not None:
                members.discard(conn_id)
                if not members:
                    del self.rooms[room]
        try:
            await redis_client.hdel("connections", conn_id)
        except Exception:  # noqa: BLE001 - Redis down: the tutorial just logs
            log.exception("could not remove %s from Redis", conn_id)

    def join(self, conn_id: str, room: str) -> None:
        self.rooms.setdefault(room, set()).add(conn_id)
        self.connection_rooms[conn_id].add(room)

    def leave(self, conn_id: str, room: str) -> None:
        members = self.rooms.get(room)
        if members is not None:
            members.discard(conn_id)
            if not members:
                del self.rooms[room]
        self.connection_rooms.get(conn_id, set()).discard(room)

    def is_member(self, conn_id: str, room: str) -> bool:
        return room in self.connection_rooms.get(conn_id, ())

    async def send_personal_message(self, message: dict, websocket: WebSocket) -> None:
        await websocket.send_json(message)

    async def broadcast_to_room(self, room: str, message: dict) -> None:
        for conn_id in list(self.rooms.get(room, ())):
            websocket = self.active_connections.get(conn_id)
            if websocket is None:
                continue
            try:
                await websocket.send_json(message)
            except Exception:  # noqa: BLE001 - a dead socket: drop it
                await self.disconnect(conn_id)


manager = ConnectionManager()


async def redis_listener() -> None:
    """Background task: forward every room message from Redis to local members."""
    while True:
        pubsub = redis_client.pubsub()
        try:
            await pubsub.psubscribe("room:*")
            async for message in pubsub.listen():
                if message["type"] != "pmessage":
                    continue
                room = message["channel"].split(":", 1)[1]
                payload = json.loads(message["data"])
                payload["type"] = "message"
                await manager.broadcast_to_room(room, payload)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("redis listener failed; retrying in 1s")
            await asyncio.sleep(1)
        finally:
            await pubsub.aclose()


@asynccontextmanager
async def lifespan(_app: FastAPI):
    global redis_client
    # redis-py's default asyncio pool raises "Too many connections" past 100
    # concurrent commands (100 clients handshaking at once); a blocking pool waits.
    redis_client = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(
            REDIS_URL, decode_responses=True, max_connections=100, timeout=None
        )
    )
    task = asyncio.create_task(redis_listener())
    try:
        yield
    finally:
        task.cancel()
        await redis_client.aclose()


app = FastAPI(title="seed realtime hub", lifespan=lifespan)


@app.get("/health")
async def health():
    try:
        await redis_client.ping()
    except Exception as e:  # noqa: BLE001
        return JSONResponse({"status": "unavailable", "reason": str(e)}, status_code=503)
    return {"status": "ok", "instance": INSTANCE_ID, "connections": len(manager.active_connections)}


def error(code: str, message: str, ref=None) -> dict:
    frame = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return frame


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket, token: str | None = Query(default=None)):
    user_id, reason = verify_token(token)
    if user_id is None:
        await websocket.accept()
        await websocket.close(code=1008, reason=reason)
        return
    conn_id = await manager.connect(websocket, user_id)
    if conn_id is None:
        return
    try:
        await manager.send_personal_message(
            {
                "type": "welcome",
                "connection_id": conn_id,
                "user": user_id,
                "instance": INSTANCE_ID,
                "heartbeat_s": HEARTBEAT_S,
            },
            websocket,
        )
        while True:
            raw = await websocket.receive_text()
            try:
                msg = json.loads(raw)
            except ValueError:
                await websocket.send_json(error("bad_request", "not JSON"))
                continue
            if not isinstance(msg, dict):
                await websocket.send_json(error("bad_request", "not an object"))
                continue
            kind = msg.get("type")
            ref = msg.get("ref")
            if kind in ("join", "leave", "publish"):
                room = msg.get("room")
                if not isinstance(room, str) or not ROOM_RE.match(room):
                    await websocket.send_json(error("bad_request", "bad room name", ref))
                    continue
                if kind == "join":
                    manager.join(conn_id, room)
                    await websocket.send_json({"type": "ack", "ref": ref, "room": room, "recovered": False})
                elif kind == "leave":
                    manager.leave(conn_id, room)
                    await websocket.send_json({"type": "ack", "ref": ref, "room": room})
                else:
                    if "data" not in msg:
                        await websocket.send_json(error("bad_request", "missing data", ref))
                        continue
                    if not manager.is_member(conn_id, room):
                        await websocket.send_json(error("forbidden", "join the room first", ref))
                        continue
                    ts = int(time.time() * 1000)
                    message = {
                        "id": f"{ts}-{next(_ids)}",
                        "room": room,
                        "from": user_id,
                        "data": msg["data"],
                        "ts": ts,
                    }
                    await redis_client.publish(f"room:{room}", json.dumps(message))
                    await websocket.send_json({"type": "ack", "ref": ref, "id": message["id"]})
            elif kind == "ping":
                await websocket.send_json({"type": "pong"})
            else:
                await websocket.send_json(error("bad_request", f"unknown type {kind!r}", ref))
    except WebSocketDisconnect:
        pass
    finally:
        await manager.disconnect(conn_id)
