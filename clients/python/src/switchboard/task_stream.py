"""The Redis task stream protocol, in one place.

Every key name and every step a worker takes on Redis lives here, so that a
change of the hub's layout (hash tags for Redis Cluster, a renamed key) is a
change of this module only. :mod:`switchboard.worker` decides *when* to take a
step; this module says *what* the step is.

Layout (``prefix`` is the hub's ``redis.prefix``):

Every task key carries the hash tag ``{tasks}`` (one Redis Cluster slot):

=======================================  ===========  ==========================================
key                                      kind         content
=======================================  ===========  ==========================================
``{prefix}:{tasks}:queue``               stream,      one entry per task: ``task_id``, ``name``,
                                         group        ``user``, ``payload`` (JSON text)
                                         ``workers``
``{prefix}:{tasks}:task:{id}``           hash         the record: ``status``, ``attempts``,
                                                      ``progress``, ``result`` (JSON text),
                                                      ``error``, ``updated_at`` (ms), ``payload``
                                                      (until the task ends)
``{prefix}:{tasks}:pending:{user}``      sorted set   the user's tasks not ended
``{prefix}:{tasks}:kept:{user}``         sorted set   the user's ended records, ``{bytes}:{id}``
                                                      → when it ended (ms)
``{prefix}:{tasks}:kept_bytes:{user}``   string       their bytes in all
``{prefix}:{tasks}:dead``                stream       failed tasks: ``task_id``, ``name``,
                                                      ``user``, ``payload``, ``error``,
                                                      ``attempts``
``{prefix}:user:{U}``                    channel      ``task`` frames for the user's connections
                                                      (``U``: the user id, ``%{}`` escaped);
                                                      ``SPUBLISH`` on a Redis Cluster
=======================================  ===========  ==========================================

Steps:

1. **read**: ``XREADGROUP GROUP workers <consumer> COUNT <free hands> BLOCK
   <ms> STREAMS {prefix}:tasks >``, so a task waiting behind busy hands stays
   ``queued`` (and can be cancelled); now and then ``XAUTOCLAIM`` for entries
   a silent worker held past the visibility timeout.
2. **start** (one script on the record): only a ``queued`` task starts (or a
   ``running`` one taken over with ``XAUTOCLAIM``); ``attempts`` + 1,
   ``status running``, the ``running`` frame. A cancelled or finished task is
   acked and skipped; one whose attempts are spent is failed and
   dead-lettered.
3. **renew**, every third of the visibility timeout while the attempt runs:
   ``XCLAIM {prefix}:tasks workers <consumer> 0 <entry> JUSTID``, as long as
   the record still shows this attempt.
4. **progress**, **retry** and **finish** are written only while the record
   shows this worker's attempt (same ``attempts``, ``status running``), so a
   worker that lost its claim never overwrites the new owner's work. The
   outcome removes the record's ``payload``, then the entry is acked, the id
   leaves the user's pending set and, when failed, the task is copied to the
   dead letters.
On one Redis server the scripts publish their frame themselves (``PUBLISH``,
atomic with the change). On a Redis Cluster a user's channel is in the user's
slot, not in ``{tasks}``'s, and the hub listens with ``SSUBSCRIBE``: the
scripts are given an empty channel and publish nothing, and the worker sends
the frame with ``SPUBLISH`` once the script has made the change, as the hub's
own workers do.

5. **retain**: the ended record is counted against the user's byte budget
   (the hub's ``tasks.max_record_bytes_per_user``); the oldest records past
   it are deleted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

AnyRedis = Union[aioredis.Redis, RedisCluster]
"""One Redis server's client, or a Redis Cluster's."""

GROUP = "workers"
"""The consumer group every worker of a prefix belongs to."""

DEAD_LETTERS_KEPT = 10_000
"""About this many dead letters are kept (``XADD … MAXLEN ~``)."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Keys:
    """Key and channel names under the hub's ``redis.prefix``."""

    prefix: str = "sb"

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{tasks}}"

    @property
    def stream(self) -> str:
        return f"{self.base}:queue"

    @property
    def dead_letters(self) -> str:
        return f"{self.base}:dead"

    def record(self, task_id: str) -> str:
        return f"{self.base}:task:{task_id}"

    def pending(self, user: str) -> str:
        return f"{self.base}:pending:{user}"

    def kept(self, user: str) -> str:
        return f"{self.base}:kept:{user}"

    def kept_bytes(self, user: str) -> str:
        return f"{self.base}:kept_bytes:{user}"

    def user_channel(self, user: str) -> str:
        """The user's channel: its id is the hash tag, ``%``, ``{`` and ``}``
        escaped as the hub does."""
        tag = user.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return f"{self.prefix}:user:{{{tag}}}"


