"""One typed settings object, built once from defaults, `nbcron.toml`, `NBCRON_*` env and flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "NBCRON_"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob nbcron has; passed in, never read from the environment deep in the code."""

    database_url: str | None = None  # None: `nbcron up` starts an embedded PostgreSQL
    broker_url: str | None = None  # redis://… or amqp://…; None: embedded Valkey
    data_dir: Path = Path(".nbcron")
    api_url: str = "http://127.0.0.1:8080"
    api_key: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_workers: int = 1  # `nbcron api` processes sharing the port (uvicorn --workers)
    dashboard_port: int = 5006
    notebooks_dir: Path = Path("notebooks")
    http_allowlist: tuple[str, ...] = ()
    http_max_response_bytes: int = 1024 * 1024  # HTTP executor: response body kept per run
    kernel_pool_size: int = 1  # warm, never-used kernels per kernel name per worker (0: off)
    kernel_pool_kernels: tuple[str, ...] = ("python3",)  # kernels warmed when a worker starts
    broker_namespace: str = "nbcron"
    worker_processes: int = 1
    worker_threads: int = 32  # concurrent runs per process; they share claim/finish statements
    worker_queues: tuple[str, ...] = ("default",)
    worker_name: str | None = None
    consumer_wait_ms: int = 10  # longest idle poll of the broker: bounds pickup latency
    worker_prefetch: int = 0  # messages a worker process holds ahead; 0: 4 per thread
    poll_interval_seconds: float = 1.0
    dispatch_batch: int = 500
    redispatch_after_seconds: float = 300.0
    heartbeat_interval_seconds: float = 5.0
    heartbeat_timeout_seconds: float = 30.0
    log_max_bytes: int = 10 * 1024 * 1024
    db_pool_min: int = 1
    db_pool_max: int = 10
    log_level: str = "INFO"
    # -- observability and alerting (issue 7)
    log_format: str = "auto"  # auto (console on a terminal, else JSON) | json | console
    public_url: str | None = None  # base of run links in notifications; default: api_url
    smtp_host: str | None = None  # e-mail notifications need it
    smtp_port: int = 587
    smtp_tls: str = "starttls"  # starttls | ssl | off
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_from: str = "nbcron@localhost"
    notify_timeout_seconds: float = 10.0  # one delivery attempt (HTTP or SMTP)
    notify_max_attempts: int = 5  # then the notification is given up and logged
    notify_retry_seconds: float = 10.0  # first retry delay, doubled each attempt (cap 1 h)
    notify_poll_seconds: float = 2.0  # how often a worker looks for pending notifications
    notify_log_lines: int = 20  # last log lines in a notification
    tracing_enabled: bool = False  # OpenTelemetry traces (needs the `tracing` extra)
    tracing_endpoint: str | None = None  # OTLP/HTTP traces URL; default: OTEL_EXPORTER_* env
    tracing_service_name: str = "nbcron"
    # -- security (see service/tokens.py, service/secrets.py, service/ratelimit.py)
    jwt_secret: str | None = None  # None: generated into <data_dir>/jwt-secret (0600)
    token_ttl_seconds: int = 900  # lifetime of a JWT from POST /api/auth/token
    secrets_key: str | None = None  # task secrets key; None: <data_dir>/secrets-key (0600)
    cors_origins: tuple[str, ...] = ()  # empty: CORS off; "*" or exact origins
    rate_limit_per_minute: int = 60000  # requests per key per API process; 0: off
    metrics_public: bool = False  # True: GET /metrics needs no key
    auth_cache_seconds: float = 5.0  # longest an API process trusts a looked-up key; 0: off

    @property
    def admin_key_path(self) -> Path:
        """Where the first start writes the admin key (mode 0600)."""
        return self.data_dir / "admin-key"

    @property
    def jwt_secret_path(self) -> Path:
        """Where the JWT signing secret is generated when `jwt_secret` is not set (mode 0600)."""
        return self.data_dir / "jwt-secret"

    @property
    def secrets_key_path(self) -> Path:
        """Where the task secrets key is generated when `secrets_key` is not set (mode 0600)."""
        return self.data_dir / "secrets-key"

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given (already parsed) fields replaced; None values are ignored."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Turn a string or TOML value into the field's type, naming the field on error."""
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, tuple):
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name}: cannot read {raw!r}") from exc
    return None if raw in ("", None) else str(raw)


def _from_mapping(values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(Settings)}
    parsed: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            raise ValueError(f"{source}: unknown setting {key!r}")
        default = getattr(Settings(), key)
        parsed[key] = _coerce(key, raw, default)
    return parsed


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    known = {f.name for f in fields(Settings)}
    picked = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in environ.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() in known
    }
    return _from_mapping(picked, source="environment")


def _from_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return _from_mapping(data.get("nbcron", data), source=str(path))


def load_settings(
    *, environ: Mapping[str, str] | None = None, toml_path: Path | None = None, **flags: Any
) -> Settings:
    """Defaults < `nbcron.toml` (or NBCRON_CONFIG) < `NBCRON_*` environment < flags."""
    env = os.environ if environ is None else environ
    path = toml_path or Path(env.get("NBCRON_CONFIG", "nbcron.toml"))
    values: dict[str, Any] = {}
    values.update(_from_toml(path))
    values.update(_from_env(env))
    values.update({k: v for k, v in flags.items() if v is not None})
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as `NBCRON_*` variables, for child processes started by `nbcron up`."""
    out: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        out[ENV_PREFIX + f.name.upper()] = text
    return out


__all__ = ["Settings", "field", "load_settings", "settings_env"]
