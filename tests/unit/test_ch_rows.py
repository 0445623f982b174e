"""The ClickHouse row of every event type: complete, in column order, and never holding a
card number, a social security number, a name or a phone number in clear."""

from __future__ import annotations

import datetime as dt
import json
import typing
from typing import Any

import pytest

from clearing import codec, model
from clearing.codes import (
    CardColour,
    CardKind,
    CardState,
    InstitutionType,
    InsuranceCategory,
    ResultCode,
)
from clearing.redact import CONTACT, PERSON, CardTokens, Redaction, Sealer, published
from stream_jobs import ch
from stream_jobs.clickhouse_sink import classify

SSN = "11010519491231002X"
CARD = "A87654321"
NEW_CARD = "B12345678"
PHONE = "13912345678"
NAME = "王小明"
AT_MS = 1_795_000_000_000  # 2026-11-18 19:06:40 Beijing
TOKENS = CardTokens(b"t" * 32)
REDACTION = Redaction(TOKENS, Sealer(CONTACT, b"c" * 32), Sealer(PERSON, b"p" * 32))


def all_events() -> list[model.Event]:
    common: dict[str, Any] = {"at_ms": AT_MS, "ssn": SSN}
    events: list[model.Event] = [
        model.PersonRegistered(
            "r:1#0",
            name=NAME,
            category=InsuranceCategory.EMPLOYEE,
            phone=PHONE,
            region="310101",
            **common,
        ),
        model.CardIssued(
            "r:2#0",
            card_no=NEW_CARD,
            kind=CardKind.SOCIAL_SECURITY,
            colour=CardColour.BLUE,
            state=CardState.ISSUED,
            replaces_card_no=CARD,
            **common,
        ),
        model.CardStateChanged(
            "r:3#0",
            card_no=CARD,
            op="report_pre_loss",
            old_state=CardState.ACTIVE,
            new_state=CardState.PRE_LOST,
            reason="lost on the bus",
            deadline_ms=AT_MS + 1000,
            **common,
        ),
        model.PinChanged("r:4#0", card_no=CARD, pvv="00ff00ff00ff00ff", **common),
        model.AccountCredited(
            "r:5#0",
            amount_fen=100_00,
            source_id="alloc-2026-11",
            balance_after_fen=150_00,
            **common,
        ),
        model.SwipeApproved(
            "T1:6#0",
            request_id="T1:6",
            card_no=CARD,
            institution_id="P1",
            institution_type=InstitutionType.PHARMACY,
            amount_fen=35_20,
            paid_from_account_fen=30_00,
            paid_in_cash_fen=5_20,
            balance_after_fen=0,
            day=20_411,
            **common,
        ),
        model.SwipeDeclined(
            "T1:7#0",
            request_id="T1:7",
            card_no=CARD,
            institution_id="P1",
            amount_fen=10_00,
            result=ResultCode.PIN_WRONG,
            pin_wrong=True,
            **common,
        ),
        model.SwipeReversed(
            "T1:8#0",
            request_id="T1:8",
            original_request_id="T1:6",
            card_no=CARD,
            institution_id="P1",
            amount_fen=30_00,
            balance_after_fen=30_00,
            original_day=20_410,
            **common,
        ),
        model.ReversalUnmatched(
            "T1:9#0", request_id="T1:9", original_request_id="T1:99", card_no=CARD, **common
        ),
        model.Refunded(
            "T1:10#0",
            request_id="T1:10",
            original_request_id="T1:6",
            card_no=CARD,
            institution_id="P1",
            amount_fen=5_00,
            balance_after_fen=35_00,
            **common,
        ),
        model.PinTriesReset("r:14#0", card_no=CARD, **common),
        model.PharmacyLimitSet("r:11#0", card_no=CARD, swipes_per_day=3, **common),
        model.PhoneSet("r:12#0", phone=PHONE, **common),
        model.PersonCancelled("r:13#0", reason="deceased", **common),
    ]
    return events


def test_every_event_type_is_covered() -> None:
    assert {type(e) for e in all_events()} == set(typing.get_args(model.Event))
    assert set(ch.EVENT_TYPES) == set(typing.get_args(model.Event))


