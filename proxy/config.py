"""Typed configuration: defaults <- config.yaml <- environment <- flags, validated once at startup.

Every key is a field of a frozen dataclass below; config.yaml documents each with its default. An unknown
key, a wrong type or an out-of-range value raises ConfigError naming the file (or variable, or flag), the
dotted key and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from proxy.errors import ConfigError, UpstreamError
from proxy.upstream_url import Upstream

if TYPE_CHECKING:
    from proxy.upstreams.settings import PoolSettings

__all__ = [
    "AdminConfig",
    "Config",
    "DashboardConfig",
    "LogConfig",
    "MetricsConfig",
    "OtelConfig",
    "RedisConfig",
    "ServerConfig",
    "StorageConfig",
    "UpstreamsConfig",
    "default_db_path",
    "default_instance",
    "load_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/ollamon/ollamon.db``, falling back to ``~/.local/share``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ollamon" / "ollamon.db"


def default_instance(port: int) -> str:
    """``<hostname>:<port>``: unique per process on a host (one port each) and the same across restarts."""
    return f"{socket.gethostname()}:{port}"


INSTANCE_MAX_CHARS = 128


def instance_problem(name: str) -> str | None:
    """Why ``name`` cannot be ``server.instance`` (None when it can)."""
    if not name.strip():
        return "must not be blank (leave it out for the default <hostname>:<listen port>)"
    if len(name) > INSTANCE_MAX_CHARS:
        return f"must be at most {INSTANCE_MAX_CHARS} characters, got {len(name)}"
    if not name.isprintable() or name != name.strip():
        return f"must be printable text without leading or trailing spaces, got {name[:40]!r}"
    return None


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:11435"
    upstream: str = "http://127.0.0.1:11434"
    instance: str = ""  # "" means default_instance(listen): <hostname>:<listen port>
    trusted_proxies: tuple[str, ...] = ()
    user_id_header: str = "X-User-Id"
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 600.0
    shutdown_grace_s: float = 30.0
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    allowed_hosts: tuple[str, ...] = ()
    max_inspect_bytes: int = 16 << 20
    max_inspect_total_bytes: int = 128 << 20
    client_stall_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    event_loop: str = "uvloop"

    @property
    def listen_host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _split_listen(self.listen)[1]

    @property
    def instance_name(self) -> str:
        """The name stamped on every record this process writes (``instance``, else ``<hostname>:<port>``)."""
        return self.instance or default_instance(self.listen_port)

    @property
    def upstream_value(self) -> Upstream:
        return Upstream.parse(self.upstream)

    @property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)


@dataclass(frozen=True)
class StorageConfig:
    db: str = ""  # "" means default_db_path()
    # Where records go: "" (SQLite at ``db``), ``sqlite:PATH`` or ``postgresql://...`` (storage/open_store.py).
    url: str = ""
    synchronous: str = "normal"
    busy_timeout_ms: int = 5000
    store_text: bool = False
    queue_size: int = 10000
    batch_rows: int = 500
    flush_interval_ms: int = 250

    @property
    def db_path(self) -> Path:
        if self.url.startswith("sqlite:"):
            return Path(self.url.removeprefix("sqlite:")).expanduser()
        return Path(self.db).expanduser() if self.db else default_db_path()

    @property
    def postgres(self) -> bool:
        """True when ``url`` selects the PostgreSQL store."""
        return self.url.startswith(("postgresql://", "postgres://"))


@dataclass(frozen=True)
class RedisConfig:
    url: str = ""  # "" means Redis is off
    recent: int = 1000
    timeout_ms: int = 250


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class SamplingConfig:
    enabled: bool = True
    interval_s: float = 1.0
    store_every_s: float = 10.0
    paths: tuple[str, ...] = ()
    gpu: bool = True


@dataclass(frozen=True)
class InventoryConfig:
    enabled: bool = True
    ps_interval_s: float = 30.0
    tags_interval_s: float = 300.0
    cold_load_ms: float = 250.0
    # Ollama's OLLAMA_NUM_PARALLEL (requests a loaded model serves at once); 0 means unknown.
    num_parallel: int = 0


@dataclass(frozen=True)
class RetentionConfig:
    enabled: bool = True
    raw_days: int = 30
    system_days: int = 7
    rollup_days: int = 400
    interval_s: float = 3600.0
    batch_rows: int = 2000
    checkpoint_interval_s: float = 300.0


@dataclass(frozen=True)
class AlertsConfig:
    enabled: bool = True
    interval_s: float = 5.0
    resolve_delay_s: float = 0.0
    # PostgreSQL fleets: how long the alert lease outlives its holder's last renewal; 0 means 0.6 x interval_s.
    lease_ttl_s: float = 0.0
    # Raw YAML, validated by alerts.rules (which names the file, rule and field of any error).
    rules: Any = field(default=None, metadata={"raw": True})
    channels: Any = field(default=None, metadata={"raw": True})


@dataclass(frozen=True)
class AdminConfig:
    # "" means no token: /ollamon/ pages and API are open to whoever passes the Host check.
    token: str = ""


@dataclass(frozen=True)
class DashboardConfig:
    enabled: bool = True
    # Seconds between live snapshots pushed to open pages (GET /ollamon/api/live).
    live_interval_s: float = 1.0
    # Open live streams at most; one more gets 503.
    max_live_clients: int = 100


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    # "" serves GET /ollamon/metrics on the main listener only; HOST:PORT also serves it alone there.
    listen: str = ""
    # Distinct model label values at most; further models are counted under model="other".
    max_models: int = 100


@dataclass(frozen=True)
class OtelConfig:
    # Also on when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.
    enabled: bool = False
    # "" means the OTEL_EXPORTER_OTLP_* variables, else http://localhost:4318.
    endpoint: str = ""
    # "" means OTEL_SERVICE_NAME, else "ollamon".
    service_name: str = ""
    # Spans waiting for export at most; more are dropped and counted in /ollamon/health.
    max_queue: int = 2048


@dataclass(frozen=True)
class AuthConfig:
    """API keys and access (docs/usage.md)."""

    # off | optional | required. Raw: YAML reads a bare ``off`` as false, which means "off" too.
    mode: Any = field(default="off", metadata={"raw": True})
    # Send the caller's Authorization header on to Ollama (by default it is removed when auth is on).
    forward_key: bool = False
    # any | admin: who may use /api/pull, push, create, copy, delete and /api/blobs.
    management: str = "any"
    # Seconds between reloads of the database's api_keys table (revocations take effect within this).
    reload_interval_s: float = 1.0
    # Keys defined here (hashes only): [{name, hash, owner, team, models, rpm, tpm, concurrency, ...}].
    keys: Any = field(default=None, metadata={"raw": True})

    @property
    def mode_name(self) -> str:
        return "off" if self.mode is False or self.mode is None else str(self.mode).strip().lower()


@dataclass(frozen=True)
class LimitsConfig:
    """Rate limits per team and for everything (per-key limits are on the key; docs/usage.md)."""

    team_rpm: int = 0
    team_tpm: int = 0
    team_concurrency: int = 0
    global_rpm: int = 0
    global_tpm: int = 0
    global_concurrency: int = 0
    # Share limits across instances through redis.url when it is set; else each instance limits alone.
    redis: bool = True
    # Longest wait for Redis on the request path; past it the request is limited in memory.
    redis_timeout_ms: int = 20
    # A concurrency slot is dropped after this long even if never released (a crashed instance).
    concurrency_ttl_s: float = 3600.0


@dataclass(frozen=True)
class UsageConfig:
    """Prices, cost and quotas (docs/usage.md). The lists are raw YAML, validated by proxy/usage/cost.py
    and proxy/usage/quota.py, which name the entry and key of any error."""

    prices: Any = field(default=None, metadata={"raw": True})
    reference_prices: Any = field(default=None, metadata={"raw": True})
    energy_price_per_kwh: float = 0.0
    quotas: Any = field(default=None, metadata={"raw": True})


@dataclass(frozen=True)
class ConversationsConfig:
    """Conversation tracking (docs/conversations.md)."""

    enabled: bool = True
    # A client's own conversation id, when it sends one; else the id is derived from the chat history.
    header: str = "X-Conversation-Id"
    # Longer header values are cut to this many characters.
    max_id_chars: int = 128
    # Models whose cold prompt-evaluation rate is remembered at most (the cache-reuse estimate's state).
    max_models: int = 256


@dataclass(frozen=True)
class ContentConfig:
    """Content analysis off the request path (docs/content.md): PII, language, safety, redaction."""

    enabled: bool = False
    sample_rate: float = 1.0  # share of requests analysed, 0..1
    queue_size: int = 1000  # requests waiting for analysis; more are dropped and counted
    timeout_s: float = 10.0  # per check: the guard model's answer, the local detectors
    guard_model: str = ""  # e.g. llama-guard3 or shieldgemma, served by the same Ollama; "" = none
    pii: bool = True
    language: bool = True
    redact: bool = False  # with storage.store_text: store the text with PII replaced by <KIND>
    max_text_chars: int = 20000  # prompt and response are each cut to this before analysis


@dataclass(frozen=True)
class UpstreamsConfig:
    """Several Ollama hosts (docs/upstreams.md); no hosts: ``server.upstream`` alone, as before."""

    # [{url, weight, models, name}], raw YAML validated by proxy/upstreams/settings.py. Also accepted as a
    # bare list: ``upstreams: [...]``.
    hosts: Any = field(default=None, metadata={"raw": True})
    # all | <host name>: where /api/pull, push, create, copy, delete and blobs go.
    management: str = "all"
    check_interval_s: float = 5.0
    tags_interval_s: float = 30.0
    check_timeout_s: float = 2.0
    eject_after: int = 3
    eject_cooldown_s: float = 30.0
    retry: bool = True

    def settings(self, server_upstream: str) -> PoolSettings:
        """The pool: these hosts, or ``server_upstream`` as the pool of one."""
        from proxy.upstreams.settings import PoolSettings, parse_hosts, parse_management

        hosts = parse_hosts(self.hosts) or PoolSettings.single(Upstream.parse(server_upstream)).hosts
        return PoolSettings(
            hosts=hosts,
            management=parse_management(self.management, hosts),
            check_interval_s=self.check_interval_s,
            tags_interval_s=self.tags_interval_s,
            check_timeout_s=self.check_timeout_s,
            eject_after=self.eject_after,
            eject_cooldown_s=self.eject_cooldown_s,
            retry=self.retry,
        )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    otel: OtelConfig = field(default_factory=OtelConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    conversations: ConversationsConfig = field(default_factory=ConversationsConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    upstreams: UpstreamsConfig = field(default_factory=UpstreamsConfig)
    source: str = "defaults"


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "redis": RedisConfig,
    "log": LogConfig,
    "sampling": SamplingConfig,
    "inventory": InventoryConfig,
    "retention": RetentionConfig,
    "alerts": AlertsConfig,
    "admin": AdminConfig,
    "dashboard": DashboardConfig,
    "metrics": MetricsConfig,
    "otel": OtelConfig,
    "auth": AuthConfig,
    "limits": LimitsConfig,
    "usage": UsageConfig,
    "conversations": ConversationsConfig,
    "content": ContentConfig,
    "upstreams": UpstreamsConfig,
}

# (env var, section, key); flags use the same (section, key) through ``overrides``.
ENV_VARS: tuple[tuple[str, str, str], ...] = (
    ("OLLAMON_LISTEN", "server", "listen"),
    ("OLLAMON_UPSTREAM", "server", "upstream"),
    ("OLLAMON_INSTANCE", "server", "instance"),
    ("OLLAMON_DB", "storage", "db"),
    ("OLLAMON_DB_URL", "storage", "url"),
    ("OLLAMON_REDIS_URL", "redis", "url"),
    ("OLLAMON_LOG_LEVEL", "log", "level"),
    ("OLLAMON_ADMIN_TOKEN", "admin", "token"),
)


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], Any] | None = None,
) -> Config:
    """Build the config: defaults, then the YAML file, then ``OLLAMON_*`` variables, then flag overrides.

    ``path`` None means ``$OLLAMON_CONFIG`` or ``./config.yaml`` if it exists.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("OLLAMON_CONFIG"))
    file = Path(path) if path is not None else Path(env.get("OLLAMON_CONFIG") or "config.yaml")
    values: dict[str, dict[str, tuple[str, Any]]] = {name: {} for name in _SECTIONS}
    source = "defaults"
    if file.exists() or explicit:
        source = str(file)
        for section, key, value in _read_yaml(file):
            values[section][key] = (source, value)
    for var, section, key in ENV_VARS:
        if var in env:
            values[section][key] = (var, env[var])
    for (section, key), value in (overrides or {}).items():
        values[section][key] = (f"--{key.replace('_', '-')}", value)
    sections = {name: _build(cls, name, values[name]) for name, cls in _SECTIONS.items()}
    config = Config(**sections, source=source)
    _validate(config, values)
    return config


