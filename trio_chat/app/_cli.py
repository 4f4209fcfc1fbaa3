"""The ``trio-chat`` command: ``serve``, ``client``, ``cluster``, ``settings`` and ``token``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Final

import trio
from hypercorn.config import Config

from .._errors import ConfigError
from ..settings._settings import SETTINGS, Settings, settings_table


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trio-chat`` command."""
    from ..client import _terminal

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        return _serve(args)
    if args.command == "client":
        return _terminal.run(args)
    if args.command == "settings":
        print(settings_table(), end="")
        return 0
    if args.command == "token":
        return _token(args)
    return _cluster_check(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``trio-chat`` command; ``serve`` has a flag for every setting."""
    from ..client import _terminal

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
    serve.add_argument(
        "--certfile",
        help="serve the page over https with this certificate chain (PEM); the chat socket"
        " then serves wss:// with it too, unless TRIO_CHAT_WS_CERTFILE says otherwise",
    )
    serve.add_argument(
        "--keyfile", help="the private key of --certfile (PEM; default: in the certificate file)"
    )
    for setting in SETTINGS:
        default = setting.default_text().replace("`", "")
        serve.add_argument(
            setting.flag,
            help=f"{setting.help.replace('`', '')}; {setting.rule}"
            f" (default: {default}; sets {setting.var})",
        )

    client = commands.add_parser("client", help="chat from the terminal")
    _terminal.add_arguments(client)

    cluster = commands.add_parser(
        "cluster", help="show the peers this host sees and test multicast"
    )
    cluster.add_argument(
        "--seconds", type=float, default=5.0, help="how long to listen (default 5)"
    )

    commands.add_parser("settings", help="print the settings table (Markdown, as in the README)")

    token = commands.add_parser(
        "token", help="print an HS256 token signed with TRIO_CHAT_JWT_KEY (development)"
    )
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--name", help="the display name (default: the user id)")
    token.add_argument("--rooms", default="", help="comma-separated room globs, e.g. 'team-*,dm-*'")
    token.add_argument("--admin", action="store_true", help="an admin token")
    token.add_argument(
        "--ttl", type=_ttl, default="1h", help="lifetime: 90s, 30m, 1h, 2d (default 1h)"
    )
    return parser


_TTL_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(raw: str) -> int:
    number, unit = raw[:-1], raw[-1:].lower()
    if unit not in _TTL_UNITS or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: a lifetime like 90s, 30m, 1h or 2d")
    return int(number) * _TTL_UNITS[unit]


def _token(args: argparse.Namespace) -> int:
    from ..server._auth import issue

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"trio-chat: {exc}", file=sys.stderr)
        return 2
    if settings.jwt_key is None:
        print("trio-chat: set TRIO_CHAT_JWT_KEY (the HS256 secret) to sign tokens", file=sys.stderr)
        return 2
    rooms = [r.strip() for r in args.rooms.split(",") if r.strip()]
    print(
        issue(
            settings.jwt_key, args.sub, name=args.name, rooms=rooms, admin=args.admin, ttl=args.ttl
        )
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..server._auth import Tokens
    from ._logs import configure_logging
    from ._supervisor import Supervisor, run_node

    if args.workers < 1:
        print(f"trio-chat: --workers must be at least 1, not {args.workers}", file=sys.stderr)
        return 2
    # The workers read the settings from the environment, as under plain hypercorn.
    for setting in SETTINGS:
        value = getattr(args, setting.name)
        if value is not None:
            os.environ[setting.var] = value
    scheme = "http"
    if args.certfile is not None:
        # Hypercorn's certificate is the chat socket's too: the page is https, so its
        # socket must be wss:// (a browser blocks ws:// from an https page).
        scheme = "https"
        if not os.environ.get("TRIO_CHAT_WS_CERTFILE"):
            os.environ["TRIO_CHAT_WS_CERTFILE"] = args.certfile
            os.environ.pop("TRIO_CHAT_WS_KEYFILE", None)
            if args.keyfile is not None:
                os.environ["TRIO_CHAT_WS_KEYFILE"] = args.keyfile
    elif args.keyfile is not None:
        print("trio-chat: --keyfile needs --certfile", file=sys.stderr)
        return 2
    os.environ.setdefault("TRIO_CHAT_HTTP_URL", f"{scheme}://{args.bind}")
    try:
        settings = Settings.from_env()
        # Read the certificate and the token key now: a bad one stops the command, not
        # each worker.
        settings.chat_socket_tls()
        if settings.auth == "jwt":
            Tokens(settings)
    except ConfigError as exc:
        print(f"trio-chat: {exc}", file=sys.stderr)
        return 2
    # Here, before the workers start: they inherit it (app/_logs.py).
    configure_logging(settings.log_level, settings.log_format)
    config = Config()
    config.bind = [args.bind]
    config.certfile = args.certfile
    config.keyfile = args.keyfile
    config.accesslog = None
    config.errorlog = "-"
    for line in first_lines(args.bind, settings, scheme):
        print(f"trio-chat: {line}", flush=True)
    if args.workers > 1:
        return Supervisor(config, args.workers).run()
    return run_node(config, None, (signal.SIGTERM, signal.SIGINT))


def first_lines(bind: str, settings: Settings, scheme: str = "http") -> list[str]:
    """What ``serve`` prints first: what to open, where the data lives, how to stop it.

    ``scheme`` is the page's (``https`` when hypercorn has a certificate).
    """
    if settings.ws_bind is None:
        chat = f"{scheme}://{bind}"  # the page's port serves /ws too
    else:
        host, port = settings.ws_bind
        ws = "wss" if settings.ws_certfile is not None else "ws"
        chat = f"{ws}://{f'[{host}]' if ':' in host else host}:{port}/ws"
    data = f"data (history, node identity, cluster key) in {settings.data_dir.resolve()}"
    if settings.store == "memory":
        data += "; history is kept in memory only"
    return [
        f"open {scheme}://{bind}/ in a browser (in a terminal: trio-chat client {chat})",
        data,
        "stop with Ctrl-C",
    ]


def _cluster_check(args: argparse.Namespace) -> int:
    """``trio-chat cluster``: it only reads, so it creates no data directory or key."""
    from ..link._diag import run_cluster_check
    from ..link._socket import new_incarnation
    from ..node._multicast import link_config
    from ..node._peer_http import cluster_secret

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"trio-chat: {exc}", file=sys.stderr)
        return 2
    if settings.cluster == "off":
        print("trio-chat: TRIO_CHAT_CLUSTER=off: this node joins no cluster", file=sys.stderr)
        return 2
    if settings.cluster == "redis" and settings.redis_url is not None:
        from ..node._redis_diag import run_redis_check

        return trio.run(run_redis_check, settings.redis_url, sys.stdout)
    try:
        secret = cluster_secret(settings, create=False)
        # The check joins as an observer with a node id of its own (run_cluster_check).
        config = link_config(settings, "check", new_incarnation(), secret=secret, http_url="")
    except ConfigError as exc:
        print(f"trio-chat: {exc}", file=sys.stderr)
        return 2
    # Host mode: the data directory's nodes are "<host id>-<slot>" (a LAN's hosts each
    # have a host id of their own).
    host_file = settings.data_dir / "node" / "host-id"
    own_host = settings.cluster == "host" and host_file.is_file()
    host_id = host_file.read_text().strip() if own_host else None
    return trio.run(run_cluster_check, config, args.seconds, sys.stdout, host_id)
