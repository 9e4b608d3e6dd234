"""The in-process harness: the real gateway, served from a thread of the test process.

Starting `fieldguard serve` costs a Python start and every import, over a second each time; most tests
need none of what only a process gives (signals, kill -9, a PKCS#11 login of its own, the demo). Here
the same `Gateway` the server runs is served by uvicorn on a loopback port from a thread, with its own
event loop, in front of a real upstream process, on real SQLite files: tests talk to it over HTTP
exactly as they talk to a process, and its log lines are kept apart from other gateways' by a context
variable that every task and worker thread it starts inherits. An async test can also drive the app
directly in its own loop (`driven`), through httpx's ASGI transport.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
import structlog
import uvicorn

import proxy.logs
from proxy.app import Gateway
from proxy.config import load_settings
from proxy.server import server_config

_SINK: contextvars.ContextVar[TextIO | None] = contextvars.ContextVar("fieldguard_test_log", default=None)


class _Routed(io.TextIOBase):
    """Writes each log line to the log of the gateway whose context wrote it (stderr for anyone else)."""

    def write(self, text: str) -> int:
        sink = _SINK.get() or sys.stderr
        sink.write(text)
        sink.flush()
        return len(text)


def configure_logging() -> None:
    """The gateway's JSON log lines, as `proxy.logs.configure` makes them, routed per gateway."""

    def dumps(value: Any, **_: Any) -> str:
        return orjson.dumps(value, default=str).decode()

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer(serializer=dumps)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(_Routed()),
        cache_logger_on_first_use=True,
    )
    logging.getLogger("casbin").setLevel(logging.ERROR)
    # commands run in this process (CliRunner) configure logging for a terminal; here it stays routed
    proxy.logs.configure = lambda level="info": None  # type: ignore[assignment]


class InProcessService:
    """A gateway served from a thread; `start`, `stop` and `output` as `conftest.Service` has them."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc = None  # no process: tests that need one ask for `process=True`
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def start(self, timeout: float = 60) -> InProcessService:
        sink = self.log.open("a", encoding="utf-8")
        here = _SINK.set(sink)
        try:
            app = Gateway(load_settings(self.config))  # a refused policy or config raises here, in the test
        except BaseException:
            sink.close()
            raise
        finally:
            _SINK.reset(here)
        # as `fieldguard serve` serves it, on the stdlib loop: uvloop would become the whole process's policy
        self._server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, loop="asyncio"))

        def serve() -> None:
            _SINK.set(sink)
            try:
                assert self._server is not None
                self._server.run()
            except BaseException as exc:  # reported to the test that started it
                self._failure = exc
            finally:
                sink.close()

        self._thread = threading.Thread(target=serve, name=f"gateway-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"in-process gateway did not start ({self._failure!r}):\n{self.output()[-3000:]}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.asynccontextmanager
async def driven(config: Path) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """The ASGI app driven directly from an async test, in the test's own loop: no server, no socket on
    the gateway's side, started and stopped around the block (the upstream is still a real process)."""
    app = Gateway(load_settings(config))
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client
    finally:
        await app.shutdown()
