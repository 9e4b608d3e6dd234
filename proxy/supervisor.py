"""The supervisor: every background task of the gateway, named, kept alive and accounted for.

A task is one step (poll the policy files, re-read the relation facts, poll the keystore's revocations,
beat the audit writer) run every few seconds, or at once when woken. A step that raises is logged and
retried with a growing pause; the task itself never ends but on shutdown. Each task's last success is
shown in `/readyz`, and readiness fails when a task has not succeeded within its bound: a watcher that
has silently stopped working is a gateway that is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("fieldguard.supervisor")

Step = Callable[[], Awaitable[object]]


class Task:
    """One supervised background task."""

    def __init__(self, name: str, step: Step, every: float, stale_after: float, max_pause: float,
                 first_pause: float) -> None:
        self.name = name
        self.step = step
        self.every = every
        self.stale_after = stale_after
        self.max_pause = max_pause
        self.first_pause = first_pause
        self.failures = 0  # in a row
        self.last_success: float | None = None  # epoch seconds
        self.last_error: str | None = None
        self.last_run = 0.0  # monotonic, for `wake`'s rate limit
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> bool:
        """Run the step now; True when it succeeded. Any exception is caught, logged and counted."""
        self.last_run = time.monotonic()
        try:
            await self.step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.error("background task failed; retrying", task=self.name, error=type(exc).__name__,
                      failures=self.failures, retry_in=round(self.pause(), 2))
            return False
        if self.failures:
            log.info("background task recovered", task=self.name, after_failures=self.failures)
        self.failures = 0
        self.last_error = None
        self.last_success = time.time()
        return True

    def pause(self) -> float:
        """The wait before the next run: `every`, or after failures a backoff doubling from `first_pause`."""
        if not self.failures:
            return self.every
        return float(min(self.first_pause * 2.0 ** (self.failures - 1), max(self.every, self.max_pause)))

    def wake(self, at_most_every: float = 0.0) -> None:
        """Run the step soon, unless it ran less than `at_most_every` seconds ago."""
        if time.monotonic() - self.last_run >= at_most_every:
            self._woken.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.pause()):  # not wait_for: no task made per beat
                    await self._woken.wait()
            self._woken.clear()
            await self.run_once()

    @property
    def fresh(self) -> bool:
        return self.last_success is not None and time.time() - self.last_success <= self.stale_after

    def status(self) -> dict[str, Any]:
        age = round(time.time() - self.last_success, 3) if self.last_success is not None else None
        return {"ok": self.fresh, "last_success": self.last_success, "age_seconds": age,
                "stale_after_seconds": self.stale_after, "failures": self.failures, "last_error": self.last_error,
                "running": self._task is not None and not self._task.done()}


class Supervisor:
    """Owns the gateway's background tasks: started together, stopped together, reported together."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def add(self, name: str, step: Step, every: float, stale_after: float | None = None,
            max_pause: float = 5.0, first_pause: float = 0.5) -> Task:
        """Supervise `step`, run every `every` seconds; stale (readiness fails) `stale_after` seconds after
        its last success; after failures retried from `first_pause`, doubling up to `max_pause` (or `every`)."""
        if name in self.tasks:
            raise ValueError(f"a task named {name} is already supervised")
        task = self.tasks[name] = Task(name, step, every, stale_after or max(10 * every, 10.0), max_pause,
                                       first_pause)
        return task

    async def start(self) -> None:
        """Run every step once (the gateway starts on what it could read), then keep them running."""
        for task in self.tasks.values():
            await task.run_once()
        for task in self.tasks.values():
            task._task = asyncio.create_task(task._loop(), name=f"fieldguard-{task.name}")

    async def stop(self) -> None:
        running = [t._task for t in self.tasks.values() if t._task is not None]
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    @property
    def healthy(self) -> bool:
        return all(task.fresh for task in self.tasks.values())

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: task.status() for name, task in self.tasks.items()}
