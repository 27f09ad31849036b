"""A Switchboard task worker in Python: runs `shout` tasks (upper-cases the
payload's "text"), taking part in the consumer group like Switchboard's own.
Env: REDIS_URL, PREFIX (redis.prefix, default sb). Needs: pip install redis"""
import json, os, socket, time
import redis

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), decode_responses=True)
p = os.environ.get("PREFIX", "sb")
stream, group, me = f"{p}:tasks", "workers", f"py-{socket.gethostname()}-{os.getpid()}"
try:
    r.xgroup_create(stream, group, id="0", mkstream=True)
except redis.ResponseError:
    pass  # the group exists already

def update(key, fields, user, frame):  # the record, then the user's connections
    r.hset(key, mapping={**fields, "updated_at": int(time.time() * 1000)})
    r.publish(f"{p}:user:{user}", json.dumps({"type": "task", **frame}))

while True:
    # Entries a silent worker held over the visibility timeout (60 s), then new ones.
    claimed = r.xautoclaim(stream, group, me, 60_000, "0-0", count=10)[1]
    new = r.xreadgroup(group, me, {stream: ">"}, count=10, block=1000)
    for entry_id, f in claimed + (new[0][1] if new else []):
        key, task = f"{p}:task:{f['task_id']}", {"task_id": f["task_id"]}
        if r.hget(key, "status") in ("queued", "running"):  # not cancelled or done
            r.hincrby(key, "attempts", 1)
            update(key, {"status": "running"}, f["user"], {**task, "status": "running"})
            result = {"text": json.loads(f["payload"]).get("text", "").upper()}
            update(key, {"status": "done", "result": json.dumps(result)}, f["user"],
                   {**task, "status": "done", "result": result})
            r.srem(f"{p}:task_pending:{f['user']}", f["task_id"])
        r.xack(stream, group, entry_id)