def _read_yaml(file: Path) -> list[tuple[str, str, Any]]:
    src = str(file)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(src, "(file)", f"cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(src, "(file)", f"not valid YAML: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(src, "(top level)", "must be a mapping of sections")
    out: list[tuple[str, str, Any]] = []
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(src, str(section), f"unknown section (known: {', '.join(_SECTIONS)})")
        if body is None:
            continue
        if section == "upstreams" and isinstance(body, list):
            body = {"hosts": body}  # the short form: upstreams is just the host list
        if not isinstance(body, dict):
            raise ConfigError(src, str(section), "must be a mapping")
        known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        for key, value in body.items():
            if key not in known:
                raise ConfigError(src, f"{section}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
            out.append((section, str(key), value))
    return out


def _build(cls: type[Any], section: str, values: dict[str, tuple[str, Any]]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        src, raw = values[f.name]
        if f.metadata.get("raw"):
            kwargs[f.name] = raw
            continue
        kwargs[f.name] = _coerce(raw, f.default, src, f"{section}.{f.name}")
    return cls(**kwargs)


def _coerce(raw: Any, default: Any, src: str, key: str) -> Any:
    """Coerce ``raw`` (YAML value or env string) to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(src, key, f"expected true or false, got {raw!r}")
    if isinstance(default, int):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(src, key, f"expected an integer, got {raw!r}")
    if isinstance(default, float):
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ConfigError(src, key, f"expected a number, got {raw!r}")
    if isinstance(default, tuple):
        if raw is None:
            return ()
        if isinstance(raw, str):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
        raise ConfigError(src, key, f"expected a list of strings, got {raw!r}")
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise ConfigError(src, key, f"expected a string, got {raw!r}")
    return raw


def _validate(config: Config, values: dict[str, dict[str, tuple[str, Any]]]) -> None:
    def src(section: str, key: str) -> str:
        return values[section].get(key, ("defaults", None))[0]

    def positive(section: str, key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(src(section, key), f"{section}.{key}", f"must be > 0, got {value}")

    s = config.server
    try:
        _split_listen(s.listen)
    except ValueError as exc:
        raise ConfigError(src("server", "listen"), "server.listen", str(exc)) from exc
    try:
        Upstream.parse(s.upstream)
    except UpstreamError as exc:
        raise ConfigError(src("server", "upstream"), "server.upstream", str(exc)) from exc
    if s.instance and (why := instance_problem(s.instance)):
        raise ConfigError(src("server", "instance"), "server.instance", why)
    for entry in s.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ConfigError(
                src("server", "trusted_proxies"), "server.trusted_proxies", f"{entry!r} is not an IP or CIDR"
            ) from exc
    if not s.user_id_header.strip():
        raise ConfigError(src("server", "user_id_header"), "server.user_id_header", "must not be empty")
    for key in ("connect_timeout_s", "idle_timeout_s"):
        positive("server", key, getattr(s, key))
    if s.shutdown_grace_s < 0:
        raise ConfigError(src("server", "shutdown_grace_s"), "server.shutdown_grace_s", "must be >= 0")
    positive("server", "header_timeout_s", s.header_timeout_s)
    positive("server", "max_connections", s.max_connections)
    for entry in s.allowed_hosts:
        if reason := _allowed_host_problem(entry):
            raise ConfigError(src("server", "allowed_hosts"), "server.allowed_hosts", f"{entry!r}: {reason}")
    positive("server", "max_inspect_bytes", s.max_inspect_bytes)
    positive("server", "max_inspect_total_bytes", s.max_inspect_total_bytes)
    positive("server", "client_stall_timeout_s", s.client_stall_timeout_s)
    positive("server", "keepalive_timeout_s", s.keepalive_timeout_s)
    if s.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(src("server", "event_loop"), "server.event_loop", "must be uvloop or asyncio")
    st = config.storage
    if st.synchronous.lower() not in ("normal", "full"):
        raise ConfigError(src("storage", "synchronous"), "storage.synchronous", "must be normal or full")
    if st.url and not (
        st.postgres or (st.url.startswith("sqlite:") and st.url.removeprefix("sqlite:").strip())
    ):
        raise ConfigError(
            src("storage", "url"),
            "storage.url",
            f"must be postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE or sqlite:PATH, got {st.url.split('@')[-1]!r}",
        )
    for key in ("busy_timeout_ms", "queue_size", "batch_rows", "flush_interval_ms"):
        positive("storage", key, getattr(st, key))
    r = config.redis
    if r.url and not r.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(src("redis", "url"), "redis.url", "must start with redis://, rediss:// or unix://")
    positive("redis", "recent", r.recent)
    positive("redis", "timeout_ms", r.timeout_ms)
    sp = config.sampling
    positive("sampling", "interval_s", sp.interval_s)
    positive("sampling", "store_every_s", sp.store_every_s)
    positive("inventory", "ps_interval_s", config.inventory.ps_interval_s)
    positive("inventory", "tags_interval_s", config.inventory.tags_interval_s)
    positive("inventory", "cold_load_ms", config.inventory.cold_load_ms)
    if config.inventory.num_parallel < 0:
        raise ConfigError(src("inventory", "num_parallel"), "inventory.num_parallel", "must be >= 0")
    for key in (
        "raw_days",
        "system_days",
        "rollup_days",
        "interval_s",
        "batch_rows",
        "checkpoint_interval_s",
    ):
        positive("retention", key, getattr(config.retention, key))
    positive("alerts", "interval_s", config.alerts.interval_s)
    if config.alerts.resolve_delay_s < 0:
        raise ConfigError(src("alerts", "resolve_delay_s"), "alerts.resolve_delay_s", "must be >= 0")
    if config.alerts.lease_ttl_s < 0:
        raise ConfigError(
            src("alerts", "lease_ttl_s"), "alerts.lease_ttl_s", "must be >= 0 (0: 0.6 x interval_s)"
        )
    positive("dashboard", "live_interval_s", config.dashboard.live_interval_s)
    positive("dashboard", "max_live_clients", config.dashboard.max_live_clients)
    if config.metrics.listen:
        try:
            _split_listen(config.metrics.listen)
        except ValueError as exc:
            raise ConfigError(src("metrics", "listen"), "metrics.listen", str(exc)) from exc
    positive("metrics", "max_models", config.metrics.max_models)
    positive("otel", "max_queue", config.otel.max_queue)
    if config.otel.endpoint and not config.otel.endpoint.startswith(("http://", "https://")):
        raise ConfigError(src("otel", "endpoint"), "otel.endpoint", "must start with http:// or https://")
    token = config.admin.token
    if token and (len(token) < 16 or token != token.strip()):
        raise ConfigError(
            src("admin", "token"), "admin.token", "must be at least 16 characters, without surrounding spaces"
        )
    _validate_auth(config, src)
    _validate_limits(config, src)
    _validate_usage(config, src)
    _validate_conversations(config, src)
    _validate_content(config, src)
    _validate_upstreams(config, src)
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(src("log", "level"), "log.level", "must be debug, info, warning or error")


Source = Callable[[str, str], str]  # (section, key) -> where the value came from (file, variable, flag)


def _validate_auth(config: Config, src: Source) -> None:
    """auth.* (issue 13)."""
    from proxy.usage.keys import parse_config_keys

    a = config.auth
    if a.mode_name not in ("off", "optional", "required"):
        raise ConfigError(
            src("auth", "mode"), "auth.mode", f"must be off, optional or required, not {a.mode!r}"
        )
    if a.management not in ("any", "admin"):
        raise ConfigError(src("auth", "management"), "auth.management", "must be any or admin")
    if not a.reload_interval_s > 0:
        raise ConfigError(src("auth", "reload_interval_s"), "auth.reload_interval_s", "must be > 0")
    try:
        parse_config_keys(a.keys)
    except ValueError as exc:
        raise ConfigError(src("auth", "keys"), "auth.keys", str(exc)) from exc


def _validate_limits(config: Config, src: Source) -> None:
    """limits.* (issue 13)."""
    lim = config.limits
    for name in (
        "team_rpm",
        "team_tpm",
        "team_concurrency",
        "global_rpm",
        "global_tpm",
        "global_concurrency",
    ):
        if getattr(lim, name) < 0:
            raise ConfigError(src("limits", name), f"limits.{name}", "must be >= 0 (0 means no limit)")
    if not 1 <= lim.redis_timeout_ms <= 1000:
        raise ConfigError(src("limits", "redis_timeout_ms"), "limits.redis_timeout_ms", "must be 1 to 1000")
    if not lim.concurrency_ttl_s > 0:
        raise ConfigError(src("limits", "concurrency_ttl_s"), "limits.concurrency_ttl_s", "must be > 0")


def _validate_usage(config: Config, src: Source) -> None:
    """usage.* (issue 13): the price lists and quotas parse, the energy price is a finite number >= 0."""
    from proxy.usage.cost import parse_prices
    from proxy.usage.quota import parse_quotas

    u = config.usage
    for key, parse in (
        ("prices", lambda raw: parse_prices(raw, "usage.prices")),
        ("reference_prices", lambda raw: parse_prices(raw, "usage.reference_prices")),
        ("quotas", parse_quotas),
    ):
        try:
            parse(getattr(u, key))
        except ValueError as exc:
            raise ConfigError(src("usage", key), f"usage.{key}", str(exc)) from exc
    if not 0 <= u.energy_price_per_kwh < float("inf"):  # NaN fails too
        raise ConfigError(
            src("usage", "energy_price_per_kwh"), "usage.energy_price_per_kwh", "must be a number >= 0"
        )


def _validate_conversations(config: Config, src: Source) -> None:
    """conversations.* (issue 14)."""
    c = config.conversations
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}", c.header):
        raise ConfigError(
            src("conversations", "header"), "conversations.header", "must be an HTTP header name"
        )
    for key, value, hi in (("max_id_chars", c.max_id_chars, 4096), ("max_models", c.max_models, 100_000)):
        if not 1 <= value <= hi:
            raise ConfigError(src("conversations", key), f"conversations.{key}", f"must be 1..{hi}")


def _validate_content(config: Config, src: Source) -> None:
    """content.* (issue 14)."""
    c = config.content
    if not 0.0 <= c.sample_rate <= 1.0:
        raise ConfigError(src("content", "sample_rate"), "content.sample_rate", "must be from 0 to 1")
    if c.queue_size < 1:
        raise ConfigError(src("content", "queue_size"), "content.queue_size", "must be at least 1")
    if not 0.0 < c.timeout_s <= 600.0:
        raise ConfigError(src("content", "timeout_s"), "content.timeout_s", "must be > 0 and <= 600")
    if c.max_text_chars < 1:
        raise ConfigError(src("content", "max_text_chars"), "content.max_text_chars", "must be at least 1")
    if len(c.guard_model) > 200 or any(ch.isspace() for ch in c.guard_model):
        raise ConfigError(
            src("content", "guard_model"), "content.guard_model", "must be a model name without spaces"
        )


def _validate_upstreams(config: Config, src: Source) -> None:
    """upstreams.* (issue 16): the host list and management target parse, the intervals are positive."""
    from proxy.upstreams.errors import UpstreamsConfigError

    u = config.upstreams
    for key in ("check_interval_s", "tags_interval_s", "check_timeout_s", "eject_after", "eject_cooldown_s"):
        if not getattr(u, key) > 0:
            raise ConfigError(src("upstreams", key), f"upstreams.{key}", "must be > 0")
    try:
        u.settings(config.server.upstream)
    except UpstreamsConfigError as exc:
        section_key = "hosts" if exc.key.startswith("upstreams.hosts") else "management"
        raise ConfigError(src("upstreams", section_key), exc.key, exc.reason) from exc


def _allowed_host_problem(entry: str) -> str | None:
    """Why ``entry`` cannot be a ``server.allowed_hosts`` item, or None: a host name, an IP, ``*.domain``
    (any subdomain of domain, not domain itself) or ``*`` (any host)."""
    e = entry.strip().lower()
    if e == "*":
        return None
    name = e[2:] if e.startswith("*.") else e
    if "*" in name:
        return "a wildcard may only lead ('*.example.com') or stand alone ('*')"
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(name):
        return "expected a host name or IP without scheme, port or path (e.g. ollama.example.com)"
    return None


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port
