"""The error hierarchy: each class says who is at fault."""

from __future__ import annotations


class ChatError(Exception):
    """Base of every error trio-chat raises on purpose."""


class ConfigError(ChatError):
    """A setting is invalid. The operator is at fault; the message says which and why."""


class ProtocolError(ChatError):
    """A client sent something the protocol does not allow. The client is at fault.

    ``code`` is the stable error code sent in the ``error`` frame (see docs/protocol.md);
    ``close_code``, when set, means the connection must be closed with it.
    """

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


class BadPacket(ChatError):
    """A cluster datagram was malformed, forged, replayed or from another cluster.

    The sender (or someone on the network) is at fault: the packet is dropped and counted,
    never raised past the link's receive loop.
    """


class StoreError(ChatError):
    """The history store failed: disk full, an I/O error, a lock held too long, a corrupt
    page. Nobody a client could blame: the one request is refused (``store_unavailable``)
    and may be retried; the node stays up and retries its writes.
    """
