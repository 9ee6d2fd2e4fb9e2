"""Task secrets: sealed with AES-GCM bound to task and name, validated on input, and masked in
streamed output even when a value arrives in pieces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from service.config import Settings
from service.errors import ValidationError
from service.secrets import (
    MASK,
    Masker,
    SecretBox,
    SecretsError,
    check_no_clash,
    masked,
    merged_secret_names,
    new_key,
    take_secrets,
)

VALUES = ["hunter2-secret", "hunter2", "p@ss.w0rd*(x)"]


def test_seal_and_open_bound_to_task_and_name() -> None:
    box = SecretBox(new_key())
    blob = box.seal(5, "TOKEN", "hunter2-secret")
    assert b"hunter2" not in blob
    assert box.open(5, "TOKEN", blob) == "hunter2-secret"
    assert box.seal(5, "TOKEN", "hunter2-secret") != blob  # a fresh nonce every time
    for task_id, name in ((6, "TOKEN"), (5, "OTHER")):
        with pytest.raises(SecretsError):
            box.open(task_id, name, blob)
    with pytest.raises(SecretsError, match="NBCRON_SECRETS_KEY"):
        SecretBox(new_key()).open(5, "TOKEN", blob)
    with pytest.raises(SecretsError):
        box.open(5, "TOKEN", b"\x02" + blob[1:])


def test_bad_keys_are_refused() -> None:
    for key in ("short", "!!!not base64!!!", ""):
        with pytest.raises(SecretsError):
            SecretBox(key)


def test_key_file_is_generated_once_0600(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    blob = SecretBox.from_settings(settings).seal(1, "A", "value-1")
    assert settings.secrets_key_path.stat().st_mode & 0o777 == 0o600
    again = Settings(data_dir=tmp_path)
    assert SecretBox.from_settings(again).open(1, "A", blob) == "value-1"
    configured = Settings(data_dir=tmp_path / "other", secrets_key=new_key())
    SecretBox.from_settings(configured)
    assert not configured.secrets_key_path.exists()


def test_take_secrets_validates_and_removes_the_field() -> None:
    body = {"name": "t", "secrets": {"API_TOKEN": "abcd-1234"}}
    assert take_secrets(body) == {"API_TOKEN": "abcd-1234"}
    assert "secrets" not in body
    assert take_secrets({"name": "t"}) == {}
    patch = {"secrets": {"A": None, "B": MASK, "C": "new-value"}}
    assert take_secrets(patch, partial=True) == {"A": None, "B": MASK, "C": "new-value"}


@pytest.mark.parametrize(
    "raw",
    [
        ["A"],
        "A=b",
        {"bad-name": "value-1"},
        {"1A": "value-1"},
        {"A": 5},
        {"A": "abc"},
        {"A": "x" * 5000},
        {"A": "nul\x00byte"},
        {"A": None},
        {"A": MASK},
        {f"S{i}": "value-1" for i in range(51)},
    ],
)
def test_bad_secrets_are_422(raw: object) -> None:
    with pytest.raises(ValidationError) as info:
        take_secrets({"secrets": raw})
    assert (info.value.field or "").startswith("secrets")


def test_names_after_a_patch_and_clashes_with_env() -> None:
    assert merged_secret_names(["A", "B"], {"B": None, "C": "v-123", "A": MASK}) == ["A", "C"]
    with pytest.raises(ValidationError):
        merged_secret_names([], {"NEW": MASK})
    with pytest.raises(ValidationError, match="both"):
        check_no_clash({"A": "x"}, {"A": "y"})
    check_no_clash({"A": "x"}, {"B": "y"})
    assert masked(["B", "A"]) == {"A": "***", "B": "***"}


def test_mask_replaces_longest_values_first() -> None:
    masker = Masker(VALUES)
    text = "a hunter2-secret b hunter2 c p@ss.w0rd*(x) d"
    assert masker.mask(text) == "a *** b *** c *** d"
    assert Masker([]).mask(text) == text and not Masker([])
    assert Masker(["ab"]).mask("abc") == "abc"  # too short to mask safely (refused on input)
    assert masker.mask(None) is None


def test_mask_error_catches_values_broken_across_lines() -> None:
    masker = Masker(["hunter2-secret"])
    assert masker.mask_error("out: hunter2-se\ncret\nend") == "out: ***\nend"


def test_mask_bytes_only_touches_text() -> None:
    masker = Masker(["hunter2-secret"])
    assert masker.mask_bytes("text/html", b"<p>hunter2-secret</p>") == b"<p>***</p>"
    assert masker.mask_bytes("application/x-ipynb+json", b'"hunter2-secret"') == b'"***"'
    assert masker.mask_bytes("image/png", b"hunter2-secret") == b"hunter2-secret"
    assert masker.mask_bytes("text/plain", b"\xff hunter2") == b"\xff hunter2"


def _streamed(masker: Masker, pieces: list[str]) -> str:
    out: list[str] = []
    stream = masker.stream(out.append)
    for piece in pieces:
        stream.write(piece)
    stream.close()
    return "".join(out)


def test_stream_masks_values_split_at_every_point() -> None:
    masker = Masker(VALUES)
    text = "start hunter2-secret mid hunter2 p@ss.w0rd*(x) hunter2-secre end hunter"
    expected = masker.mask(text)
    for cut in range(len(text) + 1):
        assert _streamed(masker, [text[:cut], text[cut:]]) == expected, cut


def test_stream_masks_any_chunking() -> None:
    rng = random.Random(1234)
    masker = Masker(VALUES)
    alphabet = ["hunter2", "-secret", "p@ss.", "w0rd*(x)", "hun", " ", "\n", "h", "x"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _streamed(masker, pieces) == masker.mask(text), pieces


def test_stream_holds_back_only_a_possible_start() -> None:
    out: list[str] = []
    stream = Masker(["hunter2-secret"]).stream(out.append)
    stream.write("line one\n")
    assert out == ["line one\n"]  # nothing that could start a secret: written at once
    stream.write("then hun")
    assert "".join(out) == "line one\nthen "
    stream.write("gry\n")
    assert "".join(out) == "line one\nthen hungry\n"
    stream.write("hunter2-sec")
    stream.close()
    assert "".join(out).endswith("hunter2-sec")  # never completed: released as is at the end


def test_stream_without_secrets_passes_through() -> None:
    out: list[str] = []
    stream = Masker([]).stream(out.append)
    stream.write("a")
    stream.write("b")
    stream.close()
    assert out == ["a", "b"]
