"""`nbcron api` with one process serves the app object; with several it serves a factory, and
every process rebuilds exactly the parent's settings from the environment it exported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from litestar import Litestar

from service.cli import _api_target
from service.config import Settings, load_settings


def test_one_process_serves_the_app_itself(tmp_path: Path) -> None:
    target = _api_target(Settings(data_dir=tmp_path), None)
    assert isinstance(target["app"], Litestar) and "workers" not in target


def test_several_processes_share_the_settings_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("NBCRON_")]:
        monkeypatch.delenv(name)
    toml = tmp_path / "other.toml"
    toml.write_text('jwt_secret = "' + "j" * 40 + '"\n')
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql://db/nbcron",
        api_port=9123,
        api_workers=3,
        auth_cache_seconds=2.5,
        http_allowlist=("10.0.0.0/8", "example.org"),
    )
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what the processes inherit
    target = _api_target(settings, toml)
    assert target == {"app": "service.api:app_from_env", "factory": True, "workers": 3}
    rebuilt = load_settings()
    assert rebuilt == settings.with_overrides(jwt_secret="j" * 40)  # unset here: from the file
