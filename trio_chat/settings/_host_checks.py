"""The one setting checked against this host: `INTERFACE`, an address of one of its interfaces.

Kept out of `trio_chat.settings._kinds` so that module stays pure: this check binds a
socket, once, while the settings are read (the import-linter contract in pyproject.toml
names this module as the settings' one exception).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

from ._kinds import Kind


def _parse_interface(raw: str) -> str:
    """An IPv4 address this host has: the kernel lets a socket bind to no other."""
    try:
        address = ipaddress.IPv4Address(raw)
    except ValueError:
        raise ValueError from None
    if address.is_multicast:
        raise ValueError
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            raise ValueError(
                f"must be an address of one of this host's interfaces ({exc.strerror})"
            ) from None
    return str(address)


INTERFACE: Final = Kind(_parse_interface, str, "an IPv4 address of this host")