@pytest.mark.parametrize("as_published", [True, False], ids=["published", "unpublished"])
@pytest.mark.parametrize("event", all_events(), ids=lambda e: type(e).__name__)
def test_a_row_holds_no_clear_identifier(event: model.Event, as_published: bool) -> None:
    if as_published:
        event = published(event, REDACTION)
    row = ch.event_row(event, TOKENS)
    assert len(row) == len(ch.COLUMNS)
    cells = dict(zip(ch.COLUMNS, row, strict=True))
    text = json.dumps([str(c) for c in row], ensure_ascii=False)
    for secret in (SSN, CARD, NEW_CARD, PHONE, NAME, "00ff00ff00ff00ff", SSN[6:14]):
        assert secret not in text, (type(event).__name__, secret)
    assert cells["event_id"] == event.event_id
    assert cells["event_type"] == type(event).__name__
    assert cells["at_ms"] == AT_MS and cells["at"] == AT_MS // 1000
    assert cells["day"] == dt.date(2026, 11, 18)
    assert cells["person_ref"] == TOKENS.person_ref(SSN)
    assert cells["ssn_masked"] == "110105********002X"
    if hasattr(event, "card_no"):
        card = NEW_CARD if isinstance(event, model.CardIssued) else CARD
        assert cells["card_ref"] == TOKENS.card_ref(card)
        assert cells["card_masked"] in ("*****4321", "*****5678")
    json.loads(cells["detail"])  # valid JSON
    for name in ("amount_fen", "paid_from_account_fen", "balance_after_fen", "result"):
        assert type(cells[name]) is int


def test_money_day_and_result_columns() -> None:
    rows = {
        r[0]: dict(zip(ch.COLUMNS, r, strict=True))
        for r in (ch.event_row(published(e, REDACTION), TOKENS) for e in all_events())
    }
    approved = rows["T1:6#0"]
    assert (approved["amount_fen"], approved["paid_from_account_fen"]) == (35_20, 30_00)
    assert approved["paid_in_cash_fen"] == 5_20 and approved["institution_type"] == 3
    assert approved["result"] == ResultCode.PARTIALLY_APPROVED
    assert rows["T1:7#0"]["result"] == ResultCode.PIN_WRONG
    assert rows["T1:9#0"]["result"] == ResultCode.ORIGINAL_NOT_FOUND
    reversed_ = rows["T1:8#0"]
    assert reversed_["original_day"] == ch.day_date(20_410) != reversed_["day"]
    assert reversed_["original_request_id"] == "T1:6"
    assert rows["T1:10#0"]["original_day"] == rows["T1:10#0"]["day"]
    assert rows["r:5#0"]["amount_fen"] == 100_00 and rows["r:5#0"]["result"] == ResultCode.OK
    issued = json.loads(rows["r:2#0"]["detail"])
    assert issued["replaces_card_ref"] == TOKENS.card_ref(CARD)
    assert issued["state"] == "ISSUED"
    registered = json.loads(rows["r:1#0"]["detail"])
    assert registered["name_masked"] == "王**" and registered["phone_masked"] == "139****5678"
    assert "sealed" not in registered and "name" not in registered and "phone" not in registered
    assert "pvv" not in json.loads(rows["r:4#0"]["detail"])
    assert json.loads(rows["r:12#0"]["detail"]) == {"phone_masked": "139****5678"}


def test_records_that_are_not_events_are_classified_for_skipping() -> None:
    event = published(all_events()[5], REDACTION)
    assert classify(codec.encode(event)) == event
    assert classify(b"\xff not json") == "undecodable"
    assert classify(b'{"@": "NoSuchRecord"}') == "undecodable"
    assert classify(None) == "undecodable"
    assert classify(codec.encode(model.Reply("x", ResultCode.OK))) == "not_event"


def _rerunnable(statements: list[str]) -> bool:
    """Each statement can run again after a crash: a CREATE is IF NOT EXISTS unless the
    migration drops that table (IF EXISTS) just before; a DROP is IF EXISTS unless the
    migration itself renamed that table into being (a rebuild, as 530)."""
    dropped: set[str] = set()
    renamed: set[str] = set()
    for statement in statements:
        words = statement.split()
        head = " ".join(words[:2]).upper()
        if head == "DROP TABLE":
            if "IF EXISTS" in statement:
                dropped.add(words[-1])
            elif words[-1] not in renamed:
                return False
        elif head == "CREATE TABLE" and "IF NOT EXISTS" not in statement:
            if words[2] not in dropped:
                return False
        elif head == "RENAME TABLE":
            renamed |= {w.rstrip(",") for w in words[2:] if w != "TO"}
        elif head.startswith("CREATE") and "IF NOT EXISTS" not in statement:
            return False
    return True


def test_migration_files_split_into_statements() -> None:
    found = ch.migrations()
    assert [m.name for m in found] == sorted(m.name for m in found)
    assert found[0].name == "001_events.sql"
    for migration in found:
        statements = migration.statements()
        assert statements and all(";" not in s.splitlines()[-1] for s in statements)
        assert _rerunnable(statements), migration.name
    assert ch.split_statements("-- a; comment\nSELECT 1;\nSELECT\n  2;\n") == [
        "SELECT 1",
        "SELECT\n  2",
    ]


def test_database_of_a_url() -> None:
    assert ch.database_of("clickhouse://127.0.0.1:9000/medclear") == "medclear"
    assert ch.database_of("clickhouse://127.0.0.1:9000", default="x") == "x"
    with pytest.raises(ValueError):
        ch.database_of("clickhouse://127.0.0.1:9000/bad-name")