@dataclass(frozen=True)
class Entry:
    """One stream entry: a task to run."""

    entry_id: str
    task_id: str
    name: str
    user: str
    payload: str
    """The payload as JSON text."""


# -- frames (what the user's connections receive) ---------------------------


def task_frame(task_id: str, status: str, **fields: Any) -> str:
    frame: dict[str, Any] = {"type": "task", "task_id": task_id, "status": status}
    frame.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(frame, separators=(",", ":"))


# -- scripts: each touches the record only (one key, one slot) --------------

_START = """
-- KEYS[1] the record. ARGV: now, max attempts, channel, running frame,
-- '1' when taken over from a silent worker, task id, error when none recorded
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'error')
local status = rec[1]
if not status then return {-1} end
if not (status == 'queued' or (ARGV[5] == '1' and status == 'running')) then
  return {0}
end
local attempts = tonumber(rec[2] or '0') or 0
if attempts >= tonumber(ARGV[2]) then
  local err = rec[3] or ARGV[7]
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'updated_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'payload')
  if ARGV[3] ~= '' then
    redis.call('PUBLISH', ARGV[3], cjson.encode({type = 'task', task_id = ARGV[6],
      status = 'failed', error = err}))
  end
  return {-2, attempts, err}
end
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[1])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return {attempts}
"""

_OWNED = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if rec[1] ~= 'running' or tonumber(rec[2]) ~= tonumber(ARGV[1]) then return 0 end
"""

_PROGRESS = (
    _OWNED
    + """
-- ARGV: attempt, now, channel, frame, progress
redis.call('HSET', KEYS[1], 'progress', ARGV[5], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""
)

_RETRY = (
    _OWNED
    + """
-- ARGV: attempt, now, channel, running frame, the last error
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'error', ARGV[5], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return n
"""
)

