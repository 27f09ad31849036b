"""The FastAPI + Redis tutorial's application, rebuilt on Switchboard.

The app keeps what is its own: who its users are, what a notification says,
how a report is made. Switchboard holds the WebSocket connections and does
the fan-out, presence, recovery after a reconnect, rate limits and the task
queue. See README.md beside this file for the side-by-side.

Routes:
- ``POST /login``: checks a password, hands back a Switchboard token and the
  WebSocket URL to connect to;
- ``POST /notifications``: (logged-in users) publishes a notification to the
  ``notifications`` room, or to one user, through the hub's HTTP API;
- ``POST /tasks/report``: the ``report`` task's webhook; the hub calls it
  for each attempt; a slow report that tells its progress as it goes;
- ``GET /health``.

Environment: ``SWITCHBOARD_URL`` (the hub's HTTP address, for the API),
``SWITCHBOARD_PUBLIC_WS`` (the WebSocket URL handed to clients),
``SWITCHBOARD_API_KEY`` (one of the hub's ``auth.api_keys``),
``SWITCHBOARD_JWT_SECRET`` (the hub's ``auth.jwt_secret``), ``REPORT_SECRET``
(the header the hub's webhook config sends), ``REPORT_STEP_S`` (seconds per
month of report, 1 by default).
"""

from __future__ import annotations

import asyncio
import hmac
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import jwt
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

from switchboard import AsyncApi, mint_token

HUB_URL = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8000")
PUBLIC_WS = os.environ.get("SWITCHBOARD_PUBLIC_WS", "ws://localhost:8000/ws")
API_KEY = os.environ.get("SWITCHBOARD_API_KEY", "")
JWT_SECRET = os.environ.get("SWITCHBOARD_JWT_SECRET", "")
REPORT_SECRET = os.environ.get("REPORT_SECRET", "")
REPORT_STEP_S = float(os.environ.get("REPORT_STEP_S", "1"))
TOKEN_TTL_S = 3600

# Demo users. Yours come from your user store, with hashed passwords.
USERS = {"alice": "wonderland", "bob": "builder"}

hub: AsyncApi


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global hub
    if not (API_KEY and JWT_SECRET):
        raise RuntimeError("set SWITCHBOARD_API_KEY and SWITCHBOARD_JWT_SECRET")
    hub = AsyncApi(HUB_URL, API_KEY)
    yield
    await hub.aclose()


app = FastAPI(title="Notifications on Switchboard", lifespan=lifespan)


class Login(BaseModel):
    username: str
    password: str


@app.post("/login")
async def login(body: Login) -> dict[str, Any]:
    """A token for the hub: joins `notifications` and `chat.*`, may publish
    to `chat.*` only (notifications come from the backend)."""
    expected = USERS.get(body.username)
    if expected is None or not hmac.compare_digest(expected, body.password):
        raise HTTPException(401, "wrong username or password")
    token = mint_token(
        body.username,
        secret=JWT_SECRET,
        ttl_s=TOKEN_TTL_S,
        rooms=["notifications", "chat.*"],
        publish=["chat.*"],
    )
    return {"token": token, "ws_url": PUBLIC_WS, "expires_in": TOKEN_TTL_S}


def current_user(authorization: str = Header(default="")) -> str:
    """The app's routes take the same token (checked here, with the same secret)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "Authorization: Bearer <token> required")
    try:
        claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        raise HTTPException(401, "invalid token") from None
    return str(claims["sub"])


class Notification(BaseModel):
    text: str
    user: Optional[str] = None
    """To one user only; else to the `notifications` room."""


@app.post("/notifications")
async def notify(body: Notification, sender: str = Depends(current_user)) -> dict[str, str]:
    data = {"text": body.text, "by": sender}
    if body.user:
        return {"id": await hub.send_to_user(body.user, data)}
    return {"id": await hub.publish("notifications", data)}


class TaskCall(BaseModel):
    """What the hub POSTs to a webhook handler."""

    task_id: str
    name: str
    user: str
    payload: Any = None


@app.post("/tasks/report")
async def report(call: TaskCall, x_report_secret: str = Header(default="")) -> dict[str, Any]:
    """A slow report, one step per month. Its answer is the task's result; an
    error answer fails the attempt (the hub retries)."""
    if not REPORT_SECRET or not hmac.compare_digest(x_report_secret, REPORT_SECRET):
        raise HTTPException(403, "not the hub")
    months = int((call.payload or {}).get("months", 3))
    if not 1 <= months <= 12:
        raise HTTPException(422, "months: 1 to 12")
    rows = []
    for month in range(1, months + 1):
        await asyncio.sleep(REPORT_STEP_S)  # the slow part
        rows.append({"month": month, "signups": 10 * month})
        await hub.task_progress(call.task_id, 100 * month // months, f"month {month} of {months}")
    return {"user": call.user, "rows": rows}


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"ok": True, "hub_ready": await hub.ready()}
