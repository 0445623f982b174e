"""The consumption SMS, pure part: exact texts, masking, money, dedup, rate limits."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing import redact
from clearing.codes import (
    CardColour,
    CardKind,
    CardState,
    InstitutionType,
    InsuranceCategory,
    ResultCode,
)
from clearing.model import (
    AccountCredited,
    CardIssued,
    CardStateChanged,
    Event,
    PersonCancelled,
    PersonRegistered,
    PhoneSet,
    Refunded,
    SwipeApproved,
    SwipeDeclined,
    SwipeReversed,
)
from clearing.redact import CardTokens, Redaction, Sealer
from stream_jobs import sms_core
from stream_jobs.sms import TEMPLATES_FILE
from stream_jobs.sms_core import (
    ALERT_INTERVAL_MS,
    SENDS_PER_WINDOW_MAX,
    SETTLED_IDS_REMEMBERED_MAX,
    SMS_MAX_AGE_MS,
    Context,
    Kind,
    Outcome,
    PersonSms,
    TemplateError,
)

SSN = "11010519491231002X"
REDACTION = Redaction(
    CardTokens(b"t" * 32), Sealer(redact.CONTACT, b"c" * 32), Sealer(redact.PERSON, b"p" * 32)
)
PHONE = "13812345678"
PHARMACY = "310101P00002"
UTC = dt.UTC


def beijing_ms(year: int, month: int, day: int, hour: int, minute: int) -> int:
    moment = dt.datetime(year, month, day, hour, minute, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    return int(moment.timestamp() * 1000)


T0 = beijing_ms(2026, 11, 22, 10, 31)
CONTACT = Sealer(redact.CONTACT, b"c" * 32)
CONTEXT = Context(
    sms_core.parse_templates(TEMPLATES_FILE.read_text(encoding="utf-8")),
    CONTACT,
    {PHARMACY: "老百姓大药房第1分店", "310101H00001": "瑞金医院"},
)


def with_phone(phone: str) -> PersonSms:
    """A phone-book entry as the job keeps it: the phone sealed under the contact key."""
    return PersonSms(phone_sealed=CONTACT.seal({"phone": phone}, "test") if phone else "")


PERSON = with_phone(PHONE)


def approved(n: int = 1, at_ms: int = T0, account: int = 3520, cash: int = 0) -> SwipeApproved:
    return SwipeApproved(
        f"T1:{n:06d}#0",
        at_ms,
        SSN,
        f"T1:{n:06d}",
        "",
        PHARMACY,
        InstitutionType.PHARMACY,
        account + cash,
        account,
        cash,
        123456,
        20_000,
        card_ref="ct_x",
        card_masked="*****5678",
    )


def declined(n: int, at_ms: int, result: ResultCode = ResultCode.CARD_LOST) -> SwipeDeclined:
    return SwipeDeclined(
        f"T9:{n:06d}#0",
        at_ms,
        SSN,
        f"T9:{n:06d}",
        "",
        PHARMACY,
        8800,
        result,
        card_ref="ct_x",
        card_masked="*****5678",
    )


def state_change(op: str, at_ms: int = T0, deadline_ms: int = 0) -> CardStateChanged:
    return CardStateChanged(
        f"W1:{op}#0",
        at_ms,
        SSN,
        "",
        op,
        CardState.ACTIVE,
        CardState.PRE_LOST,
        "",
        deadline_ms,
        card_ref="ct_x",
        card_masked="*****5678",
    )


def send(event: Event, state: PersonSms = PERSON, now_ms: int = T0) -> sms_core.Decision:
    return sms_core.decide(state, event, CONTEXT, now_ms)


# ---------------------------------------------------------------------------- texts


def test_consumption_text_is_exact() -> None:
    decision = send(approved())
    assert decision.outcome == Outcome.SEND and decision.sms is not None
    assert decision.sms.text == (
        "【医保】您尾号5678的社保卡于11月22日10:31在老百姓大药房第1分店"
        "医保个人账户支出35.20元，余额1234.56元。"
    )
    assert decision.sms.message_id == "T1:000001#0"
    assert decision.sms.destination == "86" + PHONE
    assert decision.sms.phone_masked == "138****5678"
    assert decision.sms.kind == Kind.CONSUMPTION


def test_consumption_with_cash_names_both_parts() -> None:
    sms = send(approved(account=5, cash=1000)).sms
    assert sms is not None
    assert sms.text == (
        "【医保】您尾号5678的社保卡于11月22日10:31在老百姓大药房第1分店"
        "医保个人账户支出0.05元，现金支付10.00元，余额1234.56元。"
    )


def test_reversal_and_refund_texts() -> None:
    at = beijing_ms(2026, 1, 5, 9, 7)
    reversal = SwipeReversed(
        "T1:2#0",
        at,
        SSN,
        "T1:2",
        "T1:1",
        "",
        PHARMACY,
        3520,
        126976,
        20_000,
        card_ref="ct_x",
        card_masked="*****5678",
    )
    refund = Refunded(
        "T1:3#0",
        at,
        SSN,
        "T1:3",
        "T1:1",
        "",
        "310101H00001",
        100,
        127076,
        card_ref="ct_x",
        card_masked="*****5678",
    )
    assert send(reversal, now_ms=at).sms.text == (  # type: ignore[union-attr]
        "【医保】您尾号5678的社保卡于1月5日09:07在老百姓大药房第1分店的一笔消费已冲正，"
        "35.20元已退回医保个人账户，余额1269.76元。"
    )
    assert send(refund, now_ms=at).sms.text == (  # type: ignore[union-attr]
        "【医保】您尾号5678的社保卡于1月5日09:07在瑞金医院退费1.00元，已退回医保个人账户，"
        "余额1270.76元。"
    )


def test_unknown_institution_is_named_by_its_id() -> None:
    event = replace(approved(), institution_id="310101P77777")
    assert "在310101P77777医保个人账户" in send(event).sms.text  # type: ignore[union-attr]


def test_beijing_time_crosses_midnight_and_drops_leading_zeros() -> None:
    utc_evening = int(dt.datetime(2026, 1, 5, 23, 59, tzinfo=UTC).timestamp() * 1000)
    assert sms_core.beijing_time(utc_evening) == "1月6日07:59"
    assert sms_core.beijing_time(beijing_ms(2026, 12, 31, 0, 0)) == "12月31日00:00"


def test_card_status_texts() -> None:
    deadline = beijing_ms(2026, 11, 26, 0, 0)
    pre_loss = send(state_change("report_pre_loss", deadline_ms=deadline)).sms
    assert pre_loss is not None and pre_loss.kind == Kind.CARD_STATE
    assert pre_loss.text == (
        "【医保】您尾号5678的社保卡已于11月22日10:31临时挂失，医保结算已停止。"
        "临时挂失将于11月26日00:00自动解除，如需继续挂失请在此前到服务网点办理正式挂失。"
    )
    lock = send(state_change("lock")).sms
    assert lock is not None and lock.text.startswith("【医保】您尾号5678的社保卡因密码连续输错")
    for op in ("confirm_loss", "release", "pre_loss_lapsed", "apply_replacement", "unlock"):
        assert send(state_change(op)).outcome == Outcome.SEND, op
    # ops without a template send nothing (activation at the window, the old card of a 补卡)
    for op in ("activate", "cancel"):
        assert send(state_change(op)).outcome == Outcome.NOT_NOTIFIABLE, op


def test_replacement_card_issued() -> None:
    new = CardIssued(
        "W1:r#1",
        T0,
        SSN,
        "",
        CardKind.SOCIAL_SECURITY,
        CardColour.BLUE,
        CardState.ISSUED,
        card_ref="ct_new",
        card_masked="*****4321",
        replaces_card_ref="ct_x",
    )
    assert send(new).sms.text == (  # type: ignore[union-attr]
        "【医保】您的新社保卡（尾号4321）已于11月22日10:31制发，原卡已注销。新卡启用后即可使用。"
    )
    first = replace(new, replaces_card_ref="")
    assert send(first).outcome == Outcome.NOT_NOTIFIABLE


def test_refused_swipes_alert_only_for_cardholder_facing_codes() -> None:
    lost = send(declined(1, T0)).sms
    assert lost is not None and lost.kind == Kind.ALERT
    assert lost.text == (
        "【医保】您尾号5678的社保卡（已挂失）于11月22日10:31在老百姓大药房第1分店"
        "有一笔88.00元的交易被拒绝。如有疑问请致电12393。"
    )
    for code in (
        ResultCode.PIN_WRONG,
        ResultCode.INSUFFICIENT_BALANCE,
        ResultCode.DAILY_PHARMACY_LIMIT_REACHED,
    ):
        assert send(declined(2, T0, code)).outcome == Outcome.NOT_NOTIFIABLE, code


def test_no_sms_for_other_events() -> None:
    credit = AccountCredited("C1#0", T0, SSN, 10_000, "alloc-1", 133456)
    assert send(credit).outcome == Outcome.NOT_NOTIFIABLE


# ---------------------------------------------------------------------------- masking


def test_text_shows_only_the_last_four_of_the_card() -> None:
    raw = replace(approved(), card_no="A00005678", card_masked="")  # an unpublished copy
    text = send(raw).sms.text  # type: ignore[union-attr]
    assert "A00005678" not in text and "00005678" not in text
    assert "尾号5678的" in text


def test_outcome_record_has_no_phone_or_ssn_in_clear() -> None:
    sms = send(approved()).sms
    assert sms is not None
    record = sms_core.OutcomeRecord(
        sms.message_id,
        "submitted",
        T0,
        sms.kind.value,
        sms.event_at_ms,
        sms.phone_masked,
        1,
        ("m-1",),
    )
    raw = record.to_json().decode()
    assert PHONE not in raw and SSN not in raw and "138****5678" in raw


# ---------------------------------------------------------------------------- phone book


def test_phone_book_from_events_and_opt_out() -> None:
    registered = PersonRegistered("R#0", T0, SSN, "张三", InsuranceCategory.EMPLOYEE, PHONE, "x")
    state = send(registered, PersonSms()).state
    assert PHONE not in state.to_json().decode()  # the table's changelog holds it sealed
    assert CONTEXT.phone_of(state) == PHONE
    published_copy = redact.published(registered, REDACTION)
    assert published_copy.phone == "" and published_copy.phone_masked == "138****5678"
    from_published = send(published_copy, PersonSms()).state
    assert CONTEXT.phone_of(from_published) == PHONE
    assert send(approved(), state).outcome == Outcome.SEND
    opted_out = send(PhoneSet("P#0", T0, SSN, ""), state).state
    no_sms = send(approved(2), opted_out)
    assert no_sms.outcome == Outcome.NO_PHONE and no_sms.sms is None
    back = send(PhoneSet("P#1", T0, SSN, "13900000001"), opted_out).state
    assert send(approved(3), back).sms.destination == "8613900000001"  # type: ignore[union-attr]
    cancelled = send(PersonCancelled("X#0", T0, SSN, "death"), back).state
    assert send(approved(4), cancelled).outcome == Outcome.NO_PHONE


def test_no_sms_without_a_person_or_with_a_malformed_phone() -> None:
    assert sms_core.decide(None, approved(), CONTEXT, T0).outcome == Outcome.NO_PHONE
    for phone in ("", "12345", "23812345678", "1381234567x"):
        assert send(approved(), with_phone(phone)).outcome == Outcome.NO_PHONE, phone


# ---------------------------------------------------------------------------- dedup


def test_an_event_is_sent_once_however_often_it_is_delivered() -> None:
    first = send(approved())
    assert first.outcome == Outcome.SEND
    assert first.state.in_flight == ("T1:000001#0",)
    settled = sms_core.settle(first.state, "T1:000001#0")
    assert settled.in_flight == () and settled.settled == ("T1:000001#0",)
    again = send(approved(), settled)
    assert again.outcome == Outcome.DUPLICATE and again.sms is None and again.state == settled


def test_an_sms_in_flight_at_a_crash_is_sent_again_and_flagged() -> None:
    in_flight = send(approved()).state  # the marks reached the broker, the settlement did not
    redelivered = send(approved(), in_flight)
    assert redelivered.outcome == Outcome.RESEND_UNCERTAIN and redelivered.sms is not None
    assert redelivered.state == in_flight


def test_suppressed_events_are_remembered_too() -> None:
    old = send(approved(at_ms=T0 - SMS_MAX_AGE_MS - 1))
    assert old.outcome == Outcome.STALE and "T1:000001#0" in old.state.settled
    assert send(approved(at_ms=T0 - SMS_MAX_AGE_MS - 1), old.state).outcome == Outcome.DUPLICATE


def test_settled_ids_are_bounded() -> None:
    state = PERSON
    for n in range(SETTLED_IDS_REMEMBERED_MAX + 10):
        state = sms_core.settle(state, f"e{n}")
    assert len(state.settled) == SETTLED_IDS_REMEMBERED_MAX
    assert state.settled[-1] == f"e{SETTLED_IDS_REMEMBERED_MAX + 9}"


def test_state_round_trips_as_json() -> None:
    state = replace(send(approved()).state, last_alert_at_ms=5, cancelled=True)
    assert PersonSms.from_json(state.to_json()) == state


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.booleans()), min_size=1, max_size=60))
def test_redelivery_in_any_order_sends_each_id_at_most_once(
    deliveries: list[tuple[int, bool]],
) -> None:
    """Events delivered again and again; `crash` = the settlement was lost (the job died
    between submit and flush): only then may an id be sent a second time, and flagged."""
    state = PERSON
    plain_sends: dict[str, int] = {}
    for n, crash in deliveries:
        event = approved(n, at_ms=T0 + n)
        decision = send(event, state)
        if decision.outcome == Outcome.SEND:
            plain_sends[event.event_id] = plain_sends.get(event.event_id, 0) + 1
        if decision.sms is not None:
            state = decision.state if crash else sms_core.settle(decision.state, event.event_id)
        else:
            state = decision.state
    assert all(count == 1 for count in plain_sends.values())


# ---------------------------------------------------------------------------- rate limits


def test_many_refusals_on_a_stolen_card_make_one_alert_per_interval() -> None:
    state = PERSON
    outcomes = []
    for n in range(20):  # one try every 20 s for 6 min 20 s
        decision = send(declined(n, T0 + n * 20_000), state)
        state = decision.state
        if decision.sms is not None:
            state = sms_core.settle(state, decision.sms.message_id)
        outcomes.append(decision.outcome)
    assert outcomes.count(Outcome.SEND) == 1
    assert outcomes.count(Outcome.RATE_LIMITED) == 19
    later = send(declined(99, T0 + ALERT_INTERVAL_MS), state)
    assert later.outcome == Outcome.SEND
    # consumption SMS are not held back by the alert interval
    assert send(approved(at_ms=T0 + 30_000), state).outcome == Outcome.SEND


def test_flood_guard_caps_sends_per_window_but_not_card_status_changes() -> None:
    state = PERSON
    for n in range(SENDS_PER_WINDOW_MAX):
        decision = send(approved(n, at_ms=T0 + n * 1000), state)
        assert decision.outcome == Outcome.SEND
        state = sms_core.settle(decision.state, decision.sms.message_id)  # type: ignore[union-attr]
    over = send(approved(999, at_ms=T0 + 60_000), state)
    assert over.outcome == Outcome.RATE_LIMITED
    assert send(state_change("report_pre_loss", T0 + 61_000), over.state).outcome == Outcome.SEND
    next_hour = send(approved(1000, at_ms=T0 + 3_700_000), over.state)
    assert next_hour.outcome == Outcome.SEND


def test_rate_decisions_follow_event_time_not_arrival() -> None:
    """A redelivered batch decided later (wall clock) gives the same answers."""
    first = send(declined(1, T0), PERSON, now_ms=T0)
    again = send(declined(1, T0), PERSON, now_ms=T0 + 3_600_000)
    assert first.outcome == again.outcome == Outcome.SEND


# ---------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[swipe]\napproved='x'", "lacks"),
        (
            "[swipe]\napproved='{cardd}'\napproved_with_cash='x'\nreversed='x'\nrefunded='x'",
            "bad placeholder",
        ),
        (
            "[swipe]\napproved='x'\napproved_with_cash='x'\nreversed='x'\nrefunded='x'\n"
            "[decline]\nCARD_STOLEN='x'",
            "ResultCode",
        ),
        ("signature = [", "not TOML"),
    ],
)
def test_bad_templates_are_refused_at_load(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        sms_core.parse_templates(text)


def test_receipt_text_is_parsed() -> None:
    text = "id:abc-12 sub:001 dlvrd:001 submit date:2611221031 done date:2611221031 stat:DELIVRD err:000 text:"  # noqa: E501
    assert sms_core.parse_receipt(text) == ("abc-12", "DELIVRD")
    assert sms_core.parse_receipt("hello") is None
