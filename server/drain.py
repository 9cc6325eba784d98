"""SIGTERM drains with a deadline: running generations finish, new ones get 503, then the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("prefixserve")

# After the generations are done (or the deadline passed), open connections get at most this long to
# finish sending before they are cut: a client sending a body at 1 byte/s does not hold the exit.
MAX_CONNECTION_GRACE_SECONDS = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM (or SIGINT) drains instead of closing the listener at once.

    While draining the server keeps listening, so /readyz answers 503 and new generations get 503
    `draining` (a load balancer moves traffic away); running generations finish for at most
    `drain_timeout` seconds and are aborted after that; then uvicorn's shutdown runs with a short grace for
    open connections, and `serve` returns (exit 0). A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.is_draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.app.state
        if self.is_draining or self._loop is None or getattr(state, "engine", None) is None:
            # a second signal, or nothing to drain yet (still loading): exit now, as uvicorn does
            self.force_exit = self.is_draining
            self.should_exit = True
            return
        self.is_draining = True
        state.draining = True  # /readyz and new generations see it at once
        log.info(
            "%s: draining (up to %g s for running generations)", signal.Signals(sig).name, self.drain_timeout
        )
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        state = self.app.state
        engine = state.engine
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline and _is_busy(state):
            await asyncio.sleep(0.05)
        if _is_busy(state):
            num_aborted = engine.abort_all()
            log.warning(
                "drain deadline (%g s) passed: aborted %d generation(s)", self.drain_timeout, num_aborted
            )
        else:
            log.info("drained: no generation running")
        left = max(0.0, deadline - time.monotonic())
        # uvicorn annotates it int, but uses it as asyncio.wait_for(timeout=...), which takes a float
        self.config.timeout_graceful_shutdown = max(0.2, min(MAX_CONNECTION_GRACE_SECONDS, left))  # type: ignore[assignment]
        self.should_exit = True


def _is_busy(state: Any) -> bool:
    engine = state.engine
    return engine.num_running + engine.num_waiting > 0 or getattr(state, "num_starting", 0) > 0
