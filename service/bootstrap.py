"""What every start needs before the roles run: migrations and the first admin key."""

from __future__ import annotations

from service.auth import ensure_admin_key
from service.config import Settings
from service.errors import UnavailableError
from service.migrate import migrate
from service.store import Store


def require_database_url(settings: Settings) -> str:
    """The database URL, or a clear error saying how to set it."""
    if not settings.database_url:
        raise UnavailableError(
            "NBCRON_DATABASE_URL is not set (use `nbcron up` for an embedded database)"
        )
    return settings.database_url


def prepare(settings: Settings) -> None:
    """Apply pending migrations and create the admin key file on first start."""
    url = require_database_url(settings)
    migrate(url)
    with Store(url, min_size=1, max_size=2) as store:
        ensure_admin_key(store, settings.admin_key_path.resolve())
