"""Keeps an API process's principal cache honest: LISTEN nbcron_keys, clear on every revocation.

The cache answers only while the listener is connected. When the connection drops (Postgres
restart, network), the cache goes quiet (every request looks its key up again) until the
listener is back; it then starts empty, since revocations made meanwhile were not heard.
"""

from __future__ import annotations

import logging
import threading

from service.auth import KEYS_CHANNEL, PrincipalCache
from service.errors import NbcronError
from service.store import Listener, Store

log = logging.getLogger("nbcron.api")
WAIT_SECONDS = 0.5  # how often the thread looks at its stop flag
RETRY_SECONDS = 1.0  # between reconnection attempts


class RevocationListener:
    """A daemon thread clearing `cache` on every `NOTIFY nbcron_keys`."""

    def __init__(self, store: Store, cache: PrincipalCache) -> None:
        self.store, self.cache = store, cache
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbcron-revocations", daemon=True)

    def start(self) -> RevocationListener:
        if self.cache.ttl > 0:  # a disabled cache needs no listener
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * WAIT_SECONDS + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listener = self.store.listener(KEYS_CHANNEL)
            except NbcronError:
                self._stop.wait(RETRY_SECONDS)
                continue
            try:
                self._listen(listener)
            except NbcronError:
                log.warning("revocation listener lost its connection; principal cache off")
            finally:
                self.cache.set_live(False)
                listener.close()

    def _listen(self, listener: Listener) -> None:
        self.cache.set_live(True)
        while not self._stop.is_set():
            if listener.wait(WAIT_SECONDS):
                self.cache.clear()
