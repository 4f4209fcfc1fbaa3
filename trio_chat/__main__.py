"""``python -m trio_chat`` is the ``trio-chat`` command."""

from __future__ import annotations

import sys

from .app._cli import main

sys.exit(main())
