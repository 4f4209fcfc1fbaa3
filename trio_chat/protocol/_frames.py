"""WebSocket frames and HTTP error responses as bytes (pure: no I/O).

A broadcast is framed once by `encode_text_frame` and the same bytes go to every
recipient's socket.
"""

from __future__ import annotations

import http
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def encode_text_frame(payload: bytes) -> bytes:
    """Frame ``payload`` as one unmasked, final text frame (server to client)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def http_response(status: int, body: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """An HTTP/1.1 error response with a plain-text body, after which we close."""
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode(),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: " + str(len(data)).encode(),
        b"Connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + data
