"""The terminal client's screen on a terminal: a prompt that incoming lines never break.

Why prompt_toolkit, in a thread: it is the well-kept line editor for Python (editing keys,
history, wide characters, long lines that wrap, terminal resizes), and its
``patch_stdout`` prints whatever the program writes *above* the prompt, then redraws the
prompt with the partial input. It runs on asyncio, not trio, so its prompt runs in a worker
thread (``trio.to_thread``) with an asyncio loop of its own, and hands each line to trio
through a memory channel. A hand-made raw-mode editor would have to redo all of that.

Threads: the prompt thread owns the terminal; trio writes through ``sys.stdout``, which
``patch_stdout`` replaces with a thread-safe proxy; the status line is a string read by the
prompt's bottom toolbar at each redraw, and ``Application.invalidate`` (thread-safe) asks
for one. Keys typed reach trio with ``TrioToken.run_sync_soon``, which never blocks the
prompt thread.

Exits: Ctrl-D on an empty line is end of input (the client sends what is queued, then
exits 0). Ctrl-C is the prompt's ``KeyboardInterrupt``, raised in the prompt thread, where
it is caught: ``on_interrupt`` runs in trio (the client stops at once, exit 130 like a shell
after SIGINT), and the terminal is restored before the process exits, with no traceback.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Final

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText

if TYPE_CHECKING:
    from collections.abc import Callable

    from prompt_toolkit.application import Application
    from prompt_toolkit.buffer import Buffer

#: How long the end of the run waits for the prompt thread to give the terminal back.
PROMPT_STOP_TIMEOUT: Final = 2.0


class TerminalScreen:
    """A prompt at the bottom of the terminal, with a status line under it.

    Args:
        prompt: Returns the prompt's text (read at each redraw, from the prompt thread).
        on_typing: Called in trio each time the user changes the line being typed.
        on_interrupt: Called in trio after Ctrl-C.
    """

    def __init__(
        self,
        prompt: Callable[[], str],
        *,
        on_typing: Callable[[str], None],
        on_interrupt: Callable[[], None],
    ) -> None:
        self._prompt = prompt
        self._on_typing = on_typing
        self._on_interrupt = on_interrupt
        self._status = ""
        self._stopping = False
        self._stopped = threading.Event()
        self.interrupted = False
        # erase_when_done: a line entered leaves the prompt; the server's copy of the
        # message (or the command's answer) is what stays on the screen, once.
        self._session: PromptSession[str] = PromptSession(
            bottom_toolbar=self._toolbar, erase_when_done=True
        )

    def set_status(self, text: str) -> None:
        """Show ``text`` on the status line (from trio: thread-safe)."""
        if text != self._status:
            self._status = text
            self._session.app.invalidate()

    def _toolbar(self) -> FormattedText:
        return FormattedText([("", self._status)])

    async def read_lines(self, send: trio.MemorySendChannel[str]) -> None:
        """Prompt for lines and feed them into ``send``; close it at end of input.

        Cancellation: ends the prompt (the terminal is restored) before returning.
        """
        token = trio.lowlevel.current_trio_token()

        def changed(buffer: Buffer) -> None:
            # A key pressed as the run ends has no one to tell.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._on_typing, buffer.text)

        self._session.default_buffer.on_text_changed += changed
        async with send:
            try:
                await trio.to_thread.run_sync(self._prompt_loop, send, abandon_on_cancel=True)
            finally:
                self._stop_prompt()
                with trio.move_on_after(PROMPT_STOP_TIMEOUT, shield=True):
                    await trio.to_thread.run_sync(self._stopped.wait, abandon_on_cancel=True)

    def _prompt_loop(self, send: trio.MemorySendChannel[str]) -> None:
        """The prompt thread: one ``prompt()`` per line until end of input or Ctrl-C."""
        try:
            while not self._stopping:
                try:
                    line = self._session.prompt(self._prompt)
                except EOFError:
                    return
                except KeyboardInterrupt:
                    self.interrupted = True
                    trio.from_thread.run_sync(self._on_interrupt)
                    return
                trio.from_thread.run(send.send, line)
        # A worker thread, not a trio task: the Cancelled is `send`'s, whose caller gave up
        # on this thread (abandon_on_cancel); raised here, no one would receive it.
        except (trio.Cancelled, trio.RunFinishedError, trio.BrokenResourceError):  # noqa: ASYNC103
            return  # noqa: ASYNC104 (trio stopped reading: the client is quitting)
        finally:
            self._stopped.set()

    def _stop_prompt(self) -> None:
        """Ask the prompt thread to end (from trio); its prompt ends as after Ctrl-D."""
        self._stopping = True
        app = self._session.app
        if app.is_running and app.loop is not None:
            app.loop.call_soon_threadsafe(_exit_app, app)


def _exit_app(app: Application[str]) -> None:
    # Runs in the prompt's loop; the prompt may have ended since it was asked.
    if app.is_running and app.future is not None and not app.future.done():
        app.exit(exception=EOFError)
