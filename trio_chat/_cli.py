"""The ``trio-chat`` command: ``serve``, ``client`` and ``cluster``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Final

import trio
from hypercorn.config import Config

from ._config import Settings
from ._errors import ConfigError

# Flags of ``serve`` that set a TRIO_CHAT_* variable (flag, variable, help).
_SETTING_FLAGS: Final = [
    (
        "--ws-bind",
        "TRIO_CHAT_WS_BIND",
        "chat socket address HOST:PORT, or off (default 127.0.0.1:8001)",
    ),
    ("--ws-public-url", "TRIO_CHAT_WS_PUBLIC_URL", "chat socket URL the page uses, behind a proxy"),
    ("--data-dir", "TRIO_CHAT_DATA_DIR", "history, node identity and cluster key (default ./data)"),
    ("--store", "TRIO_CHAT_STORE", "sqlite (default) or memory"),
    ("--rate-limit", "TRIO_CHAT_RATE_LIMIT", "frames per second per connection; 0 turns it off"),
    ("--rate-burst", "TRIO_CHAT_RATE_BURST", "burst of the per-connection rate limit"),
    ("--max-text", "TRIO_CHAT_MAX_TEXT", "longest message, in characters (default 4000)"),
    (
        "--backlog",
        "TRIO_CHAT_BACKLOG",
        "unsent broadcast bytes per client before it is closed as slow (default 1M)",
    ),
    (
        "--max-connections",
        "TRIO_CHAT_MAX_CONNECTIONS",
        "clients at once, both WebSockets (default: from the descriptor limit)",
    ),
    (
        "--max-connections-per-ip",
        "TRIO_CHAT_MAX_CONNECTIONS_PER_IP",
        "clients at once from one address (default 256)",
    ),
    (
        "--allowed-origins",
        "TRIO_CHAT_ALLOWED_ORIGINS",
        "comma-separated origins allowed besides the page's",
    ),
    (
        "--allowed-hosts",
        "TRIO_CHAT_ALLOWED_HOSTS",
        "comma-separated Host names served (.example.com: and subdomains; *: any)",
    ),
    ("--cluster", "TRIO_CHAT_CLUSTER", "off, host (default: the workers of this host) or lan"),
    ("--cluster-group", "TRIO_CHAT_CLUSTER_GROUP", "multicast group (default 239.255.77.77)"),
    ("--cluster-port", "TRIO_CHAT_CLUSTER_PORT", "multicast port (default 47477)"),
    (
        "--cluster-interface",
        "TRIO_CHAT_CLUSTER_INTERFACE",
        "address of the interface to multicast on",
    ),
    ("--cluster-ttl", "TRIO_CHAT_CLUSTER_TTL", "multicast TTL: 0 host only, 1 for a LAN"),
    ("--cluster-key-file", "TRIO_CHAT_CLUSTER_KEY_FILE", "file holding the cluster secret"),
    ("--http-url", "TRIO_CHAT_HTTP_URL", "this node's HTTP address as peers reach it"),
]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trio-chat`` command."""
    from . import _client

    parser = argparse.ArgumentParser(
        prog="trio-chat", description="A real-time chat server on Trio."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (hypercorn with trio workers)")
    serve.add_argument(
        "--bind",
        default="127.0.0.1:8000",
        help="page and HTTP API address (default 127.0.0.1:8000)",
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes, restarted if they die (default 1)"
    )
    for flag, _, help_text in _SETTING_FLAGS:
        serve.add_argument(flag, help=help_text)

    client = commands.add_parser("client", help="chat from the terminal")
    _client.add_arguments(client)

    cluster = commands.add_parser(
        "cluster", help="show the peers this host sees and test multicast"
    )
    cluster.add_argument(
        "--seconds", type=float, default=5.0, help="how long to listen (default 5)"
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        return _serve(args)
    if args.command == "client":
        return _client.run(args)
    return _cluster_check(args)


def _serve(args: argparse.Namespace) -> int:
    from ._supervisor import Supervisor, run_node

    if args.workers < 1:
        print(f"trio-chat: --workers must be at least 1, not {args.workers}", file=sys.stderr)
        return 2
    for flag, var, _ in _SETTING_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            os.environ[var] = value
    os.environ.setdefault("TRIO_CHAT_HTTP_URL", f"http://{args.bind}")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"trio-chat: {exc}", file=sys.stderr)
        return 2
    config = Config()
    config.bind = [args.bind]
    config.accesslog = None
    config.errorlog = "-"
    for line in first_lines(args.bind, settings):
        print(f"trio-chat: {line}", flush=True)
    if args.workers > 1:
        return Supervisor(config, args.workers).run()
    return run_node(config, None, (signal.SIGTERM, signal.SIGINT))


def first_lines(bind: str, settings: Settings) -> list[str]:
    """What ``serve`` prints first: what to open, where the data lives, how to stop it."""
    if settings.ws_bind is None:
        chat = f"http://{bind}"  # the page's port serves /ws too
    else:
        host, port = settings.ws_bind
        chat = f"ws://{f'[{host}]' if ':' in host else host}:{port}/ws"
    data = f"data (history, node identity, cluster key) in {settings.data_dir.resolve()}"
    if settings.store == "memory":
        data += "; history is kept in memory only"
    return [
        f"open http://{bind}/ in a browser (in a terminal: trio-chat client {chat})",
        data,
        "stop with Ctrl-C",
    ]


def _cluster_check(args: argparse.Namespace) -> int:
    from ._cluster import link_config
    from ._identity import claim_identity
    from ._link_diag import run_cluster_check

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"trio-chat: {exc}", file=sys.stderr)
        return 2
    if settings.cluster == "off":
        print("trio-chat: TRIO_CHAT_CLUSTER=off: this node joins no cluster", file=sys.stderr)
        return 2
    identity = claim_identity(settings.data_dir)
    try:
        config = link_config(settings, identity, http_url=settings.http_url or "")
        return trio.run(run_cluster_check, config, args.seconds, sys.stdout)
    finally:
        identity.release()
