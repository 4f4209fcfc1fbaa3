"""Running nodes: one in this process, or N worker processes kept alive by a supervisor.

Hypercorn's own supervisor (``hypercorn --workers N``, ``hypercorn/run.py``) ends as
soon as one worker exits: it sets the shared shutdown event and terminates the others,
then reads the exit codes a second time before they have exited, and that reading (0)
replaces the dead worker's. A ``kill -9`` or an OOM kill of one worker is a full outage
that exits 0, like a clean stop. `Supervisor` works like gunicorn's arbiter
and Node's cluster module instead: it binds the HTTP socket once, starts the workers,
and restarts a worker that dies while the others serve on. The chat socket needs no
sharing: every worker binds it itself with ``SO_REUSEPORT``. Exit status: 0 after a
requested stop, 1 for a node that failed or a crash loop, `START_FAILED`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Final

import trio

from ._logs import set_node as set_log_node

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from multiprocessing.process import BaseProcess

    from hypercorn.config import Config, Sockets

log = logging.getLogger("trio_chat.supervisor")

#: Exit status of a node that could not start (data directory, port taken...): the
#: supervisor stops at once when a worker's first start ends so (gunicorn's
#: WORKER_BOOT_ERROR), since every restart would fail the same way.
START_FAILED: Final = 3
# Restart delay after a worker dies: doubled after each death of that worker, back to
# the first value once a worker has stayed up _STABLE seconds.
_FIRST_DELAY: Final = 0.5
_MAX_DELAY: Final = 10.0
_STABLE: Final = 30.0
# More than _CRASH_LIMIT deaths within _CRASH_WINDOW seconds is a crash loop: restarting
# only hides it, so stop and let the service manager (or a person) decide.
_CRASH_LIMIT: Final = 5
_CRASH_WINDOW: Final = 60.0
# After SIGTERM a worker closes its clients (TRIO_CHAT_SHUTDOWN_GRACE, 3 s) and its HTTP
# connections (hypercorn's graceful_timeout, 3 s); past this it is killed.
_STOP_WAIT: Final = 15.0


def run_node(config: Config, sockets: Sockets | None, signals: tuple[int, ...]) -> int:
    """Serve one node in this process until one of ``signals``; return the exit status.

    Args:
      config: hypercorn's configuration (binds, timeouts, logs).
      sockets: HTTP sockets bound by a supervisor, or None to bind ``config.bind`` here.
      signals: the signals that stop the node gracefully (every client gets 1001).
    """
    from hypercorn.utils import LifespanFailureError

    failure = None
    try:
        trio.run(_serve_node, config, sockets, signals)
    except* LifespanFailureError as group:
        failure = group.exceptions[0]
    if failure is None:
        return 0
    # Hypercorn keeps the stage only in the text: LifespanFailureError(stage, message).
    # (Its worker reports itself started even then: the lifespan's end sets "started".)
    if str(failure).startswith("Lifespan failure in startup"):
        print(f"trio-chat: could not start: {failure}", file=sys.stderr)
        return START_FAILED
    print(f"trio-chat: the node failed while serving: {failure}", file=sys.stderr)
    return 1


async def _serve_node(config: Config, sockets: Sockets | None, signals: tuple[int, ...]) -> None:
    """Hypercorn's trio worker around our `ChatApp`, stopped by our own signal handler.

    A signal first closes every client of both sockets with 1001 (hypercorn's own
    shutdown reaches the app only after it has cut ``/ws``), then stops hypercorn. The
    receiver stays open until hypercorn is done: a second signal (a service manager
    signals the whole group) cannot kill the worker halfway through closing.
    """
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from ._app import ChatApp

    app = ChatApp()
    # Sockets come from a supervisor: this is one of its workers.
    parent = os.getppid() if sockets is not None else None

    async def shutdown_trigger() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_first_signal, received, nursery.cancel_scope)
            if parent is not None:
                # An orphaned worker would hold the ports of the supervisor that replaces it.
                nursery.start_soon(_orphaned, parent, nursery.cancel_scope)
        if app.node is not None:
            await app.node.shutdown()

    with trio.open_signal_receiver(*signals) as received:
        # ChatApp is typed with plain dicts for scopes and messages, hypercorn with TypedDicts.
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
            config,
            sockets=sockets,
            shutdown_trigger=shutdown_trigger,
        )


async def _first_signal(received: AsyncIterator[int], done: trio.CancelScope) -> None:
    async for signum in received:
        log.info("%s: closing every client with 1001", signal.Signals(signum).name)
        break
    done.cancel()


async def _orphaned(parent: int, done: trio.CancelScope) -> None:
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        await trio.lowlevel.checkpoint()  # gone already
    else:
        try:
            # A pidfd becomes readable when its process exits.
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
    log.error("the supervisor (pid %d) is gone: stopping this worker", parent)
    done.cancel()


def _worker_main(config: Config, sockets: Sockets, wakeup: tuple[int, int]) -> None:
    """A worker process, forked from the supervisor: first undo its signal set-up."""
    signal.set_wakeup_fd(-1)
    for fd in wakeup:
        os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A terminal's Ctrl-C reaches the supervisor and every worker: the supervisor alone
    # decides, and forwards SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_log_node("-")  # until the node has its id
    sys.exit(run_node(config, sockets, (signal.SIGTERM,)))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


@dataclasses.dataclass
class _Worker:
    index: int
    process: BaseProcess
    started_at: float
    #: Its slot's first worker: one that cannot start means a restart would fail too.
    first: bool
    #: How long to wait before restarting it if it dies.
    delay: float


class Supervisor:
    """Keeps ``count`` worker processes serving on the sockets of ``config``.

    Workers are forked from this process (which runs no trio and no thread) with the
    app imported: a restart takes ~0.1 s, not seconds of imports, and exit statuses
    come from ``waitpid`` (docs/architecture.md, "The supervisor").

    Args:
      config: hypercorn's configuration; its sockets are bound once, here.
      count: how many workers.
    """

    def __init__(self, config: Config, count: int) -> None:
        self._config = config
        self._count = count
        self._context = multiprocessing.get_context("fork")
        self._workers: dict[int, _Worker] = {}
        #: Slots waiting for a restart: when, and the delay to use after that one.
        self._restarts: dict[int, tuple[float, float]] = {}
        self._deaths: collections.deque[float] = collections.deque()
        self._status = 0

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a crash loop; return the exit status."""
        set_log_node("supervisor")
        try:
            sockets = self._config.create_sockets()
        except OSError as exc:
            print(f"trio-chat: cannot bind {', '.join(self._config.bind)}: {exc}", file=sys.stderr)
            return START_FAILED
        listeners = sockets.insecure_sockets + sockets.secure_sockets
        for sock in listeners:
            # Listening here, once: connections queue even while no worker is up.
            sock.listen(self._config.backlog)
        # A signal's number goes down the pipe (its handler does nothing), which wakes the loop.
        wakeup = os.pipe()
        os.set_blocking(wakeup[1], False)
        handlers = {
            sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous_fd = signal.set_wakeup_fd(wakeup[1])
        try:
            for index in range(self._count):
                self._start(index, sockets, wakeup, _FIRST_DELAY, first=True)
            self._supervise(sockets, wakeup)
            self._stop_workers()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for fd in wakeup:
                os.close(fd)
            for sock in listeners:
                sock.close()
        return self._status

    def _start(
        self, index: int, sockets: Sockets, wakeup: tuple[int, int], delay: float, *, first: bool
    ) -> None:
        process = self._context.Process(
            target=_worker_main, args=(self._config, sockets, wakeup), name=f"worker {index}"
        )
        process.start()
        self._workers[index] = _Worker(index, process, time.monotonic(), first, delay)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _supervise(self, sockets: Sockets, wakeup: tuple[int, int]) -> None:
        """Restart workers as they die, until a signal or a crash loop."""
        while True:
            now = time.monotonic()
            for index, (when, delay) in list(self._restarts.items()):
                if when <= now:
                    del self._restarts[index]
                    self._start(index, sockets, wakeup, delay, first=False)
            next_restart = min((when for when, _ in self._restarts.values()), default=None)
            timeout = None if next_restart is None else max(0.0, next_restart - now)
            sentinels = {w.process.sentinel: w for w in self._workers.values()}
            ready = wait([wakeup[0], *sentinels], timeout)
            if wakeup[0] in ready:
                signum = os.read(wakeup[0], 1)[0]
                log.info("%s: stopping the workers", signal.Signals(signum).name)
                return
            for sentinel, worker in sentinels.items():
                if sentinel in ready and not self._restart_later(worker):
                    return

    def _restart_later(self, worker: _Worker) -> bool:
        """Log a worker's death and schedule its restart; False if it is time to give up."""
        process = worker.process
        process.join()
        del self._workers[worker.index]
        now = time.monotonic()
        uptime = now - worker.started_at
        how = _describe_exit(process.exitcode)
        log.error("worker %d (pid %d) %s after %.1f s", worker.index, process.pid, how, uptime)
        if worker.first and process.exitcode == START_FAILED:
            self._give_up(START_FAILED, f"worker {worker.index} could not start: stopping")
            return False
        self._deaths.append(now)
        while self._deaths[0] < now - _CRASH_WINDOW:
            self._deaths.popleft()
        if len(self._deaths) > _CRASH_LIMIT:
            deaths = len(self._deaths)
            self._give_up(1, f"{deaths} worker deaths within {_CRASH_WINDOW:.0f} s: stopping")
            return False
        delay = _FIRST_DELAY if uptime >= _STABLE else worker.delay
        log.warning("restarting worker %d in %.1f s", worker.index, delay)
        self._restarts[worker.index] = (now + delay, min(delay * 2, _MAX_DELAY))
        return True

    def _give_up(self, status: int, reason: str) -> None:
        print(f"trio-chat: {reason}", file=sys.stderr)
        self._status = status

    def _stop_workers(self) -> None:
        """SIGTERM every worker, wait for them (bounded), then kill what is left."""
        running = list(self._workers.values())
        for worker in running:
            worker.process.terminate()
        deadline = time.monotonic() + _STOP_WAIT
        while running and (left := deadline - time.monotonic()) > 0:
            ready = wait([w.process.sentinel for w in running], left)
            for worker in [w for w in running if w.process.sentinel in ready]:
                running.remove(worker)
                worker.process.join()
                # Our own SIGTERM kills a worker still starting: it has no handler yet.
                if worker.process.exitcode not in (0, -signal.SIGTERM):
                    how = _describe_exit(worker.process.exitcode)
                    log.error("worker %d stopped badly: %s", worker.index, how)
                    self._status = self._status or 1
        for worker in running:
            log.error(
                "worker %d (pid %d) still running: killing it", worker.index, worker.process.pid
            )
            worker.process.kill()
            worker.process.join()
            self._status = self._status or 1
        log.info("all workers stopped")
