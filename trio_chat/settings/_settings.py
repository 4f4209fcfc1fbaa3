"""Settings: each declared once, read at start from ``TRIO_CHAT_*`` environment variables.

Theory of operation. The `Settings` struct *is* the declaration. Each field is one
setting: its name (the variable is ``TRIO_CHAT_`` + the name in capitals, the flag of
``trio-chat serve`` is ``--`` + the name with dashes), its type, its bounds as
``msgspec.Meta`` constraints (``ge``/``gt``/``le``, a ``Literal`` for choices), its
default, and a `_doc` Meta with the help text, the unit, what unset means when the default
is worked out at run time, and the `Kind` (`trio_chat.settings._kinds`): how a value is
written in the environment (a size like ``16K``, ``HOST:PORT`` or ``off``, a comma list,
a path, a secret...). `SETTINGS` reads those declarations back through
``msgspec.inspect`` (each as a `Setting`, trio_chat.settings._setting), and everything
else is derived from it:

- `Settings.from_env`: each variable goes through its kind's parser (a string to plain
  data), then ``msgspec.convert`` checks the type and the bounds. Every failure is one
  `ConfigError` naming the variable, the value and the rule, the rule itself written from
  the declaration (``must be a whole number from 0 to 255``).
- The flags of ``trio-chat serve`` (`trio_chat.app._cli`), with the help, rule and default.
- The README's settings table (`settings_table`; ``trio-chat settings`` prints it).
  tests/test_config.py fails when the README's table differs: the README is read on
  GitHub as it is, with no build step to regenerate it, and the failing test shows a
  branch that adds a setting the exact rows to paste.

Why a msgspec ``Struct`` rather than a table of our own: mypy sees every field with its
type, ``Settings(...)`` builds one in tests, and ``msgspec.convert`` checks the very
bounds the documentation shows, so the checks cannot drift from it.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from .._errors import ConfigError
from ._host_checks import INTERFACE
from ._kinds import (
    BIND,
    CHOICE,
    GLOBS,
    GROUP,
    HOSTS,
    KIB,
    MIB,
    NETWORKS,
    ORIGINS,
    PATH,
    PLAIN,
    REDIS_URL,
    SECRET,
    SIZE,
    Kind,
    url,
)
from ._setting import Setting, rule

if TYPE_CHECKING:
    from collections.abc import Mapping

SECONDS: Final = 1.0

ClusterMode = Literal["off", "host", "lan", "redis"]
StoreKind = Literal["sqlite", "memory"]
AuthMode = Literal["open", "jwt"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]


def _doc(text: str, *, kind: Kind = PLAIN, unit: str = "", unset: str = "") -> Meta:
    """A setting's documentation: help text, how it is written, its unit, unset meaning."""
    return Meta(description=text, extra={"kind": kind, "unit": unit, "unset": unset})


