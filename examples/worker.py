"""A Switchboard task worker in Python: runs `shout` tasks (upper-cases the
payload's "text"). The hub declares the task `kind = "external"` and runs no
worker of its own (`tasks.workers = 0`).

    pip install ./clients/python
    REDIS_URL=redis://127.0.0.1:6379 PREFIX=sb python examples/worker.py
"""
import os

from switchboard import Task, Worker

worker = Worker(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), prefix=os.environ.get("PREFIX", "sb"))


@worker.handler("shout")
async def shout(task: Task) -> dict:
    return {"text": str(task.payload.get("text", "")).upper()}


if __name__ == "__main__":
    worker.run()  # until SIGTERM / SIGINT
