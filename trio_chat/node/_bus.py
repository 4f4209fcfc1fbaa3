"""The cluster bus: the seam between the node's cluster logic and the engine under it.

`Cluster` (payloads, presence, healing, catch-up) talks only to a `Bus`. The multicast
link is one engine (`_multicast.MulticastBus`); another (Redis Streams, DESIGN.md §6)
implements the same Protocol and leaves that logic alone.

What an engine promises:
- `Payload` events of one origin arrive in the order it sent them, each at most once;
- a loss it cannot repair is reported as a `Gap` of that origin (the node heals it from
  history: its store, then `Bus.fetch`);
- `PeerUp` when a peer (or a newer incarnation of it) is first heard, `PeerDown` when
  it is gone; a peer's presence dies with it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

if TYPE_CHECKING:
    import trio

    from ._store import Message

#: The largest payload `Bus.send` takes: the multicast link's bound, so that the node's
#: payloads fit every engine. Bigger contents are sent in parts (see `Snapshot`).
MAX_PAYLOAD: Final = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class PeerUp:
    """A peer was heard for the first time (or restarted)."""

    node: str


@dataclasses.dataclass(frozen=True, slots=True)
class PeerDown:
    """A peer is gone; ``reason`` is for the log."""

    node: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Payload:
    """One payload a peer sent, in order per origin, exactly once."""

    origin: str
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Gap:
    """Payloads of ``origin`` were lost for good; ``detail`` says which, for the log."""

    origin: str
    detail: str


BusEvent = PeerUp | PeerDown | Payload | Gap


class Bus(Protocol):
    """A cluster engine, as the node's cluster logic uses it."""

    @property
    def heal_secret(self) -> bytes:
        """The shared secret that signs requests for a node's history (``/api/cluster/messages``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> NoReturn:
        """Connect and run the engine until cancelled; started once it can `send`."""

    def send(self, payload: bytes) -> None:
        """Send ``payload`` (at most `MAX_PAYLOAD` bytes) to every peer.

        Never blocks; a loss shows as a `Gap` there.
        """

    async def receive(self) -> BusEvent:
        """The next event. Cancellation: a checkpoint; nothing is lost if cancelled."""

    def receive_nowait(self) -> BusEvent:
        """The next event if one is ready (what arrived together is handled together).

        Raises:
          trio.WouldBlock: none is.
        """

    async def fetch(self, origin: str, after: str, limit: int) -> list[Message]:
        """Messages ``origin`` accepted after id ``after`` (at most ``limit``), from a peer.

        An empty list when no peer could answer (logged here); the node tries again at
        the next gap or peer start.
        """

    def statistics(self) -> dict[str, int]:
        """The engine's counters, for ``/metrics``."""
