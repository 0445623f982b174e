"""What leaves the aggregate: events as published, with card numbers replaced.

The core's events carry full card numbers because applying them needs them. The copy
published on the `events` topic (and everything downstream: ClickHouse, SMS, timers,
analysts) carries instead a *card token* — a keyed hash of the number, stable, so a card's
history can be joined — and the masked number for people to read. The key is passed in
(`CardTokens`); this module does no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from typing import TypeVar

from clearing import validate
from clearing.model import Event

CARD_TOKEN_PREFIX = "ct_"
PERSON_TOKEN_PREFIX = "pt_"
CARD_TOKEN_HEX_CHARS = 24  # 96 bits: collisions are out of reach for any card population
CARD_TOKEN_KEY_BYTES = 32

E = TypeVar("E", bound=Event)


class CardTokens:
    """HMAC-SHA-256 of a card number under a secret key, truncated: `ct_` + 24 hex.

    A plain hash would not do: card numbers are short and structured, so every one could
    be hashed and looked up. Without the key the token says nothing about the number."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a card token key has at least 16 bytes")
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


def published(event: E, tokens: CardTokens) -> E:
    """The event as the `events` topic carries it: no full card number in any field."""
    if not hasattr(event, "card_no"):
        return event
    card_no: str = event.card_no
    changes = {"card_no": "", "card_ref": tokens.card_ref(card_no),
               "card_masked": validate.mask_card(card_no)}  # fmt: skip
    replaces: str = getattr(event, "replaces_card_no", "")
    if replaces:
        changes.update(replaces_card_no="", replaces_card_ref=tokens.card_ref(replaces))
    return replace(event, **changes)  # type: ignore[arg-type]
