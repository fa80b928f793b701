"""Config precedence and validation: defaults < config.yaml < OLLAMON_* < flags; errors name file, key, reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_shipped_config_yaml_is_valid_and_equals_defaults() -> None:
    shipped = load_config(Path(__file__).parent.parent / "config.yaml", env={})
    # Every documented default in config.yaml must equal the built-in default.
    from proxy.config import Config

    builtin = Config()
    assert shipped.server == builtin.server
    assert shipped.storage == builtin.storage
    assert shipped.redis == builtin.redis
    assert shipped.log == builtin.log
    assert shipped.sampling == builtin.sampling
    assert shipped.inventory == builtin.inventory
    assert shipped.retention == builtin.retention
    for section in ("admin", "dashboard", "metrics", "otel"):
        assert getattr(shipped, section) == getattr(builtin, section), section
    assert (shipped.alerts.enabled, shipped.alerts.interval_s, shipped.alerts.resolve_delay_s) == (
        builtin.alerts.enabled,
        builtin.alerts.interval_s,
        builtin.alerts.resolve_delay_s,
    )


def test_every_config_key_is_documented_in_config_yaml() -> None:
    import dataclasses

    from proxy.config import Config

    text = (Path(__file__).parent.parent / "config.yaml").read_text()
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        assert f"\n{section.name}:\n" in f"\n{text}", section.name
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"  {key.name}:" in text, f"{section.name}.{key.name} is not in config.yaml"


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    cfg = write(tmp_path, "server:\n  listen: 127.0.0.1:1000\n  upstream: http://10.0.0.1:1\n")
    c = load_config(cfg, env={})
    assert c.server.listen == "127.0.0.1:1000"
    c = load_config(cfg, env={"OLLAMON_LISTEN": "127.0.0.1:2000"})
    assert c.server.listen == "127.0.0.1:2000"
    assert c.server.upstream == "http://10.0.0.1:1"
    c = load_config(
        cfg, env={"OLLAMON_LISTEN": "127.0.0.1:2000"}, overrides={("server", "listen"): "0.0.0.0:3000"}
    )
    assert (c.server.listen_host, c.server.listen_port) == ("0.0.0.0", 3000)


def test_config_env_var_names_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "storage:\n  db: /tmp/x.db\n")
    c = load_config(None, env={"OLLAMON_CONFIG": str(cfg)})
    assert str(c.storage.db_path) == "/tmp/x.db"
    assert c.source == str(cfg)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml", env={})
    assert "nope.yaml" in str(err.value)


def test_default_db_path_uses_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    c = load_config(write(tmp_path, ""), env={})
    assert c.storage.db_path == tmp_path / "ollamon" / "ollamon.db"


def test_ollama_host_style_upstream() -> None:
    c = load_config(None, env={"OLLAMON_UPSTREAM": "example.com:1234"}, overrides={})
    up = c.server.upstream_value
    assert (up.scheme, up.host, up.port) == ("http", "example.com", 1234)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("server:\n  lisen: 1\n", "server.lisen", "unknown key"),
        ("sever:\n  listen: 1\n", "sever", "unknown section"),
        ("server:\n  listen: nope\n", "server.listen", "HOST:PORT"),
        ("server:\n  listen: 'h:99999'\n", "server.listen", "out of range"),
        ("server:\n  upstream: 'ftp://x'\n", "server.upstream", "unsupported scheme"),
        ("server:\n  idle_timeout_s: -1\n", "server.idle_timeout_s", "must be > 0"),
        ("server:\n  idle_timeout_s: soon\n", "server.idle_timeout_s", "expected a number"),
        ("server:\n  trusted_proxies: ['not-an-ip']\n", "server.trusted_proxies", "not an IP"),
        ("storage:\n  store_text: maybe\n", "storage.store_text", "expected true or false"),
        ("storage:\n  synchronous: extra\n", "storage.synchronous", "normal or full"),
        ("storage:\n  synchronous: off\n", "storage.synchronous", "expected a string"),
        ("storage:\n  queue_size: 0\n", "storage.queue_size", "must be > 0"),
        ("redis:\n  url: 'http://x'\n", "redis.url", "redis://"),
        ("log:\n  level: loud\n", "log.level", "debug, info"),
        ("- a\n- b\n", "(top level)", "mapping"),
        ("server: [1\n", "(file)", "not valid YAML"),
    ],
)
def test_bad_values_name_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env={})
    assert err.value.source == str(cfg)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(cfg) in str(err.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"OLLAMON_LISTEN": "garbage"})
    assert err.value.source == "OLLAMON_LISTEN"
    assert err.value.key == "server.listen"


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides={("redis", "url"): "nonsense"})
    assert err.value.source == "--url" or err.value.source.startswith("--")
    assert err.value.key == "redis.url"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("admin:\n  token: short\n", "admin.token", "at least 16"),
        ("metrics:\n  listen: nowhere\n", "metrics.listen", "HOST:PORT"),
        ("otel:\n  endpoint: collector:4318\n", "otel.endpoint", "http://"),
        ("dashboard:\n  live_interval_s: 0\n", "dashboard.live_interval_s", "> 0"),
        ("inventory:\n  num_parallel: -1\n", "inventory.num_parallel", ">= 0"),
    ],
)
def test_bad_access_and_export_values(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    message = str(err.value)
    assert str(tmp_path / "config.yaml") in message and key in message and reason in message, message


def test_admin_token_from_the_environment() -> None:
    config = load_config(None, env={"OLLAMON_ADMIN_TOKEN": "t" * 20})
    assert config.admin.token == "t" * 20
