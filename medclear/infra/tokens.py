"""The keys of published data (clearing/redact.py), each a secret of its own:

- the card-token key: every process that names cards or persons in published data;
- the contact data key: names and phones, sealed by the worker, opened by the sms job;
- the person data key: social security numbers, sealed by the worker, opened by the
  pre-loss timer and by the gateway and registry (the card index).

A setting (hex, `MEDCLEAR_CARD_TOKEN_KEY`, `MEDCLEAR_CONTACT_DATA_KEY`,
`MEDCLEAR_PERSON_DATA_KEY`) wins; otherwise `<state_dir>/keys/<name>.key`, created on first
use, owner-readable only. Creation is race-free: the key is written to a private
temporary file and hard-linked into place, so when several processes start at once the
first link wins and everyone reads that one. Each process loads only the keys it needs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from clearing.redact import (
    CARD_TOKEN_KEY_BYTES,
    CONTACT,
    DATA_KEY_BYTES,
    PERSON,
    CardTokens,
    Redaction,
    Sealer,
)
from medclear.errors import MedclearError
from medclear.infra.settings import Settings


class TokenKeyError(MedclearError):
    """The card-token key is missing or malformed."""


def card_token_key_file(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve() / "keys" / "card-token.key"


def data_key_file(settings: Settings, purpose: str) -> Path:
    return settings.state_dir.expanduser().resolve() / "keys" / f"{purpose}.key"


def _read(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError as exc:
        raise TokenKeyError(f"{path}: not hex") from exc
    if len(key) < 16:
        raise TokenKeyError(f"{path}: a key has at least 16 bytes")
    return key


def ensure_key_file(path: Path, size: int = CARD_TOKEN_KEY_BYTES) -> bytes:
    """The key in `path`, made (`size` random bytes, hex) if there is none."""
    if path.exists():
        return _read(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(size) + "\n")
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
    return CardTokens(ensure_key_file(card_token_key_file(settings)))


def load_sealer(settings: Settings, purpose: str) -> Sealer:
    """The data key of `purpose` (redact.CONTACT or redact.PERSON)."""
    given = getattr(settings, f"{purpose}_data_key").get_secret_value()
    try:
        key = bytes.fromhex(given) if given else None
    except ValueError as exc:
        raise TokenKeyError(f"MEDCLEAR_{purpose.upper()}_DATA_KEY: {exc}") from exc
    if key is None:
        key = ensure_key_file(data_key_file(settings, purpose), DATA_KEY_BYTES)
    try:
        return Sealer(purpose, key)
    except ValueError as exc:
        raise TokenKeyError(f"the {purpose} data key: {exc}") from exc


def load_redaction(settings: Settings) -> Redaction:
    """Every key of published data: the clearing worker's, which seals."""
    return Redaction(
        load_card_tokens(settings), load_sealer(settings, CONTACT), load_sealer(settings, PERSON)
    )