_FINISH = (
    _OWNED
    + """
-- ARGV: attempt, now, channel, frame, 'done' | 'failed', result JSON | error, ttl ms
if ARGV[5] == 'done' then
  redis.call('HSET', KEYS[1], 'status', 'done', 'result', ARGV[6], 'updated_at', ARGV[2])
  redis.call('HDEL', KEYS[1], 'error', 'payload')
else
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[6], 'updated_at', ARGV[2])
  redis.call('HDEL', KEYS[1], 'payload')
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""
)


_RETAIN = """
-- KEYS[1] the user's kept records, KEYS[2] their bytes. ARGV: task id,
-- bytes, now, TTL ms, budget. Returns the ids of the records to delete.
local now = tonumber(ARGV[3])
local expired = now - tonumber(ARGV[4])
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', expired)) do
  total = total - tonumber(string.match(member, '^(%d+):'))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', expired)
redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[1])
total = total + tonumber(ARGV[2])
local evicted = {}
while total > tonumber(ARGV[5]) and redis.call('ZCARD', KEYS[1]) > 1 do
  local member = redis.call('ZPOPMIN', KEYS[1])[1]
  local bytes, id = string.match(member, '^(%d+):(.*)$')
  total = total - tonumber(bytes)
  evicted[#evicted + 1] = id
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[2], total, 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return evicted
"""

RECORD_OVERHEAD = 256
"""What an ended record holds besides its result or error, as the hub counts it."""


@dataclass(frozen=True)
class Started:
    """What the start step decided."""

    attempt: int = 0
    """The attempt now running (1 for the first); 0 when it did not start."""
    exhausted_error: Optional[str] = None
    """Set when the attempts were spent: the task is failed now (the entry
    must be buried)."""


class TaskStream:
    """The protocol's steps on one Redis and one prefix."""

    def __init__(
        self,
        redis: AnyRedis,
        keys: Keys,
        result_ttl_ms: int,
        max_record_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.redis = redis
        self.sharded = isinstance(redis, RedisCluster)
        """A Redis Cluster: frames go out with ``SPUBLISH`` after the script."""
        self.keys = keys
        self.result_ttl_ms = result_ttl_ms
        self.max_record_bytes = max_record_bytes
        self._retain = redis.register_script(_RETAIN)
        self._start = redis.register_script(_START)
        self._progress = redis.register_script(_PROGRESS)
        self._retry = redis.register_script(_RETRY)
        self._finish = redis.register_script(_FINISH)

    def _channel(self, user: str) -> str:
        """The channel a script publishes on: none on a cluster."""
        return "" if self.sharded else self.keys.user_channel(user)

    async def _sharded_publish(self, user: str, frame: str) -> None:
        """On a cluster, the frame a script did not publish."""
        if self.sharded:
            await self.redis.spublish(self.keys.user_channel(user), frame)

    async def ensure_group(self) -> None:
        """The consumer group, created with the stream when missing."""
        try:
            await self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def forget_consumer(self, consumer: str) -> None:
        """At a stop: removes the consumer from the group when it holds no
        entry (one it holds stays, for another worker to take over)."""
        held = await self.redis.xpending_range(
            self.keys.stream, GROUP, min="-", max="+", count=1, consumername=consumer
        )
        if not held:
            await self.redis.xgroup_delconsumer(self.keys.stream, GROUP, consumer)

    # -- 1. read -----------------------------------------------------------

    async def read_new(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        reply: Any = await self.redis.xreadgroup(
            GROUP, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        # RESP2 answers [[stream, entries]], RESP3 {stream: entries}.
        per_stream = reply.values() if isinstance(reply, dict) else [s[1] for s in reply or []]
        entries: list[Entry] = []
        for items in per_stream:
            entries.extend(self._entries(items))
        return entries

    async def take_over(
        self, consumer: str, count: int, idle_ms: int, cursor: str = "0-0"
    ) -> tuple[list[Entry], str]:
        """Entries other consumers held for ``idle_ms`` without renewing, and
        the cursor to go on from (``0-0`` once the whole pending list was
        scanned)."""
        reply = await self.redis.xautoclaim(
            self.keys.stream, GROUP, consumer, idle_ms, cursor, count=count
        )
        items = reply[1] if len(reply) > 1 else []
        return self._entries(items), _text(reply[0]) or "0-0"

    def _entries(self, items: Any) -> list[Entry]:
        out = []
        for entry_id, fields in items:
            if not fields:
                continue  # trimmed from the stream meanwhile
            out.append(
                Entry(
                    entry_id=_text(entry_id),
                    task_id=_text(fields.get(b"task_id", b"")),
                    name=_text(fields.get(b"name", b"")),
                    user=_text(fields.get(b"user", b"")),
                    payload=_text(fields.get(b"payload", b"null")),
                )
            )
        return out

    # -- 2. start -----------------------------------------------------------

    async def start(
        self, entry: Entry, max_attempts: int, taken_over: bool, lost_error: str
    ) -> Started:
        running = task_frame(entry.task_id, "running")
        reply = await self._start(
            keys=[self.keys.record(entry.task_id)],
            args=[
                now_ms(),
                max_attempts,
                self._channel(entry.user),
                running,
                "1" if taken_over else "0",
                entry.task_id,
                lost_error,
            ],
        )
        code = int(reply[0])
        if code > 0:
            await self._sharded_publish(entry.user, running)
            return Started(attempt=code)
        if code == -2:
            error = _text(reply[2])
            await self._sharded_publish(
                entry.user, task_frame(entry.task_id, "failed", error=error)
            )
            return Started(attempt=int(reply[1]), exhausted_error=error)
        return Started()

    async def skip(self, entry: Entry) -> None:
        """A cancelled, finished or vanished task: acknowledged, not run."""
        await self.redis.xack(self.keys.stream, GROUP, entry.entry_id)

    # -- 3. renew -----------------------------------------------------------

    async def owns(self, entry: Entry, attempt: int) -> bool:
        fields = await self.redis.hmget(self.keys.record(entry.task_id), ["status", "attempts"])
        status, attempts = fields[0], fields[1]
        return _text(status) == "running" and _int(attempts) == attempt

    async def renew(self, consumer: str, entry: Entry, attempt: int) -> bool:
        """Keeps the entry from being taken over; False when the record shows
        another attempt (the claim is lost: stop renewing)."""
        if not await self.owns(entry, attempt):
            return False
        await self.redis.xclaim(
            self.keys.stream, GROUP, consumer, 0, [entry.entry_id], justid=True
        )
        return True

    # -- 4. progress, retry, finish -----------------------------------------

    async def progress(
        self, entry: Entry, attempt: int, percent: int, message: Optional[str]
    ) -> bool:
        frame = task_frame(entry.task_id, "progress", progress=percent, message=message)
        n = await self._progress(
            keys=[self.keys.record(entry.task_id)],
            args=[attempt, now_ms(), self._channel(entry.user), frame, percent],
        )
        if int(n) != 1:
            return False
        await self._sharded_publish(entry.user, frame)
        return True

    async def retry(self, entry: Entry, attempt: int, error: str) -> int:
        """The next attempt begins (counted, ``running`` again); its number,
        or 0 when the claim was lost."""
        running = task_frame(entry.task_id, "running")
        n = await self._retry(
            keys=[self.keys.record(entry.task_id)],
            args=[attempt, now_ms(), self._channel(entry.user), running, error],
        )
        if int(n) > 0:
            await self._sharded_publish(entry.user, running)
        return int(n)

    async def finish(
        self, entry: Entry, attempt: int, result_json: Optional[str], error: Optional[str]
    ) -> bool:
        """Writes the outcome (``result_json`` for done, else ``error`` for
        failed) if the record still shows this attempt; then acks, uncounts
        and, when failed, dead-letters. False when the claim was lost (nothing
        written, nothing acked: the new owner finishes it)."""
        if result_json is not None:
            status, value = "done", result_json
            frame = (
                f'{{"type":"task","task_id":{json.dumps(entry.task_id)},'
                f'"status":"done","result":{result_json}}}'
            )
        else:
            status, value = "failed", error or "failed"
            frame = task_frame(entry.task_id, "failed", error=value)
        n = await self._finish(
            keys=[self.keys.record(entry.task_id)],
            args=[
                attempt,
                now_ms(),
                self._channel(entry.user),
                frame,
                status,
                value,
                self.result_ttl_ms,
            ],
        )
        if int(n) != 1:
            return False
        await self._sharded_publish(entry.user, frame)
        await self.close_entry(entry, dead_error=None if status == "done" else value, attempts=attempt)
        return True

    async def close_entry(self, entry: Entry, dead_error: Optional[str], attempts: int) -> None:
        """The end of every entry that ran: acked, out of the user's pending
        set, and copied to the dead letters when it failed."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.keys.stream, GROUP, entry.entry_id)
        pipe.zrem(self.keys.pending(entry.user), entry.task_id)
        if dead_error is not None:
            pipe.xadd(
                self.keys.dead_letters,
                {
                    "task_id": entry.task_id,
                    "name": entry.name,
                    "user": entry.user,
                    "payload": entry.payload,
                    "error": dead_error,
                    "attempts": str(attempts),
                },
                maxlen=DEAD_LETTERS_KEPT,
                approximate=True,
            )
        await pipe.execute()
        await self.retain(entry, len(dead_error) if dead_error is not None else None)

    async def retain(self, entry: Entry, error_len: Optional[int]) -> None:
        """Counts the ended record against the user's byte budget and deletes
        the oldest records past it (what is not deleted expires anyway)."""
        if error_len is None:
            result = await self.redis.hget(self.keys.record(entry.task_id), "result")
            size = len(result or b"")
        else:
            size = error_len
        evicted = await self._retain(
            keys=[self.keys.kept(entry.user), self.keys.kept_bytes(entry.user)],
            args=[
                entry.task_id,
                RECORD_OVERHEAD + size,
                now_ms(),
                self.result_ttl_ms,
                self.max_record_bytes,
            ],
        )
        if evicted:
            await self.redis.delete(*[self.keys.record(_text(i)) for i in evicted])


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _int(v: Any) -> int:
    try:
        return int(_text(v))
    except ValueError:
        return -1
