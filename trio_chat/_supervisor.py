"""Running nodes: one in this process, or N worker processes kept alive by a supervisor.

Hypercorn's own supervisor (``hypercorn --workers N``, ``hypercorn/run.py``) ends as
soon as one worker exits: it sets the shared shutdown event, terminates the others and
returns that worker's exit code, which it then overwrites with 0 when it joins the
emptied process list a second time. A ``kill -9`` or an OOM kill of one worker is a
full outage that looks like a clean stop. `Supervisor` works like gunicorn's arbiter
and Node's cluster module instead: it binds the HTTP socket once, starts the workers,
and restarts a worker that dies while the others serve on. The chat socket needs no
sharing: every worker binds it itself with ``SO_REUSEPORT``.

Exit status, of a worker and of ``trio-chat serve``: 0 after a requested stop, 1 when a
node failed while serving (or the supervisor gave up), `START_FAILED` when a node could
not start.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
import sys
from typing import TYPE_CHECKING, Final

import trio

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

    started = False

    async def serve() -> None:
        nonlocal started
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_node, config, sockets, signals)
            started = True

    failure = None
    try:
        trio.run(serve)
    except* LifespanFailureError as group:
        failure = group.exceptions[0]
    if failure is None:
        return 0
    if started:
        print(f"trio-chat: the node failed while serving: {failure}", file=sys.stderr)
        return 1
    print(f"trio-chat: could not start: {failure}", file=sys.stderr)
    return START_FAILED


async def _serve_node(
    config: Config,
    sockets: Sockets | None,
    signals: tuple[int, ...],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's trio worker around our `ChatApp`, stopped by our own signal handler.

    Hypercorn's supervisor hides a worker that failed to start and its shutdown reaches
    the app only after it has cut the ``/ws`` connections. Here a failure to start
    raises, and a signal first closes every client of both sockets with 1001, then stops
    hypercorn. The signal receiver stays open until hypercorn is done, so a second
    signal (a service manager signals the whole group, and the supervisor forwards its
    own) cannot kill the worker halfway through closing.
    """
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from ._app import ChatApp

    app = ChatApp()
    parent = os.getppid() if sockets is not None else None

    async def shutdown_trigger() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(_first_signal, what="closing every client with 1001"),
                received,
                nursery.cancel_scope,
            )
            if parent is not None:
                # An orphaned worker would hold the ports of the supervisor that replaces it.
                nursery.start_soon(_orphaned, parent, nursery.cancel_scope)
        if app.node is not None:
            await app.node.shutdown()

    with trio.open_signal_receiver(*signals) as received:
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
            config,
            sockets=sockets,
            shutdown_trigger=shutdown_trigger,
            task_status=task_status,
        )


async def _first_signal(received: AsyncIterator[int], done: trio.CancelScope, *, what: str) -> None:
    async for signum in received:
        log.info("%s: %s", signal.Signals(signum).name, what)
        break
    done.cancel()


async def _orphaned(parent: int, done: trio.CancelScope) -> None:
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        pass
    else:
        try:
            # A pidfd becomes readable when its process exits.
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
    log.error("the supervisor (pid %d) is gone: stopping this worker", parent)
    done.cancel()


def _worker_main(config: Config, sockets: Sockets) -> None:
    """A worker process (spawned: a fresh interpreter, nothing inherited but ``sockets``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A terminal's Ctrl-C reaches the supervisor and every worker: the supervisor alone
    # decides, and forwards SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sock in sockets.insecure_sockets + sockets.secure_sockets:
        sock.listen(config.backlog)
    sys.exit(run_node(config, sockets, (signal.SIGTERM,)))


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


@dataclasses.dataclass
class _Worker:
    index: int
    process: BaseProcess
    started_at: float


class Supervisor:
    """Keeps ``count`` worker processes serving on the sockets of ``config``.

    Args:
      config: hypercorn's configuration; its sockets are bound once, here.
      count: how many workers.
    """

    def __init__(self, config: Config, count: int) -> None:
        self._config = config
        self._count = count
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._deaths: collections.deque[float] = collections.deque()
        self._give_up = trio.Event()
        self._status = 0

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a crash loop; return the exit status."""
        try:
            sockets = self._config.create_sockets()
        except OSError as exc:
            print(f"trio-chat: cannot bind {self._config.bind}: {exc}", file=sys.stderr)
            return START_FAILED
        try:
            return trio.run(self._supervise, sockets)
        finally:
            for sock in sockets.insecure_sockets + sockets.secure_sockets:
                sock.close()

    async def _supervise(self, sockets: Sockets) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async with trio.open_nursery() as nursery:
                for index in range(self._count):
                    nursery.start_soon(self._keep_alive, index, sockets)
                nursery.start_soon(
                    functools.partial(_first_signal, what="stopping the workers"),
                    received,
                    nursery.cancel_scope,
                )
                await self._give_up.wait()
                nursery.cancel_scope.cancel()
            # Later signals land in ``received``, unread: stopping is under way.
            await self._stop_workers()
        return self._status

    async def _keep_alive(self, index: int, sockets: Sockets) -> None:
        """Run worker ``index``; restart it with backoff each time it dies."""
        delay = _FIRST_DELAY
        first = True
        while True:
            process = self._context.Process(
                target=_worker_main, args=(self._config, sockets), name=f"trio-chat worker {index}"
            )
            process.start()
            worker = _Worker(index, process, trio.current_time())
            self._workers[index] = worker
            log.info("worker %d started (pid %d)", index, process.pid)
            await trio.lowlevel.wait_readable(process.sentinel)
            process.join()
            del self._workers[index]
            uptime = trio.current_time() - worker.started_at
            how = describe_exit(process.exitcode)
            log.error("worker %d (pid %d) %s after %.1f s", index, process.pid, how, uptime)
            if first and process.exitcode == START_FAILED:
                self._stop(START_FAILED, f"worker {index} could not start: stopping")
                return
            now = trio.current_time()
            self._deaths.append(now)
            while self._deaths[0] < now - _CRASH_WINDOW:
                self._deaths.popleft()
            if len(self._deaths) > _CRASH_LIMIT:
                deaths = len(self._deaths)
                self._stop(1, f"{deaths} worker deaths within {_CRASH_WINDOW:.0f} s: stopping")
                return
            if uptime >= _STABLE:
                delay = _FIRST_DELAY
            log.warning("restarting worker %d in %.1f s", index, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)
            first = False

    def _stop(self, status: int, reason: str) -> None:
        log.critical(reason)
        print(f"trio-chat: {reason}", file=sys.stderr)
        self._status = status
        self._give_up.set()

    async def _stop_workers(self) -> None:
        """SIGTERM every worker, wait for them (bounded), then kill what is left."""
        running = list(self._workers.values())
        for worker in running:
            worker.process.terminate()
        with trio.move_on_after(_STOP_WAIT):
            while running:
                await trio.lowlevel.wait_readable(running[0].process.sentinel)
                if not _stopped_cleanly(running.pop(0)):
                    self._status = self._status or 1
        for worker in running:
            log.error(
                "worker %d (pid %d) still running: killing it", worker.index, worker.process.pid
            )
            worker.process.kill()
            worker.process.join()
            self._status = self._status or 1
        log.info("all workers stopped")


def _stopped_cleanly(worker: _Worker) -> bool:
    worker.process.join()
    # Our own SIGTERM kills a worker still starting: it has no handler yet.
    if worker.process.exitcode in (0, -signal.SIGTERM):
        return True
    log.error("worker %d stopped badly: %s", worker.index, describe_exit(worker.process.exitcode))
    return False
