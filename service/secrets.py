"""Task secrets: encrypted at rest outside the task row, masked as `***` wherever output is kept.

A task body may carry `secrets: {NAME: value}`. Each value is encrypted with AES-256-GCM under a
key from settings (or generated once into `<data dir>/secrets-key`, mode 0600) and stored in the
`task_secrets` table, bound to its task id and name so a ciphertext cannot be moved to another
task. The API shows only names (`{"NAME": "***"}`); the worker decrypts them into the run's
environment and masks every value in the run log and the run's error text, so the dashboard,
which reads those, never sees them either.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets as _random
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.config import Settings
from service.errors import NbcronError, ValidationError

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text all over the log
MAX_SECRET_LENGTH = 4096
MAX_SECRETS = 50
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TEXT_TYPES = ("text/", "application/json", "application/x-ipynb+json", "application/xml")
_VERSION = b"\x01"
_NONCE_BYTES = 12


class SecretsError(NbcronError):
    """Secrets cannot be read: the key is missing, malformed or not the one they were sealed with."""

    title = "Secrets error"


# -- key files ----------------------------------------------------------------


def read_or_create(path: Path, make: Callable[[], str]) -> str:
    """The content of a 0600 secret file, created with `make()` on first use.

    Several processes may start at once (API, dispatcher, workers): the file is written in full
    under a temporary name and linked into place, so a reader never sees it half written and
    exactly one creator wins.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{_random.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(make() + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def new_key() -> str:
    """A fresh 256-bit secrets key, URL-safe base64."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()


# -- encryption -----------------------------------------------------------------


class SecretBox:
    """Seals and opens secret values with AES-256-GCM, bound to (task id, name)."""

    def __init__(self, key: str) -> None:
        try:
            raw = base64.urlsafe_b64decode(key.encode())
        except (ValueError, TypeError) as exc:
            raise SecretsError("the secrets key is not valid base64") from exc
        if len(raw) != 32:
            raise SecretsError("the secrets key must be 32 bytes (URL-safe base64)")
        self._aead = AESGCM(raw)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for `settings.secrets_key`, or for the key file in the data dir."""
        return _box(settings.secrets_key, settings.secrets_key_path.resolve())

    def seal(self, task_id: int, name: str, value: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, value.encode(), _aad(task_id, name))

    def open(self, task_id: int, name: str, blob: bytes) -> str:
        blob = bytes(blob)
        if blob[:1] != _VERSION:
            raise SecretsError(f"secret {name}: unknown format")
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, sealed, _aad(task_id, name)).decode()
        except InvalidTag as exc:
            raise SecretsError(
                f"secret {name} cannot be decrypted: this process's secrets key differs from the"
                " one it was stored with (set the same NBCRON_SECRETS_KEY everywhere)"
            ) from exc


@lru_cache(maxsize=8)
def _box(key: str | None, path: Path) -> SecretBox:
    return SecretBox(key or read_or_create(path, new_key))


def _aad(task_id: int, name: str) -> bytes:
    return f"nbcron-task-secret:{task_id}:{name}".encode()


# -- the `secrets` field of a task body --------------------------------------------


def take_secrets(body: Any, *, partial: bool = False) -> dict[str, str | None]:
    """Remove and validate `secrets` from a task body: {NAME: value}.

    On a PATCH (`partial`), a value of null deletes the secret and `***` keeps it unchanged
    (so sending back what GET showed changes nothing).
    """
    if not isinstance(body, dict) or "secrets" not in body:
        return {}
    raw = body.pop("secrets")
    if raw is None and partial:
        return {}
    if not isinstance(raw, dict):
        raise ValidationError("secrets must be an object of NAME: value", field="secrets")
    if len(raw) > MAX_SECRETS:
        raise ValidationError(f"at most {MAX_SECRETS} secrets per task", field="secrets")
    return {name: _check_secret(name, value, partial=partial) for name, value in raw.items()}


def _check_secret(name: Any, value: Any, *, partial: bool) -> str | None:
    field = f"secrets.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationError(
            "secret names are environment variable names (letters, digits, _)", field="secrets"
        )
    if value is None and partial:
        return None
    if value == MASK and partial:
        return MASK
    if not isinstance(value, str):
        raise ValidationError("a secret value must be a string", field=field)
    if not MIN_SECRET_LENGTH <= len(value) <= MAX_SECRET_LENGTH:
        raise ValidationError(
            f"a secret value must have {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters",
            field=field,
        )
    if "\x00" in value:
        raise ValidationError("a secret value must not contain NUL bytes", field=field)
    return value


