"""service.config: precedence, parsing and round-tripping of the one Settings object."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings, load_settings, settings_env


@pytest.fixture
def toml_path(tmp_path: Path) -> Path:
    return tmp_path / "nbcron.toml"


def test_defaults_when_nothing_is_given(toml_path: Path) -> None:
    assert load_settings(environ={}, toml_path=toml_path) == Settings()


def test_toml_overrides_defaults(toml_path: Path) -> None:
    toml_path.write_text('api_port = 9001\nlog_level = "DEBUG"\n')
    settings = load_settings(environ={}, toml_path=toml_path)
    assert settings.api_port == 9001
    assert settings.log_level == "DEBUG"
    assert settings.worker_threads == Settings().worker_threads


def test_toml_may_use_an_nbcron_table(toml_path: Path) -> None:
    toml_path.write_text("[nbcron]\nworker_threads = 7\n")
    assert load_settings(environ={}, toml_path=toml_path).worker_threads == 7


def test_precedence_defaults_toml_env_flags(toml_path: Path) -> None:
    toml_path.write_text('api_port = 9001\nworker_threads = 2\nlog_level = "DEBUG"\n')
    environ = {"NBCRON_API_PORT": "9002", "NBCRON_WORKER_THREADS": "3"}
    settings = load_settings(environ=environ, toml_path=toml_path, api_port=9003)
    assert settings.api_port == 9003  # flag beats env beats toml
    assert settings.worker_threads == 3  # env beats toml
    assert settings.log_level == "DEBUG"  # toml beats default
    assert settings.dashboard_port == 5006  # default


def test_none_flags_do_not_override(toml_path: Path) -> None:
    settings = load_settings(
        environ={"NBCRON_API_PORT": "9002"}, toml_path=toml_path, api_port=None
    )
    assert settings.api_port == 9002


def test_nbcron_config_env_names_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text("dispatch_batch = 17\n")
    settings = load_settings(environ={"NBCRON_CONFIG": str(path)})
    assert settings.dispatch_batch == 17


def test_types_are_coerced(toml_path: Path) -> None:
    environ = {
        "NBCRON_POLL_INTERVAL_SECONDS": "0.25",
        "NBCRON_DATA_DIR": "/var/lib/nbcron",
        "NBCRON_DATABASE_URL": "postgresql://db/nbcron",
        "NBCRON_LOG_MAX_BYTES": "42",
    }
    settings = load_settings(environ=environ, toml_path=toml_path)
    assert settings.poll_interval_seconds == 0.25
    assert settings.data_dir == Path("/var/lib/nbcron")
    assert settings.database_url == "postgresql://db/nbcron"
    assert settings.log_max_bytes == 42


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a,b,c", ("a", "b", "c")),
        (" a , b ,, c ,", ("a", "b", "c")),
        ("single", ("single",)),
        ("", ()),
    ],
)
def test_comma_lists_become_tuples(toml_path: Path, raw: str, expected: tuple[str, ...]) -> None:
    settings = load_settings(environ={"NBCRON_WORKER_QUEUES": raw}, toml_path=toml_path)
    assert settings.worker_queues == expected


def test_toml_arrays_become_tuples(toml_path: Path) -> None:
    toml_path.write_text('http_allowlist = ["example.com", " api.example.org "]\n')
    settings = load_settings(environ={}, toml_path=toml_path)
    assert settings.http_allowlist == ("example.com", "api.example.org")


def test_unknown_toml_key_is_an_error_naming_it(toml_path: Path) -> None:
    toml_path.write_text("api_prot = 9000\n")
    with pytest.raises(ValueError, match="api_prot"):
        load_settings(environ={}, toml_path=toml_path)


def test_unrelated_nbcron_env_vars_are_ignored(toml_path: Path) -> None:
    environ = {"NBCRON_SOMETHING_ELSE": "x", "NBCRON_PARAM_FOO": "y"}
    assert load_settings(environ=environ, toml_path=toml_path) == Settings()


@pytest.mark.parametrize("setting", ["api_port", "worker_processes", "db_pool_max"])
def test_bad_int_in_env_names_the_setting(toml_path: Path, setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        load_settings(environ={f"NBCRON_{setting.upper()}": "lots"}, toml_path=toml_path)


def test_bad_int_in_toml_names_the_setting(toml_path: Path) -> None:
    toml_path.write_text('api_port = "eighty"\n')
    with pytest.raises(ValueError, match="api_port"):
        load_settings(environ={}, toml_path=toml_path)


def test_bad_float_names_the_setting(toml_path: Path) -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout_seconds"):
        load_settings(environ={"NBCRON_HEARTBEAT_TIMEOUT_SECONDS": "soon"}, toml_path=toml_path)


def test_settings_env_round_trips(tmp_path: Path) -> None:
    original = Settings(
        database_url="postgresql://u@h/db",
        api_key="secret",
        api_port=9100,
        data_dir=tmp_path / "data",
        http_allowlist=("a.example", "b.example"),
        worker_queues=("default", "reports"),
        poll_interval_seconds=0.5,
        worker_name="w1",
    )
    env = settings_env(original)
    assert all(k.startswith("NBCRON_") and isinstance(v, str) for k, v in env.items())
    assert "NBCRON_BROKER_URL" not in env  # None values are left out
    assert load_settings(environ=env, toml_path=tmp_path / "missing.toml") == original


def test_settings_env_round_trips_defaults(tmp_path: Path) -> None:
    env = settings_env(Settings())
    assert load_settings(environ=env, toml_path=tmp_path / "missing.toml") == Settings()


def test_with_overrides_ignores_none() -> None:
    base = Settings()
    assert base.with_overrides(api_port=None) is base
    assert base.with_overrides(api_port=1234, api_key=None).api_port == 1234
    assert base.admin_key_path == base.data_dir / "admin-key"
