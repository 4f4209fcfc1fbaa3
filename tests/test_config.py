"""Settings: every bad value stops the server with a message naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_chat import ConfigError, Settings
from trio_chat.node._cluster import cluster_secret


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.ws_bind == ("127.0.0.1", 8001)
    assert settings.rate_limit == 10
    assert settings.rate_burst == 20
    assert settings.max_text == 4000
    assert settings.backlog == 1024 * 1024
    assert settings.data_dir == Path("data")
    assert settings.cluster == "host"
    assert settings.cluster_ttl == 0
    assert settings.max_connections is None  # derived from RLIMIT_NOFILE by the node
    assert settings.max_connections_per_ip == 256


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "TRIO_CHAT_WS_BIND": "off",
            "TRIO_CHAT_RATE_LIMIT": "0",
            "TRIO_CHAT_BACKLOG": "256K",
            "TRIO_CHAT_MAX_CONNECTIONS": "5000",
            "TRIO_CHAT_MAX_CONNECTIONS_PER_IP": "8",
            "TRIO_CHAT_ALLOWED_ORIGINS": "https://a.example, https://b.example/",
            "TRIO_CHAT_CLUSTER": "lan",
            "TRIO_CHAT_CLUSTER_INTERFACE": "192.0.2.10",
            "TRIO_CHAT_CLUSTER_SECRET": "a secret of enough length",
        }
    )
    assert settings.ws_bind is None
    assert settings.rate_limit == 0
    assert settings.backlog == 256 * 1024
    assert (settings.max_connections, settings.max_connections_per_ip) == (5000, 8)
    assert settings.allowed_origins == {"https://a.example", "https://b.example"}
    assert settings.cluster_ttl == 1  # LAN mode reaches the segment


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TRIO_CHAT_RATE_LIMIT": "abc"}, ["TRIO_CHAT_RATE_LIMIT", "number"]),
        ({"TRIO_CHAT_RATE_LIMIT": "-1"}, ["TRIO_CHAT_RATE_LIMIT", "0 or above"]),
        ({"TRIO_CHAT_RATE_BURST": "0"}, ["TRIO_CHAT_RATE_BURST", "above 0"]),
        ({"TRIO_CHAT_MAX_TEXT": "many"}, ["TRIO_CHAT_MAX_TEXT", "number"]),
        ({"TRIO_CHAT_WS_BIND": "nonsense"}, ["TRIO_CHAT_WS_BIND", "HOST:PORT"]),
        ({"TRIO_CHAT_WS_BIND": "127.0.0.1:99999"}, ["TRIO_CHAT_WS_BIND", "port"]),
        ({"TRIO_CHAT_WS_PUBLIC_URL": "http://x"}, ["TRIO_CHAT_WS_PUBLIC_URL", "ws://"]),
        ({"TRIO_CHAT_BACKLOG": "12"}, ["TRIO_CHAT_BACKLOG", "1K"]),
        ({"TRIO_CHAT_MAX_CONNECTIONS": "0"}, ["TRIO_CHAT_MAX_CONNECTIONS", "above 0"]),
        ({"TRIO_CHAT_MAX_CONNECTIONS_PER_IP": "x"}, ["TRIO_CHAT_MAX_CONNECTIONS_PER_IP", "number"]),
        ({"TRIO_CHAT_ALLOWED_ORIGINS": "evil.example"}, ["TRIO_CHAT_ALLOWED_ORIGINS", "origin"]),
        ({"TRIO_CHAT_STORE": "postgres"}, ["TRIO_CHAT_STORE", "sqlite"]),
        ({"TRIO_CHAT_CLUSTER": "galaxy"}, ["TRIO_CHAT_CLUSTER", "lan"]),
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