def check_no_clash(secrets: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    """A name is either a plain env entry or a secret, never both."""
    both = sorted(set(secrets) & set(env))
    if both:
        raise ValidationError(
            f"{', '.join(both)} is both in env and in secrets; keep it in one", field="secrets"
        )


def masked(names: Iterable[str]) -> dict[str, str]:
    """How the API shows a task's secrets: names only, values `***`."""
    return dict.fromkeys(sorted(names), MASK)


# -- masking ------------------------------------------------------------------------


class Masker:
    """Replaces every secret value in text with `***` (longest values first)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = sorted({v for v in values if len(v) >= MIN_SECRET_LENGTH}, key=len)[::-1]
        self.pattern = re.compile("|".join(map(re.escape, self.values))) if self.values else None
        # an executor's error tail may break a value across lines where output came in chunks
        loose = ["\n?".join(map(re.escape, v)) for v in self.values]
        self.loose = re.compile("|".join(loose)) if loose else None

    def __bool__(self) -> bool:
        return self.pattern is not None

    def mask(self, text: str | None) -> str | None:
        """`text` with every secret value replaced by `***`."""
        if text is None or self.pattern is None:
            return text
        return self.pattern.sub(MASK, text)

    def mask_error(self, text: str | None) -> str | None:
        """Like `mask`, also catching values broken across lines (error tails)."""
        if text is None or self.loose is None:
            return text
        return self.loose.sub(MASK, text)

    def mask_bytes(self, content_type: str, data: bytes) -> bytes:
        """A text artifact (notebook, HTML report, JSON, text) with secret values masked."""
        if self.pattern is None or not content_type.startswith(_TEXT_TYPES):
            return data
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return data
        return self.pattern.sub(MASK, text).encode()

    def stream(self, sink: Callable[[str], None]) -> MaskedStream:
        """A log sink that masks before writing to `sink`, even across chunk boundaries."""
        return MaskedStream(self, sink)

    def pending_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that could be the start of a secret value."""
        longest = min(len(text), max((len(v) for v in self.values), default=1) - 1)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(v.startswith(tail) for v in self.values):
                return size
        return 0


class MaskedStream:
    """Masks streamed output; holds back only an end that may be the start of a secret."""

    def __init__(self, masker: Masker, sink: Callable[[str], None]) -> None:
        self.masker, self.sink = masker, sink
        self._held = ""

    def write(self, text: str) -> None:
        if self.masker.pattern is None:
            self.sink(text)
            return
        self._emit(self._held + text, final=False)

    def close(self) -> None:
        """Release what was held back (the run has ended)."""
        if self._held:
            self._emit(self._held, final=True)

    def _emit(self, buf: str, *, final: bool) -> None:
        assert self.masker.pattern is not None
        cut = len(buf) if final else len(buf) - self.masker.pending_prefix(buf)
        out: list[str] = []
        pos = 0
        for match in self.masker.pattern.finditer(buf):
            if match.start() >= cut:
                break
            out += [buf[pos : match.start()], MASK]
            pos = match.end()
            cut = max(cut, pos)
        out.append(buf[pos:cut])
        self._held = buf[cut:]
        text = "".join(out)
        if text:
            self.sink(text)


# -- storage glue (API side and worker side) ------------------------------------------


def save_task_secrets(
    store: Any, settings: Settings, task_id: int, changes: dict[str, Any]
) -> None:
    """Seal and store new values; delete names whose value is None; leave `***` ones alone."""
    if not changes:
        return
    box = SecretBox.from_settings(settings)
    sealed = {n: box.seal(task_id, n, v) for n, v in changes.items() if v not in (None, MASK)}
    removed = [n for n, v in changes.items() if v is None]
    store.put_task_secrets(task_id, sealed=sealed, removed=removed)


def load_task_secrets(store: Any, settings: Settings, task_id: int) -> dict[str, str]:
    """A task's secrets, decrypted (worker side)."""
    sealed = store.task_secrets(task_id)
    if not sealed:
        return {}
    box = SecretBox.from_settings(settings)
    return {name: box.open(task_id, name, blob) for name, blob in sealed.items()}


def save_new_task_secrets(
    store: Any, settings: Settings, task_id: int, secrets: dict[str, Any]
) -> None:
    """Store a new task's secrets; if that fails, remove the task so none is left without them."""
    try:
        save_task_secrets(store, settings, task_id, secrets)
    except NbcronError:
        store.delete_task(task_id)
        raise


def merged_secret_names(current: Iterable[str], changes: Mapping[str, Any]) -> list[str]:
    """The names a task will have after a PATCH: null removes, anything else adds or keeps."""
    unknown = sorted(n for n, v in changes.items() if v == MASK and n not in set(current))
    if unknown:
        raise ValidationError(
            f"'***' keeps a stored secret, but {', '.join(unknown)} has none", field="secrets"
        )
    names = set(current) | {n for n, v in changes.items() if v is not None}
    return sorted(names - {n for n, v in changes.items() if v is None})
