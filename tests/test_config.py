"""Settings: declared once; every bad value stops the server with a message naming it.

The declaration (`trio_chat.settings._settings.Settings`) is the source of the defaults, the
``serve`` flags and the README table: these tests check that each of those agrees with
it, rather than repeating the default values.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Final

import pytest

from trio_chat import ConfigError, Settings
from trio_chat.app._cli import build_parser
from trio_chat.link._packet import DERIVED_PORTS, derived_port
from trio_chat.link._socket import LinkConfig
from trio_chat.node._multicast import link_config
from trio_chat.node._peer_http import cluster_secret
from trio_chat.settings._kinds import redact_url
from trio_chat.settings._settings import SETTINGS, settings_table

from conftest import make_settings

README: Final = Path(__file__).parent.parent / "README.md"


def this_hosts_lan_address() -> str:
    """An address of this host off loopback: the source of its default route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a UDP connect picks a route, sends nothing
        except OSError:
            pytest.skip("this host has no route off loopback")
        address: str = probe.getsockname()[0]
    return address


def test_defaults_are_the_declared_ones_and_parse_back_from_their_rendering() -> None:
    unset = Settings.from_env({})
    assert unset == Settings()
    for setting in SETTINGS:
        assert getattr(unset, setting.name) == setting.default, setting.name
        rendered = setting.render(setting.default)
        if rendered:
            written = Settings.from_env({setting.var: rendered})
            assert getattr(written, setting.name) == setting.default, (setting.var, rendered)
        else:
            assert setting.unset, f"{setting.var}: say what unset means"
        assert setting.help, setting.var


def test_every_setting_is_a_serve_flag_that_sets_its_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {setting.name: f"value-of-{setting.name}" for setting in SETTINGS}
    argv = ["serve"] + [arg for s in SETTINGS for arg in (s.flag, values[s.name])]
    args = build_parser().parse_args(argv)
    assert {s.name: getattr(args, s.name) for s in SETTINGS} == values
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for setting in SETTINGS:
        assert f"sets {setting.var})" in shown, setting.var


def test_readme_settings_table_is_the_declared_one() -> None:
    readme = README.read_text()
    start = readme.index("| variable |")
    table = readme[start : readme.index("\n\n", start) + 1]
    assert table == settings_table(), "paste `trio-chat settings` into README.md"
    assert table.count("\n") == len(SETTINGS) + 2


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "TRIO_CHAT_DATA_DIR": " /srv/chat ",
            "TRIO_CHAT_STORE": "MEMORY",
            "TRIO_CHAT_WS_BIND": "off",
            "TRIO_CHAT_RATE_LIMIT": "0",
            "TRIO_CHAT_KEEPALIVE_INTERVAL": "0.5",
            "TRIO_CHAT_MAX_FRAME": "64k",
            "TRIO_CHAT_BACKLOG": "2048",
            "TRIO_CHAT_MAX_CONNECTIONS": "5000",
            "TRIO_CHAT_MAX_CONNECTIONS_PER_IP": "8",
            "TRIO_CHAT_ALLOWED_ORIGINS": "https://a.example, https://b.example/",
            "TRIO_CHAT_ALLOWED_HOSTS": "Chat.Example.com., [::1], .example.org",
            "TRIO_CHAT_CLUSTER_GROUP": "239.1.2.3",
            "TRIO_CHAT_CLUSTER_KEY_FILE": "/etc/chat.key",
            "TRIO_CHAT_CLUSTER_SECRET": "a secret of enough length",
            "TRIO_CHAT_HTTP_URL": "https://chat.example.com:8000/",
        }
    )
    assert settings.data_dir == Path("/srv/chat")
    assert settings.store == "memory"
    assert settings.ws_bind is None
    assert (settings.rate_limit, settings.keepalive_interval) == (0, 0.5)
    assert (settings.max_frame, settings.backlog) == (64 * 1024, 2048)
    assert (settings.max_connections, settings.max_connections_per_ip) == (5000, 8)
    assert settings.allowed_origins == {"https://a.example", "https://b.example"}
    assert settings.allowed_hosts == {"chat.example.com", "::1", ".example.org"}
    assert settings.cluster_group == "239.1.2.3"
    assert settings.cluster_key_file == Path("/etc/chat.key")
    assert settings.cluster_secret == b"a secret of enough length"
    assert settings.http_url == "https://chat.example.com:8000"
    assert Settings.from_env({"TRIO_CHAT_WS_BIND": "[::1]:9001"}).ws_bind == ("::1", 9001)


