"""The layout's own rules: no import cycle (TYPE_CHECKING included), no module over 500 lines.

tools/check_imports.py does the work (`make lint` runs it too); these tests run it on the
package, and on a small package made to break both rules, so a checker that stopped
seeing cycles or lengths would fail here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
CHECK = ROOT / "tools" / "check_imports.py"


def run_check(package: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), str(package)], capture_output=True, text=True, check=False
    )


def test_trio_chat_has_no_import_cycle_and_no_long_module() -> None:
    result = run_check(ROOT / "trio_chat")
    assert result.stdout.splitlines() == []
    assert result.returncode == 0


def test_check_finds_typing_only_cycles_and_long_modules(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("from .high import High\n")
    (package / "high.py").write_text("from .low.leaf import Leaf\nclass High: ...\n")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..high import High\n"
        "class Leaf: ...\n" + "\n" * 500
    )
    (package / "alone.py").write_text("import pkg.low.leaf\n")

    result = run_check(package)

    assert result.stdout.splitlines() == [
        "import cycle: pkg.high -> pkg.low.leaf -> pkg.high",
        "pkg/low/leaf.py: 504 lines (at most 500)",
    ]
    assert result.returncode == 1
