"""Dramatiq's own retries, time and age limits are off: nbcron's attempts are the only ones."""

from __future__ import annotations

import pytest
from dramatiq.middleware import AgeLimit, Retries, TimeLimit

from service.broker import declare_execute_run, make_broker
from service.config import Settings
from service.errors import UnavailableError


def test_broker_has_no_retries_time_or_age_limit() -> None:
    broker = make_broker(Settings(broker_url="redis://127.0.0.1:6379/15"))
    kinds = {type(m) for m in broker.middleware}
    assert not kinds & {Retries, TimeLimit, AgeLimit}
    actor = declare_execute_run(broker, lambda run_id: None, ["default", "reports"])
    assert actor.actor_name == "execute_run"
    assert {"default", "reports"} <= broker.get_declared_queues()


@pytest.mark.parametrize("url", [None, "", "kafka://x", "postgres://x"])
def test_a_missing_or_unknown_broker_url_is_a_clear_error(url: str | None) -> None:
    with pytest.raises(UnavailableError, match="NBCRON_BROKER_URL"):
        make_broker(Settings(broker_url=url))