def test_lan_mode_takes_an_address_of_this_host_and_reaches_the_segment() -> None:
    address = this_hosts_lan_address()
    settings = Settings.from_env(
        {
            "TRIO_CHAT_CLUSTER": "lan",
            "TRIO_CHAT_CLUSTER_INTERFACE": address,
            "TRIO_CHAT_CLUSTER_SECRET": "a secret of enough length",
        }
    )
    assert (settings.cluster, settings.cluster_interface) == ("lan", address)
    assert settings.cluster_ttl == 1


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TRIO_CHAT_RATE_LIMIT": "abc"}, ["TRIO_CHAT_RATE_LIMIT", "number"]),
        ({"TRIO_CHAT_RATE_LIMIT": "-1"}, ["TRIO_CHAT_RATE_LIMIT", "0 or above"]),
        ({"TRIO_CHAT_RATE_LIMIT": "nan"}, ["TRIO_CHAT_RATE_LIMIT", "0 or above"]),
        ({"TRIO_CHAT_RATE_BURST": "0"}, ["TRIO_CHAT_RATE_BURST", "above 0"]),
        ({"TRIO_CHAT_MAX_TEXT": "many"}, ["TRIO_CHAT_MAX_TEXT", "number"]),
        ({"TRIO_CHAT_MAX_TEXT": "4.5"}, ["TRIO_CHAT_MAX_TEXT", "whole number"]),
        ({"TRIO_CHAT_KEEPALIVE_INTERVAL": "0"}, ["TRIO_CHAT_KEEPALIVE_INTERVAL", "above 0"]),
        ({"TRIO_CHAT_WS_BIND": "nonsense"}, ["TRIO_CHAT_WS_BIND", "HOST:PORT"]),
        ({"TRIO_CHAT_WS_BIND": "127.0.0.1:99999"}, ["TRIO_CHAT_WS_BIND", "port"]),
        ({"TRIO_CHAT_WS_PUBLIC_URL": "http://x"}, ["TRIO_CHAT_WS_PUBLIC_URL", "ws://"]),
        ({"TRIO_CHAT_HTTP_URL": "chat.example.com"}, ["TRIO_CHAT_HTTP_URL", "http://"]),
        ({"TRIO_CHAT_BACKLOG": "12"}, ["TRIO_CHAT_BACKLOG", "1K"]),
        ({"TRIO_CHAT_MAX_FRAME": "1.5M"}, ["TRIO_CHAT_MAX_FRAME", "size in bytes"]),
        ({"TRIO_CHAT_MAX_CONNECTIONS": "0"}, ["TRIO_CHAT_MAX_CONNECTIONS", "above 0"]),
        ({"TRIO_CHAT_MAX_CONNECTIONS_PER_IP": "x"}, ["TRIO_CHAT_MAX_CONNECTIONS_PER_IP", "number"]),
        ({"TRIO_CHAT_ALLOWED_ORIGINS": "evil.example"}, ["TRIO_CHAT_ALLOWED_ORIGINS", "origin"]),
        (
            {"TRIO_CHAT_ALLOWED_HOSTS": "https://a.example"},
            ["TRIO_CHAT_ALLOWED_HOSTS", "no scheme"],
        ),
        ({"TRIO_CHAT_STORE": "postgres"}, ["TRIO_CHAT_STORE", "sqlite"]),
        ({"TRIO_CHAT_CLUSTER": "galaxy"}, ["TRIO_CHAT_CLUSTER", "lan"]),
        ({"TRIO_CHAT_CLUSTER_GROUP": "10.1.2.3"}, ["TRIO_CHAT_CLUSTER_GROUP", "multicast"]),
        ({"TRIO_CHAT_CLUSTER_GROUP": "chat-group"}, ["TRIO_CHAT_CLUSTER_GROUP", "multicast"]),
        ({"TRIO_CHAT_CLUSTER_PORT": "0"}, ["TRIO_CHAT_CLUSTER_PORT", "1 to 65535"]),
        ({"TRIO_CHAT_CLUSTER_INTERFACE": "eth0"}, ["TRIO_CHAT_CLUSTER_INTERFACE", "IPv4"]),
        (
            {"TRIO_CHAT_CLUSTER_INTERFACE": "203.0.113.77"},
            ["TRIO_CHAT_CLUSTER_INTERFACE", "this host"],
        ),
        (
            {"TRIO_CHAT_CLUSTER_INTERFACE": "239.1.2.3"},
            ["TRIO_CHAT_CLUSTER_INTERFACE", "this host"],
        ),
        ({"TRIO_CHAT_CLUSTER_TTL": "300"}, ["TRIO_CHAT_CLUSTER_TTL", "255"]),
        ({"TRIO_CHAT_CLUSTER_SECRET": "short"}, ["TRIO_CHAT_CLUSTER_SECRET", "16"]),
        ({"TRIO_CHAT_CLUSTER": "lan"}, ["TRIO_CHAT_CLUSTER_SECRET"]),
        (
            {"TRIO_CHAT_CLUSTER": "lan", "TRIO_CHAT_CLUSTER_SECRET": "0123456789abcdef"},
            ["TRIO_CHAT_CLUSTER_INTERFACE"],
        ),
    ],
)
def test_bad_values_are_refused_by_name(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    for word in words:
        assert word in str(info.value)


def test_a_refusal_names_variable_value_and_rule_but_never_shows_a_secret() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TRIO_CHAT_CLUSTER_TTL": "300"})
    assert str(info.value) == "TRIO_CHAT_CLUSTER_TTL='300': must be a whole number from 0 to 255"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TRIO_CHAT_CLUSTER_SECRET": "hunter2"})
    assert "hunter2" not in str(info.value)
    assert str(info.value).startswith("TRIO_CHAT_CLUSTER_SECRET=(7 characters, not shown)")


def test_the_link_defaults_are_the_settings_defaults() -> None:
    link = LinkConfig(secret=b"k" * 32, cluster_id="c", node_id="n", incarnation=1, http_url="")
    defaults = Settings()
    assert (link.group, link.interface, link.ttl) == (
        defaults.cluster_group,
        defaults.cluster_interface,
        defaults.cluster_ttl,
    )
    # Unset, the port is the secret's own, the same for every node with that secret.
    assert defaults.cluster_port is None
    assert link.port == derived_port(b"k" * 32) in DERIVED_PORTS


def test_each_secret_has_its_own_derived_port_and_a_set_port_wins(tmp_path: Path) -> None:
    ports = {derived_port(os.urandom(32)) for _ in range(200)}
    # 200 random keys over 12768 ports: a few may share one, most do not.
    assert len(ports) > 190
    assert ports <= set(DERIVED_PORTS)
    secret = os.urandom(32)
    derived = link_config(make_settings(tmp_path), "n-0", 1, secret=secret, http_url="")
    assert derived.port == derived_port(secret)
    assert derived.cluster_id.endswith(f":{derived.port}")
    chosen = link_config(
        make_settings(tmp_path, cluster_port=40001), "n-0", 1, secret=secret, http_url=""
    )
    assert (chosen.port, chosen.cluster_id.endswith(":40001")) == (40001, True)


def test_chat_socket_url_follows_the_page_host() -> None:
    settings = Settings.from_env({"TRIO_CHAT_WS_BIND": "0.0.0.0:9001"})
    assert (
        settings.chat_socket_url("chat.example.com:8000", 9001) == "ws://chat.example.com:9001/ws"
    )
    assert settings.chat_socket_url("chat.example.com", None) is None
    behind_proxy = Settings.from_env({"TRIO_CHAT_WS_PUBLIC_URL": "wss://chat.example.com/socket"})
    assert behind_proxy.chat_socket_url("anything", 9001) == "wss://chat.example.com/socket"


def test_host_mode_makes_one_owner_only_cluster_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = cluster_secret(settings)
    assert len(first) >= 32
    assert (tmp_path / "cluster.key").stat().st_mode & 0o777 == 0o600
    assert cluster_secret(settings) == first  # every worker reads the same key
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.key"]  # no drafts left


def test_unreadable_or_short_key_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cluster_secret(Settings(cluster_key_file=tmp_path / "missing"))
    short = tmp_path / "short"
    short.write_text("tiny")
    with pytest.raises(ConfigError, match="shorter than 16"):
        cluster_secret(Settings(cluster_key_file=short))


def test_redis_mode_takes_a_url_and_never_shows_its_password() -> None:
    url = "rediss://:hunter2-secret@redis.example.com:6380/2"
    settings = Settings.from_env(
        {
            "TRIO_CHAT_CLUSTER": "redis",
            "TRIO_CHAT_REDIS_URL": url,
            "TRIO_CHAT_REDIS_STREAM_MAX": "5000",
            "TRIO_CHAT_CLUSTER_SECRET": "a secret of enough length",
        }
    )
    assert (settings.cluster, settings.redis_url, settings.redis_stream_max) == ("redis", url, 5000)
    assert Settings().redis_stream_max == 1_000_000
    assert redact_url(url) == "rediss://:***@redis.example.com:6380/2"
    assert redact_url("redis://app:pw@h/0") == "redis://app:***@h/0"
    assert redact_url("redis://h:6379") == "redis://h:6379"
    with pytest.raises(ConfigError, match="TRIO_CHAT_CLUSTER=redis needs TRIO_CHAT_REDIS_URL"):
        Settings.from_env({"TRIO_CHAT_CLUSTER": "redis"})
    with pytest.raises(ConfigError, match="needs TRIO_CHAT_CLUSTER_SECRET or"):
        Settings.from_env({"TRIO_CHAT_CLUSTER": "redis", "TRIO_CHAT_REDIS_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "http://:hunter2-secret@redis.example.com",
        "redis://:hunter2-secret@",
        "redis://:hunter2-secret@h:99999/0",
        "redis://:hunter2-secret@h:6379/zero",
    ],
)
def test_a_bad_redis_url_names_the_variable_not_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^TRIO_CHAT_REDIS_URL=") as caught:
        Settings.from_env({"TRIO_CHAT_REDIS_URL": url})
    assert "hunter2" not in str(caught.value)


def test_the_api_key_is_a_secret_of_16_or_more_characters() -> None:
    assert Settings.from_env({}).api_key is None
    key = "k3y-of-the-backend-0123"
    assert Settings.from_env({"TRIO_CHAT_API_KEY": key}).api_key == key.encode()
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TRIO_CHAT_API_KEY": "short-key"})
    assert "short-key" not in str(info.value)
    assert str(info.value).startswith("TRIO_CHAT_API_KEY=(9 characters, not shown)")


def test_jwt_mode_needs_a_key_and_public_rooms_follow_the_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"TRIO_CHAT_AUTH": "jwt"})
    assert "TRIO_CHAT_JWT_KEY" in str(refused.value)
    assert "TRIO_CHAT_JWT_PUBLIC_KEY" in str(refused.value)
    assert Settings.from_env({}).public_room_patterns == {"*"}
    key = "k" * 32
    jwt_mode = Settings.from_env({"TRIO_CHAT_AUTH": "jwt", "TRIO_CHAT_JWT_KEY": key})
    assert jwt_mode.public_room_patterns == frozenset()
    listed = Settings.from_env(
        {
            "TRIO_CHAT_AUTH": "jwt",
            "TRIO_CHAT_JWT_KEY": key,
            "TRIO_CHAT_PUBLIC_ROOMS": "lobby, help-*",
        }
    )
    assert listed.public_room_patterns == {"lobby", "help-*"}
