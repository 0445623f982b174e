from __future__ import annotations

import dataclasses
import json
from enum import Enum, IntEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearing import codec, core
from clearing.abnormal import Alert, AlertKind
from clearing.money import format_yuan, parse_yuan
from clearing.validate import is_ssn, mask_card, mask_ssn, ssn_check_char
from tests.unit.conftest import POLICY, make_person, simulated_records, swipe


def test_person_and_every_event_round_trip() -> None:
    person = make_person()
    new, decision = core.handle(person, swipe(), POLICY)
    for record in (person, new, decision.reply, *decision.events, swipe()):
        assert codec.decode(codec.encode(record)) == record


def test_empty_defaults_are_left_out_and_others_always_written() -> None:
    person = make_person()
    new, decision = core.handle(person, swipe(), POLICY)
    text = codec.encode(new).decode()
    card = json.loads(text)["cards"][0]
    # a card's daily pharmacy limit defaults to a named constant: always written, so a
    # stored card never takes a new value from a changed constant
    assert card["pharmacy_swipes_per_day"] == new.cards[0].pharmacy_swipes_per_day
    assert "state_before_pre_loss" in card and "initial_pin" in card
    assert "pre_loss_deadline_ms" not in card and "expires_at_ms" not in card
    reply = json.loads(codec.encode(decision.reply))
    assert "snapshot" not in reply and "replayed" not in reply
    assert len(codec.encode(new)) < len(json.dumps(dataclasses.asdict(new)))
    # a record with every empty field written (the format before) still reads the same
    verbose = {**dataclasses.asdict(decision.reply), "@": "Reply"}
    assert codec.decode(json.dumps(verbose).encode()) == decision.reply


def _reference_plain(value: object) -> object:
    """The format as the first codec wrote it, by reflection on every value: the planned
    codec must write the same bytes, so every stored changelog and event stays readable."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        plain = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            default = field.default
            empty_default = default is not dataclasses.MISSING and (
                default is None
                or (isinstance(default, Enum) and default.value == 0)
                or (type(default) in (int, str, bool, tuple) and not default)
            )
            empty_item = (
                item is None
                or (isinstance(item, Enum) and item.value == 0)
                or (type(item) in (int, str, bool, tuple) and not item)
            )
            if not (empty_default and empty_item):
                plain[field.name] = _reference_plain(item)
        return plain
    if isinstance(value, tuple):
        return [_reference_plain(v) for v in value]
    return int(value) if isinstance(value, IntEnum) else value


def test_the_planned_codec_writes_the_reference_format_for_a_simulated_city() -> None:
    records = simulated_records(seed=11, persons=60, days=3)
    records.append(
        Alert(
            "e1/blocked",
            AlertKind.BLOCKED_CARD_USED,
            1,
            "pt_1",
            "ct_1",
            "S0****01",
            "310101P00001",
            "T1",
            "挂失卡刷卡",
        )
    )
    kinds = {type(r).__name__ for r in records}
    assert kinds >= {
        "Person",
        "Reply",
        "Authorize",
        "SwipeApproved",
        "SwipeDeclined",
        "CardStateChanged",
        "AccountCredited",
        "Alert",
    }
    for record in records:
        expected = {**_reference_plain(record), "@": type(record).__name__}  # type: ignore[dict-item]
        raw = codec.encode(record)
        assert raw == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
        assert codec.decode(raw) == record


def test_garbage_is_a_codec_error() -> None:
    for raw in (b"", b"{}", b'{"@":"Nope"}', b"\xff\xfe", b'{"@":"Person","ssn":1}'):
        with pytest.raises(codec.CodecError):
            codec.decode(raw)


@pytest.mark.parametrize(
    ("text", "fen"), [("12.50", 1250), ("0.01", 1), ("7", 700), ("1234.5", 123450)]
)
def test_parse_yuan(text: str, fen: int) -> None:
    assert parse_yuan(text) == fen


@pytest.mark.parametrize("text", ["1.001", "-1", "abc", "NaN", "inf", ""])
def test_parse_yuan_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_yuan(text)


@given(st.integers(min_value=0, max_value=10**12))
def test_format_then_parse_is_identity(fen: int) -> None:
    assert parse_yuan(format_yuan(fen)) == fen


def test_ssn_check_and_masks() -> None:
    assert ssn_check_char("11010519491231002") == "X"
    assert is_ssn("11010519491231002X") and not is_ssn("110105194912310021")
    assert mask_ssn("11010519491231002X") == "110105********002X"
    assert mask_card("S26000123") == "*****0123"
