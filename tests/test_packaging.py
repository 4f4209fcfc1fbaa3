"""The wheel: every package, and the page, get into it; an installed server serves the page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import httpx
import pytest

from _server_process import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_for_the_wheel() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "trio_chat").rglob("__init__.py")
    }
    assert listed == found | {"trio_chat.web"}


@pytest.mark.slow
def test_an_installed_wheel_serves_the_page(tmp_path: Path) -> None:
    # Built from a copy: a build writes build/ and *.egg-info next to its sources.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("trio_chat", "web"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    subprocess.run(build, check=True, timeout=240)
    (wheel,) = wheels.glob("trio_chat-*.whl")

    # A fresh venv with the wheel alone; its dependencies are this venv's (a path
    # entry, so no index is needed), and this venv's editable trio_chat stays out.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [*pip, "--python", str(python), "install", "--no-index", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, timeout=240)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = subprocess.run(
        [str(python), "-c", "import trio_chat; print(trio_chat.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(site), where

    port, ws_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRIO_CHAT_")}
    env |= {
        "TRIO_CHAT_DATA_DIR": str(tmp_path / "data"),
        "TRIO_CHAT_CLUSTER": "off",
        "TRIO_CHAT_WS_BIND": f"127.0.0.1:{ws_port}",
    }
    serve = [str(venv / "bin" / "trio-chat"), "serve", "--bind", f"127.0.0.1:{port}"]
    log_path = tmp_path / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(serve, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base, log_path, limit=30)
        page = httpx.get(base + "/")
        assert page.status_code == 200
        assert page.text == (ROOT / "web" / "index.html").read_text()
        for name in (p.name for p in (ROOT / "web").iterdir()):
            assert httpx.get(f"{base}/{name}").status_code == 200, name
    finally:
        proc.terminate()
        proc.wait(timeout=15)
