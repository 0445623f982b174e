"""What leaves the aggregate: events as published, with personal data replaced.

The core's events carry full card numbers, the social security number, the name and the
phone, because applying them needs them. The copy published on the `events` topic (and
everything downstream: ClickHouse, SMS, timers, analysts, anyone with kcat) carries:

- for a card: a *card token* (a keyed hash of the number, stable, so a card's history can
  be joined) and the masked number (last 4) for people to read;
- for the person: a *person token* the same way (the topic's key) and the masked ssn;
- a name and a phone only masked, and sealed for the one job that needs them in clear
  (the sms job), under the *contact* data key; the ssn sealed, on a pre-loss report only,
  for the pre-loss timer (which must address its expiry command to the person), under the
  *person* data key.

Sealing is AES-256-GCM-SIV (RFC 8452, the nonce-misuse resistant mode of AES-GCM) with a
nonce derived from the event id: a redelivered event seals to the same bytes, and no
reuse of a nonce could reveal anything but that two sealed values are equal. A sealed
value names its key (`<purpose>-<check value>`), so keys can be rotated. The keys are
passed in; this module does no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from clearing import validate
from clearing.errors import ClearingError
from clearing.model import CardStateChanged, Event, PersonRegistered, PhoneSet

CARD_TOKEN_PREFIX = "ct_"
PERSON_TOKEN_PREFIX = "pt_"
CARD_TOKEN_HEX_CHARS = 24  # 96 bits: collisions are out of reach for any card population
CARD_TOKEN_KEY_BYTES = 32
CARD_TOKEN_KEY_BYTES_MIN = 16  # a shorter HMAC key is refused
DATA_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
CONTACT = "contact"  # the data key of names and phones: the worker and the sms job
PERSON = "person"  # the data key of social security numbers: worker, timer, card index

E = TypeVar("E", bound=Event)


class KeyLengthError(ClearingError, ValueError):
    """A token or data key of the wrong length (the message gives the length, never the key)."""


class CardTokens:
    """HMAC-SHA-256 of a card number under a secret key, truncated: `ct_` + 24 hex.

    A plain hash would not do: card numbers are short and structured, so every one could
    be hashed and looked up. Without the key the token says nothing about the number."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < CARD_TOKEN_KEY_BYTES_MIN:
            raise KeyLengthError(f"a card token key has at least {CARD_TOKEN_KEY_BYTES_MIN} bytes")
        self._key = key

    def card_ref(self, card_no: str) -> str:
        if not card_no:
            return ""
        digest = hmac.new(self._key, b"card:" + card_no.encode(), hashlib.sha256).hexdigest()
        return CARD_TOKEN_PREFIX + digest[:CARD_TOKEN_HEX_CHARS]

    def person_ref(self, ssn: str) -> str:
        """The same for a social security number (analysts' copies join on it)."""
        if not ssn:
            return ""
        digest = hmac.new(self._key, b"person:" + ssn.encode(), hashlib.sha256).hexdigest()
        return PERSON_TOKEN_PREFIX + digest[:CARD_TOKEN_HEX_CHARS]

    def __repr__(self) -> str:
        return "CardTokens(<key>)"


class SealError(ClearingError, ValueError):
    """A sealed value this key cannot open: another key, or changed bytes."""


