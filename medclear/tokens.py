"""The card-token key: one secret shared by every process that names cards in published data.

`MEDCLEAR_CARD_TOKEN_KEY` (hex) wins; otherwise `<state_dir>/keys/card-token.key`, created
on first use, owner-readable only. Creation is race-free: the key is written to a private
temporary file and hard-linked into place, so when several processes start at once the
first link wins and everyone reads that one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from clearing.redact import CARD_TOKEN_KEY_BYTES, CardTokens
from medclear.settings import Settings


class TokenKeyError(RuntimeError):
    """The card-token key is missing or malformed."""


def card_token_key_file(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve() / "keys" / "card-token.key"


def _read(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError as exc:
        raise TokenKeyError(f"{path}: not hex") from exc
    if len(key) < 16:
        raise TokenKeyError(f"{path}: a card-token key has at least 16 bytes")
    return key


def ensure_card_token_key(path: Path) -> bytes:
    if path.exists():
        return _read(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(CARD_TOKEN_KEY_BYTES) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)  # atomic: the first process to get here wins
    finally:
        temporary.unlink(missing_ok=True)
    return _read(path)


def load_card_tokens(settings: Settings) -> CardTokens:
    given = settings.card_token_key.get_secret_value()
    if given:
        try:
            return CardTokens(bytes.fromhex(given))
        except ValueError as exc:
            raise TokenKeyError(f"MEDCLEAR_CARD_TOKEN_KEY: {exc}") from exc
    return CardTokens(ensure_card_token_key(card_token_key_file(settings)))
