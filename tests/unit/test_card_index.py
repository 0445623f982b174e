"""The card index's bound: a full index takes no new card and never calls a card it does
not hold unknown. (Following the topic is tested against a real broker by the stack's
integration tests.)"""

from __future__ import annotations

import asyncio

import pytest

from clearing.codes import ResultCode
from clearing.redact import CONTACT, PERSON, CardTokens, Redaction, Sealer, card_index_record
from medclear.infra.card_index import CardIndex, CardIndexFull
from medclear.infra.kafka_access import KafkaAccess

KEYS = Redaction(CardTokens(b"t" * 32), Sealer(CONTACT, b"c" * 32), Sealer(PERSON, b"p" * 32))
NOWHERE = KafkaAccess("127.0.0.1:1", "nobody", None)  # never reached by these tests


def index(entries_max: int) -> CardIndex:
    return CardIndex(NOWHERE, KEYS.tokens, KEYS.person, entries_max=entries_max)


def add(cards: CardIndex, card_no: str, ssn: str) -> None:
    cards.add(*card_index_record(card_no, ssn, KEYS))


def test_a_full_index_keeps_what_it_holds_and_refuses_to_guess() -> None:
    cards = index(entries_max=2)
    add(cards, "A00000001", "11010519491231002X")
    add(cards, "A00000002", "110105194912310038")
    assert not cards.full
    add(cards, "A00000001", "11010519491231002X")  # a record again (compaction): no growth
    assert not cards.full
    add(cards, "A00000003", "110105194912310046")
    assert cards.full and cards.owner_now("A00000003") is None
    assert asyncio.run(cards.resolve("A00000002")) == "110105194912310038"
    with pytest.raises(CardIndexFull):
        asyncio.run(cards.resolve("A00000003"))
    assert asyncio.run(cards.owner_of("A00000003")) == ("", ResultCode.UNAVAILABLE)
    assert asyncio.run(cards.owner_of("A00000002")) == ("110105194912310038", ResultCode.OK)


def test_a_record_sealed_under_another_key_is_not_indexed() -> None:
    cards = index(entries_max=10)
    other = Redaction(KEYS.tokens, KEYS.contact, Sealer(PERSON, b"q" * 32))
    cards.add(*card_index_record("A00000001", "11010519491231002X", other))
    assert cards.owner_now("A00000001") is None and not cards.full
