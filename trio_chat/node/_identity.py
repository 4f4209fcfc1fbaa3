"""A node's stable identity on its host: ``<host id>-<slot>``.

The host id is made once and kept in the data directory. Each process claims the lowest
free worker slot by locking ``slot-N.lock``; the lock dies with the process, so a
restarted worker takes its slot (and node id) back as a newer incarnation.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

_MAX_SLOTS: Final = 256


class NodeIdentity:
    """This process's node id and incarnation, holding its slot lock until `release`."""

    def __init__(self, node_id: str, incarnation: int, lock_fd: int) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self._lock_fd = lock_fd

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def create_once(path: Path, text: str, mode: int) -> str:
    """Create ``path`` holding ``text`` unless it exists; return what it holds.

    The file is written aside and linked into place, so processes starting together
    agree on one content and none reads a half-written file.
    """
    if not path.exists():
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def claim_identity(data_dir: Path) -> NodeIdentity:
    """Claim a free worker slot in ``data_dir`` and return the identity that goes with it.

    Raises:
      OSError: the data directory cannot be written, or every slot is taken.
    """
    folder = data_dir / "node"
    folder.mkdir(parents=True, exist_ok=True)
    host_id = create_once(folder / "host-id", secrets.token_hex(3), 0o644)
    for slot in range(_MAX_SLOTS):
        lock_fd = os.open(folder / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            continue
        return NodeIdentity(f"{host_id}-{slot}", time.time_ns() // 1_000_000, lock_fd)
    raise OSError(f"all {_MAX_SLOTS} worker slots in {folder} are taken")