class Sealer:
    """Seals a few named strings under one data key; opens what it sealed."""

    __slots__ = ("_aead", "_nonce_key", "key_id", "purpose")

    def __init__(self, purpose: str, key: bytes) -> None:
        if len(key) != DATA_KEY_BYTES:
            raise KeyLengthError(f"a data key has {DATA_KEY_BYTES} bytes")
        self.purpose = purpose
        self._aead = AESGCMSIV(key)
        self._nonce_key = hmac.new(key, b"nonce", hashlib.sha256).digest()
        self.key_id = f"{purpose}-{hashlib.sha256(b'kcv' + key).hexdigest()[:8]}"

    def _nonce(self, context: str) -> bytes:
        return hmac.new(self._nonce_key, context.encode(), hashlib.sha256).digest()[:NONCE_BYTES]

    def _decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
        if key_id != self.key_id:
            raise SealError(f"sealed under {key_id!r}, not {self.key_id!r}")
        try:
            return self._aead.decrypt(nonce, ciphertext, key_id.encode())
        except InvalidTag as exc:
            raise SealError(f"a {self.purpose} value changed or sealed under another key") from exc

    def seal(self, fields: Mapping[str, str], context: str) -> str:
        """`<key id>:<nonce>:<ciphertext>` (base64); the same fields and context seal the
        same; a different context (an event id) gives a different nonce."""
        nonce = self._nonce(context)
        plain = json.dumps(dict(fields), ensure_ascii=False, sort_keys=True).encode()
        sealed = self._aead.encrypt(nonce, plain, self.key_id.encode())
        return f"{self.key_id}:{_b64(nonce)}:{_b64(sealed)}"

    def open(self, sealed: str) -> dict[str, str]:
        try:
            key_id, nonce, body = sealed.split(":")
            fields = json.loads(self._decrypt(key_id, _unb64(nonce), _unb64(body)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SealError(f"cannot open a {self.purpose} value: {exc}") from exc
        return {str(k): str(v) for k, v in fields.items()}

    def seal_bytes(self, plain: bytes, context: str) -> bytes:
        """A whole record sealed (a reply on its way to its gateway): `<key id>:<nonce>:`
        and the raw ciphertext."""
        nonce = self._nonce(context)
        head = f"{self.key_id}:{_b64(nonce)}:".encode()
        return head + self._aead.encrypt(nonce, plain, self.key_id.encode())

    def open_bytes(self, sealed: bytes) -> bytes:
        try:
            key_id, nonce, body = sealed.split(b":", 2)
            return self._decrypt(key_id.decode(), _unb64(nonce.decode()), body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SealError(f"cannot open a {self.purpose} record: {exc}") from exc

    def __repr__(self) -> str:
        return f"Sealer({self.key_id})"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Redaction:
    """The keys an event is published with."""

    tokens: CardTokens
    contact: Sealer
    person: Sealer


def published(event: E, redaction: Redaction) -> E:
    """The event as the `events` topic carries it: no full card number, no social
    security number, no name and no phone number in clear in any field."""
    if event.person_ref:  # published already
        return event
    changes: dict[str, object] = {
        "ssn": "",
        "person_ref": redaction.tokens.person_ref(event.ssn),
        "ssn_masked": validate.mask_ssn(event.ssn),
    }
    card_no: str = getattr(event, "card_no", "")
    if card_no:
        changes.update(
            card_no="",
            card_ref=redaction.tokens.card_ref(card_no),
            card_masked=validate.mask_card(card_no),
        )
        replaces: str = getattr(event, "replaces_card_no", "")
        if replaces:
            changes.update(
                replaces_card_no="", replaces_card_ref=redaction.tokens.card_ref(replaces)
            )
    if isinstance(event, PersonRegistered):
        changes.update(
            name="",
            phone="",
            name_masked=validate.mask_name(event.name),
            phone_masked=validate.mask_phone(event.phone),
            sealed=redaction.contact.seal(
                {"name": event.name, "phone": event.phone}, event.event_id
            ),
        )
    elif isinstance(event, PhoneSet):
        sealed = redaction.contact.seal({"phone": event.phone}, event.event_id)
        changes.update(phone="", phone_masked=validate.mask_phone(event.phone), sealed=sealed)
    elif isinstance(event, CardStateChanged) and event.op == "report_pre_loss":
        changes.update(sealed=redaction.person.seal({"ssn": event.ssn}, event.event_id))
    return replace(event, **changes)  # type: ignore[arg-type]


def card_index_record(card_no: str, ssn: str, redaction: Redaction) -> tuple[bytes, bytes]:
    """A `card-index` record for a card: key its token, value the owner's ssn sealed under
    the person key (the topic holds no card number and no ssn in clear)."""
    card_ref = redaction.tokens.card_ref(card_no)
    return card_ref.encode(), redaction.person.seal({"ssn": ssn}, card_ref).encode()


def card_index_owner(value: bytes, person: Sealer) -> str:
    """The ssn of a `card-index` record's value (SealError if it is not one of ours)."""
    return person.open(value.decode())["ssn"]
