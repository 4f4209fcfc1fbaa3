"""Settings: each declared once, read at start from ``TRIO_CHAT_*`` environment variables.

Theory of operation. The `Settings` struct *is* the declaration. Each field is one
setting: its name (the variable is ``TRIO_CHAT_`` + the name in capitals, the flag of
``trio-chat serve`` is ``--`` + the name with dashes), its type, its bounds as
``msgspec.Meta`` constraints (``ge``/``gt``/``le``, a ``Literal`` for choices), its
default, and a `_doc` Meta with the help text, the unit, what unset means when the default
is worked out at run time, and the `Kind` (`trio_chat.settings._kinds`): how a value is
written in the environment (a size like ``16K``, ``HOST:PORT`` or ``off``, a comma list,
a path, a secret...). `SETTINGS` reads those declarations back through
``msgspec.inspect``, and everything else is derived from it:

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
from dataclasses import dataclass
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
    ORIGINS,
    PATH,
    PLAIN,
    SECRET,
    SIZE,
    Kind,
    url,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

SECONDS: Final = 1.0

ClusterMode = Literal["off", "host", "lan"]
StoreKind = Literal["sqlite", "memory"]
AuthMode = Literal["open", "jwt"]


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
            "clients at once from one peer address; more get HTTP 503 (behind a proxy that"
            " is the proxy's address: trusted-proxy support is not built yet)"
        ),
    ] = 256
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
            " a LAN (needs a secret and an interface)",
            kind=CHOICE,
        ),
    ] = "host"
    cluster_group: Annotated[str, _doc("multicast group of the cluster", kind=GROUP)] = (
        "239.255.77.77"
    )
    cluster_port: Annotated[
        int, Meta(ge=1, le=65535), _doc("UDP port of the cluster's multicast group")
    ] = 47477
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
    http_url: Annotated[
        str | None,
        _doc(
            "this node's HTTP address as peers reach it (healing gaps from history)",
            kind=url("http", "https"),
            unset="set by `trio-chat serve` from `--bind`",
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
        return f"ws://{host}:{port}/ws"


@dataclass(frozen=True, slots=True)
class Setting:
    """One declared setting, as `SETTINGS` reads it from `Settings`."""

    name: str
    #: The annotated type ``msgspec.convert`` checks a parsed value against.
    type: Any
    default: object
    help: str
    kind: Kind
    unit: str
    unset: str
    #: What values are taken, from the kind and the type's bounds ("must be " + rule).
    rule: str

    @property
    def var(self) -> str:
        return "TRIO_CHAT_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: str) -> object:
        """The value of this setting written as ``raw``.

        Raises:
          ConfigError: ``raw`` breaks the rule; the message names the variable and value.
        """
        try:
            data = self.kind.parse(raw)
        except ValueError as exc:
            raise self._refusal(raw, str(exc)) from None
        try:
            return msgspec.convert(data, self.type, strict=False, dec_hook=_dec_hook)
        except msgspec.ValidationError:
            raise self._refusal(raw, "") from None

    def render(self, value: object) -> str:
        """``value`` as written in the environment ("" for None: unset)."""
        return "" if value is None else self.kind.render(value)

    def default_text(self) -> str:
        """The default as the docs show it, Markdown: the value and its unit, or ``unset``."""
        rendered = "" if self.kind.secret else self.render(self.default)
        if not rendered:
            return self.unset
        return f"`{rendered}` {self.unit}".rstrip()

    def _refusal(self, raw: str, reason: str) -> ConfigError:
        shown = f"({len(raw)} characters, not shown)" if self.kind.secret else repr(raw)
        return ConfigError(f"{self.var}={shown}: {reason or 'must be ' + self.rule}")


def _dec_hook(type_: type, obj: object) -> object:
    if type_ is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError


def _rule(kind: Kind, info: msgspec.inspect.Type) -> str:
    """What values a setting takes, from its kind and its type's bounds."""
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        (info,) = (t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(map(str, info.values))
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        whole = isinstance(info, msgspec.inspect.IntType)
        what = kind.what or ("a whole number" if whole else "a number")
        show = kind.render
        if info.ge is not None and info.le is not None:
            return f"{what} from {show(info.ge)} to {show(info.le)}"
        if info.gt is not None or (whole and info.ge == 1):
            return f"{what} above {show(info.gt or 0)}"
        if info.ge == 0:
            return f"{what}, 0 or above"
        if info.ge is not None:
            return f"{what}, at least {show(info.ge)}"
        return what
    if isinstance(info, msgspec.inspect.BytesType) and info.min_length:
        return f"text of at least {info.min_length} characters"
    return kind.what or "text"


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
                rule=_rule(kind, info),
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