Port = Annotated[int, Meta(ge=0, le=65535)]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything an operator can set. Defaults are what ``make run`` uses."""

    data_dir: Annotated[
        Path, _doc("history (`history.sqlite3`), node identity, host cluster key", kind=PATH)
    ] = Path("data")
    store: Annotated[
        StoreKind,
        _doc("`memory` keeps history in the process only (benchmarks)", kind=CHOICE),
    ] = "sqlite"
    rate_limit: Annotated[
        float,
        Meta(ge=0),
        _doc("frames a connection may send per second (`0`: no limit)", unit="per second"),
    ] = 10.0
    rate_burst: Annotated[int, Meta(ge=1), _doc("burst of the per-connection rate limit")] = 20
    rate_strikes: Annotated[
        int, Meta(ge=1), _doc("rate-limited frames a connection may send before close 1008")
    ] = 20
    max_text: Annotated[
        int, Meta(ge=1), _doc("longest message a client may send", unit="characters")
    ] = 4000
    max_frame: Annotated[
        int,
        Meta(ge=KIB),
        _doc("largest incoming WebSocket message (more: close 1009)", kind=SIZE, unit="bytes"),
    ] = 16 * KIB
    max_rooms: Annotated[int, Meta(ge=1), _doc("rooms one connection may be in")] = 50
    history_on_join: Annotated[
        int, Meta(ge=0), _doc("messages replayed on `join`", unit="messages")
    ] = 50
    presence_names_max: Annotated[
        int,
        Meta(ge=2),
        _doc("most members a room lists by name; bigger ones get head counts", unit="members"),
    ] = 200
    resume_max: Annotated[
        int,
        Meta(ge=1),
        _doc("most messages a `join` with `since` replays; beyond, `reset`", unit="messages"),
    ] = 1000
    ws_bind: Annotated[
        tuple[str, Port] | None,
        _doc("the chat socket; `off` disables it (the page then uses `/ws`)", kind=BIND),
    ] = ("127.0.0.1", 8001)
    ws_public_url: Annotated[
        str | None,
        _doc(
            "the chat socket URL given to the page, behind a proxy",
            kind=url("ws", "wss"),
            unset="from the page's host",
        ),
    ] = None
    ws_certfile: Annotated[
        Path | None,
        _doc(
            "the chat socket's TLS certificate chain (PEM): it then serves `wss://`."
            " `trio-chat serve --certfile` sets it",
            kind=PATH,
            unset="plain `ws://`",
        ),
    ] = None
    ws_keyfile: Annotated[
        Path | None,
        _doc(
            "the private key of `TRIO_CHAT_WS_CERTFILE` (PEM; unset: in the certificate"
            " file). `trio-chat serve --keyfile` sets it",
            kind=PATH,
            unset="none",
        ),
    ] = None
    max_connections: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        _doc(
            "clients at once over both WebSockets; more get HTTP 503. Unset: `(nofile - 256)"
            " * 0.9`, `nofile` being the soft `RLIMIT_NOFILE` after it is raised to the hard"
            " one at start (docs/architecture.md)",
            unset="from `RLIMIT_NOFILE`",
        ),
    ] = None
    max_connections_per_ip: Annotated[
        int,
        Meta(ge=1),
        _doc(
            "clients at once from one client address (behind a proxy: as"
            " `TRIO_CHAT_TRUSTED_PROXIES` says); more get HTTP 503"
        ),
    ] = 256
    trusted_proxies: Annotated[
        frozenset[str],
        _doc(
            "proxies whose `X-Forwarded-For`/`-Proto` and `Forwarded` headers give the"
            " client's address and scheme on both sockets (docs/security.md)",
            kind=NETWORKS,
            unset="none: the TCP peer is the client",
        ),
    ] = frozenset()
    backlog: Annotated[
        int,
        Meta(ge=KIB),
        _doc(
            "unsent broadcast bytes per client before close 4008 (replies it asked for do"
            " not count)",
            kind=SIZE,
            unit="bytes",
        ),
    ] = 1 * MIB
    allowed_origins: Annotated[
        frozenset[str],
        _doc("origins allowed besides the page's own", kind=ORIGINS, unset="none"),
    ] = frozenset()
    allowed_hosts: Annotated[
        frozenset[str] | None,
        _doc(
            "`Host` names answered on both sockets (`.example.com`: the domain and its"
            " subdomains; `*`: any); others get 400. Set it in production: it stops"
            " DNS-rebinding pages (trio_chat/_hosts.py)",
            kind=HOSTS,
            unset="loopback names when bound to loopback, else `*`",
        ),
    ] = None
    keepalive_interval: Annotated[
        float,
        Meta(gt=0),
        _doc("time between pings; a client silent since the last is cut", unit="seconds"),
    ] = 20 * SECONDS
    shutdown_grace: Annotated[
        float,
        Meta(ge=0),
        _doc("time clients get to close on shutdown before they are cut", unit="seconds"),
    ] = 3 * SECONDS
    cluster: Annotated[
        ClusterMode,
        _doc(
            "`off`; `host`: the workers of this host (loopback, TTL 0); `lan`: hosts on"
            " a LAN (needs a secret and an interface); `redis`: every node through one"
            " Redis (`TRIO_CHAT_REDIS_URL`)",
            kind=CHOICE,
        ),
    ] = "host"
    cluster_group: Annotated[str, _doc("multicast group of the cluster", kind=GROUP)] = (
        "239.255.77.77"
    )
    cluster_port: Annotated[
        Annotated[int, Meta(ge=1, le=65535)] | None,
        _doc(
            "UDP port of the cluster's multicast group. Unset: one of 20000-32767 derived"
            " from the cluster key, so deployments with their own keys (data directories)"
            " never share one; `trio-chat cluster` shows it",
            unset="from the cluster key",
        ),
    ] = None
    cluster_interface: Annotated[
        str,
        _doc(
            "this host's address on the interface to multicast on (LAN mode: on the LAN)",
            kind=INTERFACE,
        ),
    ] = "127.0.0.1"
    cluster_ttl: Annotated[
        int,
        Meta(ge=0, le=255),
        _doc("multicast TTL: `0` keeps datagrams on this host; LAN mode's default is `1`"),
    ] = 0
    cluster_secret: Annotated[
        Annotated[bytes, Meta(min_length=16)] | None,
        _doc(
            "the cluster key (LAN mode needs it or a key file). As a flag it shows in"
            " `ps`: prefer the variable or `--cluster-key-file`",
            kind=SECRET,
            unset="host mode: made in the data dir",
        ),
    ] = None
    cluster_key_file: Annotated[
        Path | None,
        _doc("a file holding the cluster key", kind=PATH, unset="none"),
    ] = None
    redis_url: Annotated[
        str | None,
        _doc(
            "the Redis of the `redis` cluster, e.g. `redis://:PASSWORD@10.0.0.5:6379/0`"
            " (`rediss://` for TLS, `?ssl_ca_certs=FILE` for its CA); never logged with its"
            " password. As a flag it shows in `ps`: prefer the variable",
            kind=REDIS_URL,
            unset="none",
        ),
    ] = None
    redis_stream_max: Annotated[
        int,
        Meta(ge=1),
        _doc("entries (write batches) the Redis stream keeps (`MAXLEN ~`); a node past them heals"),
    ] = 1_000_000
    http_url: Annotated[
        str | None,
        _doc(
            "this node's HTTP address as peers reach it (healing gaps from history)",
            kind=url("http", "https"),
            unset="set by `trio-chat serve` from `--bind`",
        ),
    ] = None
    api_key: Annotated[
        Annotated[bytes, Meta(min_length=16)] | None,
        _doc(
            "the server API's key (`Authorization: Bearer <key>`, docs/auth.md), for the"
            " app's backend only. As a flag it shows in `ps`: prefer the variable",
            kind=SECRET,
            unset="the server API is off (404)",
        ),
    ] = None

    auth: Annotated[
        AuthMode,
        _doc(
            "`open`: clients pick nicknames, every room is public; `jwt`: clients present"
            " a token signed by the app's backend (docs/auth.md)",
            kind=CHOICE,
        ),
    ] = "open"
    jwt_key: Annotated[
        Annotated[bytes, Meta(min_length=32)] | None,
        _doc(
            "the HS256 secret tokens are signed with (jwt mode needs it or a public key)",
            kind=SECRET,
            unset="none",
        ),
    ] = None
    jwt_public_key: Annotated[
        Path | None,
        _doc(
            "a PEM public key file: RS256 (RSA), ES256/ES384 (EC) or EdDSA (Ed25519) tokens",
            kind=PATH,
            unset="none",
        ),
    ] = None
    jwt_audience: Annotated[
        str | None, _doc("the `aud` tokens must carry", unset="not checked")
    ] = None
    jwt_issuer: Annotated[str | None, _doc("the `iss` tokens must carry", unset="not checked")] = (
        None
    )
    public_rooms: Annotated[
        frozenset[str] | None,
        _doc(
            "rooms anyone connected may join; others need a pattern of the token's `rooms`",
            kind=GLOBS,
            unset="`*` in open mode, none in jwt mode",
        ),
    ] = None
    token_url: Annotated[
        str | None,
        _doc(
            'the app\'s endpoint that returns `{"token": ...}` for its logged-in user; the'
            " page fetches it with credentials (jwt mode)",
            kind=url("http", "https"),
            unset="the page reads `#token=` from its URL",
        ),
    ] = None

    log_level: Annotated[
        LogLevel,
        _doc("the least severe log lines written (hypercorn's too)", kind=CHOICE),
    ] = "info"
    log_format: Annotated[
        LogFormat,
        _doc(
            "`text`, or `json`: one object a line (`time`, `level`, `logger`, `node`,"
            " `message` and the line's own fields)",
            kind=CHOICE,
        ),
    ] = "text"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``TRIO_CHAT_*`` variables; unset or empty ones keep their default.

        Raises:
          ConfigError: a value is malformed or out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.var, "").strip()
            if raw:
                values[setting.name] = setting.parse(raw)
        if values.get("cluster") == "lan":
            # LAN mode reaches the segment unless told otherwise.
            values.setdefault("cluster_ttl", 1)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Check the rules that tie several settings together.

        Raises:
          ConfigError: a rule is broken; the message names the variables.
        """
        if self.cluster == "lan" and self.cluster_secret is None and self.cluster_key_file is None:
            raise ConfigError(
                "TRIO_CHAT_CLUSTER=lan needs TRIO_CHAT_CLUSTER_SECRET or TRIO_CHAT_CLUSTER_KEY_FILE:"
                " a LAN cluster without a key would accept anyone's packets"
            )
        if self.cluster == "lan" and self.cluster_ttl < 1:
            raise ConfigError("TRIO_CHAT_CLUSTER_TTL must be at least 1 in LAN mode")
        if self.cluster == "lan" and self.cluster_interface.startswith("127."):
            raise ConfigError(
                "TRIO_CHAT_CLUSTER=lan needs TRIO_CHAT_CLUSTER_INTERFACE: the address of"
                " this host on the LAN (multicast leaves through that interface)"
            )
        if self.ws_keyfile is not None and self.ws_certfile is None:
            raise ConfigError("TRIO_CHAT_WS_KEYFILE is set without TRIO_CHAT_WS_CERTFILE")
        if self.cluster == "redis" and self.redis_url is None:
            raise ConfigError("TRIO_CHAT_CLUSTER=redis needs TRIO_CHAT_REDIS_URL")
        if (
            self.cluster == "redis"
            and self.cluster_secret is None
            and self.cluster_key_file is None
        ):
            raise ConfigError(
                "TRIO_CHAT_CLUSTER=redis needs TRIO_CHAT_CLUSTER_SECRET or"
                " TRIO_CHAT_CLUSTER_KEY_FILE: peers on other hosts sign their history"
                " requests with it"
            )
        if self.auth == "jwt" and self.jwt_key is None and self.jwt_public_key is None:
            raise ConfigError(
                "TRIO_CHAT_AUTH=jwt needs TRIO_CHAT_JWT_KEY or TRIO_CHAT_JWT_PUBLIC_KEY:"
                " without a key no token can be checked"
            )
        if self.rate_limit > 0 and self.rate_burst < 1:
            raise ConfigError("TRIO_CHAT_RATE_BURST must be at least 1 when rate limiting is on")

    @property
    def public_room_patterns(self) -> frozenset[str]:
        """The globs of rooms anyone connected may join (see `public_rooms`)."""
        if self.public_rooms is not None:
            return self.public_rooms
        return frozenset({"*"}) if self.auth == "open" else frozenset()

    def chat_socket_url(self, page_host: str, port: int | None) -> str | None:
        """The chat socket URL for a page served from ``page_host`` (host[:port]).

        ``port`` is the port the chat socket is bound to (None when it is off).
        """
        if self.ws_public_url is not None:
            return self.ws_public_url
        if port is None:
            return None
        host = page_host.rsplit(":", 1)[0] if not page_host.endswith("]") else page_host
        scheme = "ws" if self.ws_certfile is None else "wss"
        return f"{scheme}://{host}:{port}/ws"

    def chat_socket_tls(self) -> ssl.SSLContext | None:
        """The chat socket's TLS context, or None when it speaks plain ``ws://``.

        Raises:
          ConfigError: the certificate or key file is missing, unreadable, not PEM, or
            the two do not match; the message names the variable.
        """
        if self.ws_certfile is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # A client-started renegotiation would make a read need a write (and a write a
        # read) on the non-blocking socket; nothing needs it.
        context.options |= ssl.OP_NO_RENEGOTIATION
        for var, path in (
            ("TRIO_CHAT_WS_CERTFILE", self.ws_certfile),
            ("TRIO_CHAT_WS_KEYFILE", self.ws_keyfile),
        ):
            if path is not None and not path.is_file():
                raise ConfigError(f"{var}={str(path)!r}: no such file")
        try:
            context.load_cert_chain(self.ws_certfile, self.ws_keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"TRIO_CHAT_WS_CERTFILE={str(self.ws_certfile)!r} and TRIO_CHAT_WS_KEYFILE="
                f"{str(self.ws_keyfile or self.ws_certfile)!r}: not a certificate and its"
                f" matching key ({exc})"
            ) from None
        return context


def _declared() -> tuple[Setting, ...]:
    settings = []
    for field in msgspec.structs.fields(Settings):
        info = msgspec.inspect.type_info(field.type)
        if not isinstance(info, msgspec.inspect.Metadata) or not info.extra:
            raise TypeError(f"Settings.{field.name} is declared without _doc(...)")
        kind: Kind = info.extra["kind"]
        settings.append(
            Setting(
                name=field.name,
                type=field.type,
                default=field.default,
                help=(info.extra_json_schema or {})["description"],
                kind=kind,
                unit=info.extra["unit"],
                unset=info.extra["unset"],
                rule=rule(kind, info),
            )
        )
    return tuple(settings)


#: Every setting, in declaration order.
SETTINGS: Final = _declared()


def settings_table() -> str:
    """The README's settings table (Markdown), one row per setting."""
    rows = [
        "| variable | flag | default | takes | meaning |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| `{s.var}` | `{s.flag}` | {s.default_text()} | {s.rule} | {s.help} |" for s in SETTINGS
    ]
    return "\n".join(rows) + "\n"
