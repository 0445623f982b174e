"""Settlement per institution per Shanghai day, cut-off and adjustment lines, idempotency,
conservation, and the reconciliation (对账) comparisons: clearing/settlement.py."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing import reconciliation as r
from clearing import settlement as s
from clearing.calendar import HOUR_MS, day_start_ms, shanghai_day
from clearing.codes import InstitutionType
from clearing.model import AccountCredited, Refunded, SwipeApproved, SwipeReversed

INST = "310101P00001"
OTHER = "310101H00001"
D = shanghai_day(1_795_000_000_000)  # 2026-11-18 (Beijing)
CUTOFF = s.CUTOFF_AFTER_DAY_END_MS_DEFAULT
Settles = SwipeApproved | SwipeReversed | Refunded


def at(day: int, hour: float) -> int:
    return day_start_ms(day) + int(hour * HOUR_MS)


def approved(
    n: int, day: int = D, account: int = 10_00, cash: int = 0, inst: str = INST
) -> SwipeApproved:
    return SwipeApproved(
        f"T1:{n}#0",
        at(day, 10),
        "S",
        f"T1:{n}",
        "",
        inst,
        InstitutionType.PHARMACY,
        account + cash,
        account,
        cash,
        0,
        day,
    )


def reversed_(
    n: int,
    original_day: int = D,
    returned: int = 10_00,
    hour_day: int | None = None,
    inst: str = INST,
) -> SwipeReversed:
    when = at(hour_day if hour_day is not None else original_day, 11)
    return SwipeReversed(
        f"R:{n}#0", when, "S", f"R:{n}", f"T1:{n}", "", inst, returned, 0, original_day
    )


def refunded(n: int, day: int = D, amount: int = 3_00, inst: str = INST) -> Refunded:
    return Refunded(f"F:{n}#0", at(day, 12), "S", f"F:{n}", f"T1:{n}", "", inst, amount, 0)


def entry(event: Settles) -> s.Entry:
    e = s.entry_of(event)
    assert e is not None
    return e


def run(events: list[Settles], now_ms: int) -> s.InstitutionState:
    state: s.InstitutionState | None = None
    for ev in events:
        state, _ = s.step(state, entry(ev), now_ms, CUTOFF)
    assert state is not None
    return state


def test_a_day_is_approved_minus_reversed_minus_refunded_with_counts_per_kind() -> None:
    events: list[Settles] = [
        approved(1, account=10_00, cash=2_50),
        approved(2, account=20_00),
        approved(3, account=5_00),
        reversed_(2, returned=20_00),
        refunded(1, amount=3_00),
    ]
    state = run(events, at(D, 20))
    day = state.day(D)
    assert day is not None and not day.closed
    assert (day.approved, day.reversed, day.refunded) == (
        s.Line(3, 35_00),
        s.Line(1, 20_00),
        s.Line(1, 3_00),
    )
    assert day.approved_amount_fen == 37_50
    assert day.net_fen == 35_00 - 20_00 - 3_00 == 12_00
    assert day.key == f"{INST}:2026-11-18"


def test_other_events_do_not_settle() -> None:
    assert s.entry_of(AccountCredited("C#0", at(D, 9), "S", 100_00, "src", 100_00)) is None


def test_a_refund_settles_on_its_own_day_and_a_reversal_on_the_swipe_s_day() -> None:
    events: list[Settles] = [
        approved(1),
        refunded(1, day=D + 1),
        reversed_(2, original_day=D, hour_day=D),
    ]
    state = run([approved(2), *events], at(D + 1, 1))  # before D's cut-off: D still open
    d0, d1 = state.day(D), state.day(D + 1)
    assert d0 is not None and d1 is not None
    assert d0.reversed == s.Line(1, 10_00) and d1.refunded == s.Line(1, 3_00)


def test_the_cut_off_closes_a_day_at_two_in_the_morning_and_never_before() -> None:
    state = run([approved(1)], at(D, 23.9))
    not_yet, closed = s.close_due(state, at(D + 1, 1.99), CUTOFF)
    assert closed == () and not_yet.closed_through < D
    assert not s.due_to_close(state, at(D + 1, 1.99), CUTOFF)
    assert s.due_to_close(state, at(D + 1, 2), CUTOFF)
    after, closed = s.close_due(state, at(D + 1, 2), CUTOFF)
    assert [c.day for c in closed] == [D] and closed[0].closed and after.closed_through == D
    again, closed_again = s.close_due(after, at(D + 1, 3), CUTOFF)
    assert closed_again == () and again == after


def test_a_late_reversal_goes_into_an_adjustment_line_of_the_next_open_day() -> None:
    state = run([approved(1), approved(2, account=7_00)], at(D, 15))
    state, closed = s.close_due(state, at(D + 1, 2), CUTOFF)
    final = closed[0]
    state, records = s.step(
        state,
        entry(reversed_(2, original_day=D, returned=7_00, hour_day=D + 1)),
        at(D + 1, 9),
        CUTOFF,
    )
    closed_day = state.day(D)
    assert closed_day == final and closed_day is not None and closed_day.net_fen == 17_00
    (next_day,) = records
    assert next_day.day == D + 1 and not next_day.closed
    assert next_day.adjustments == (s.Adjustment(D, s.Kind.REVERSED, 1, 7_00),)
    assert next_day.net_fen == -7_00 and next_day.own_net_fen == 0
    # a late refund whose own day closed meanwhile, and a late approval, add their lines
    state, _ = s.step(state, entry(refunded(1, day=D, amount=1_00)), at(D + 1, 9), CUTOFF)
    state, _ = s.step(state, entry(approved(9, day=D, account=4_00)), at(D + 1, 9), CUTOFF)
    d1 = state.day(D + 1)
    assert d1 is not None and d1.net_fen == -7_00 - 1_00 + 4_00
    # settlement's view of D now: the closed day plus the adjustments naming it
    totals = r.settlement_totals(state.days, D)[INST]
    assert (totals.count, totals.account_fen) == (2 - 1 + 1 + 1, 17_00 - 7_00 - 1_00 + 4_00)


def test_an_event_read_after_the_cut_off_closes_the_day_first() -> None:
    state = run([approved(1)], at(D, 12))
    state, records = s.step(state, entry(reversed_(1, hour_day=D + 1)), at(D + 1, 2.5), CUTOFF)
    assert [(r.day, r.closed) for r in records] == [(D, True), (D + 1, False)]
    d0 = state.day(D)
    assert d0 is not None and d0.reversed == s.Line() and d0.net_fen == 10_00


def test_a_redelivered_event_changes_nothing_open_or_closed() -> None:
    events: list[Settles] = [approved(1), approved(2), reversed_(1), refunded(2)]
    state = run(events, at(D, 20))
    for ev in events:
        again, changed = s.apply(state, entry(ev))
        assert changed is None and again is state
    closed_state, _ = s.close_due(state, at(D + 1, 5), CUTOFF)
    for ev in events:  # redelivered after the close: still no adjustment line
        again, changed = s.apply(closed_state, entry(ev))
        assert changed is None and again is closed_state


def test_closed_days_are_forgotten_after_the_kept_days() -> None:
    state = run([approved(1)], at(D, 12))
    state, _ = s.close_due(state, at(D + 1 + s.CLOSED_DAYS_KEPT, 3), CUTOFF)
    assert state.day(D) is not None
    state, _ = s.close_due(state, at(D + 2 + s.CLOSED_DAYS_KEPT, 3), CUTOFF)
    assert state.day(D) is None


def test_bounds_and_invariants_are_asserted() -> None:
    with pytest.raises(s.SettlementError):
        s.apply(s.InstitutionState(OTHER), entry(approved(1)))
    with pytest.raises(s.SettlementError):
        s.close_due(s.InstitutionState(INST), 0, -1)


def test_records_and_state_round_trip_through_json() -> None:
    state = run([approved(1, cash=1_00), reversed_(1), refunded(1)], at(D, 20))
    state, _ = s.close_due(state, at(D + 1, 3), CUTOFF)
    state, _ = s.step(state, entry(reversed_(5, hour_day=D + 1)), at(D + 1, 4), CUTOFF)
    assert s.decode_state(s.encode_state(state)) == state
    for record in state.days:
        decoded = s.decode_record(s.encode_record(record))
        assert decoded == record and decoded.applied_ids == frozenset()
    assert s.decode_state(s.encode_state(state)).days[0].applied_ids == state.days[0].applied_ids


def test_conservation_figures() -> None:
    state = run(
        [approved(1, account=30_00), reversed_(1, returned=30_00), approved(2, account=5_00)],
        at(D, 20),
    )
    state, _ = s.close_due(state, at(D + 1, 3), CUTOFF)
    state, _ = s.step(state, entry(approved(3, day=D + 1, account=2_00)), at(D + 1, 9), CUTOFF)
    settled, pending = s.settled_and_pending(state.days)
    assert (settled, pending) == (5_00, 2_00)
    check = s.Conservation(
        credits_fen=100_00, balances_fen=93_00, settled_fen=settled, pending_fen=pending
    )
    assert check.holds
    assert s.Conservation(100_00, 94_00, settled, pending).difference_fen == -1_00


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, int, int]], int]:
    """Operations (kind, swipe number, amount) over three days, and a seed for ordering."""
    ops: list[tuple[str, int, int]] = []
    for n in range(draw(st.integers(1, 25))):
        amount = draw(st.integers(1, 50_000))
        ops.append(("approve", n, amount))
        fate = draw(st.sampled_from(["keep", "reverse", "refund"]))
        if fate != "keep":
            ops.append((fate, n, amount if fate == "reverse" else draw(st.integers(1, amount))))
    return ops, draw(st.integers(0, 2**32))


@settings(max_examples=150, deadline=None)
@given(histories())
def test_property_redelivery_and_cut_off_never_change_the_total_owed(
    history: tuple[list[tuple[str, int, int]], int],
) -> None:
    """Whatever the clock and however often events are redelivered: Σ net over all day
    records = Σ paid − Σ returned, no closed record ever changes, every event counts once."""
    ops, seed = history
    rng = random.Random(seed)
    events: list[SwipeApproved | SwipeReversed | Refunded] = []
    for kind, n, amount in ops:
        day = D + n % 3
        if kind == "approve":
            events.append(approved(n, day=day, account=amount))
        elif kind == "reverse":
            events.append(reversed_(n, original_day=day, returned=amount))
        else:
            events.append(refunded(n, day=day + rng.randint(0, 1), amount=amount))
    expected = sum(s.SIGN[entry(e).kind] * entry(e).account_fen for e in events)
    state: s.InstitutionState | None = None
    now = at(D, 1)
    final: dict[int, s.DaySettlement] = {}
    latest: dict[int, s.DaySettlement] = {}
    delivered: list[SwipeApproved | SwipeReversed | Refunded] = []
    for ev in events:  # each followed, sometimes, by a redelivery of a recent event
        delivered.append(ev)
        if rng.random() < 0.4:
            delivered.append(rng.choice(delivered[-5:]))
    for ev in delivered:
        now += rng.randint(0, 4) * HOUR_MS
        state, records = s.step(state, entry(ev), now, CUTOFF)
        for record in records:
            assert record.day not in final, "a closed day was published again"
            latest[record.day] = record
            if record.closed:
                final[record.day] = record
        if rng.random() < 0.2 and state is not None:
            state, closed = s.close_due(state, now, CUTOFF)
            for record in closed:
                final[record.day] = latest[record.day] = record
    assert state is not None
    assert sum(r.net_fen for r in latest.values()) == expected
    counted = sum(
        r.approved.count + r.reversed.count + r.refunded.count + sum(a.count for a in r.adjustments)
        for r in latest.values()
    )
    assert counted == len(events)


# ---------------------------------------------------------------------------- recon


def test_totals_file_is_validated_with_line_numbers() -> None:
    text = (
        "institution_id,day,count,total_amount,account_amount\n"
        f"{INST},2026-11-19,3,40.00,35.00\n"
        f"{OTHER},2026-11-19,x,1.00,1.00\n"
        f"{OTHER},2026-13-01,1,1.00,1.00\n"
        f"{OTHER},2026-11-19,1,1.005,1.00\n"
        f"{INST},2026-11-19,3,40.00,35.00\n"
        f"{OTHER},2026-11-19,1,1.00\n"
        f"{OTHER},2026-11-19,1,1.00,2.00\n"
    )
    rows, errors = r.parse_totals(text, "f.csv")
    assert [r.totals for r in rows] == [r.Totals(3, 40_00, 35_00)]
    assert [e.split(":")[1] for e in errors] == ["3", "4", "5", "6", "7", "8"]
    assert "again (first on line 2)" in errors[3] and "two decimals" in errors[2]
    _rows, bad_header = r.parse_totals("inst,day\n", "g.csv")
    assert bad_header and bad_header[0].startswith("g.csv:1: header")


def test_details_file_is_validated() -> None:
    text = (
        "institution_id,day,request_id,kind,amount,account_amount\n"
        f"{INST},2026-11-19,T1:1,swipe,12.50,10.00\n"
        f"{INST},2026-11-19,T1:1,swipe,12.50,10.00\n"
        f"{INST},2026-11-19,T1 2,swipe,1.00,1.00\n"
        f"{INST},2026-11-19,T1:3,payment,1.00,1.00\n"
        f"{INST},2026-11-19,F:1,refund,3.00,3.00\n"
    )
    lines, errors = r.parse_details(text, "d.csv")
    assert [(x.request_id, x.kind, x.amount_fen, x.account_fen) for x in lines] == [
        ("T1:1", r.DetailKind.SWIPE, 12_50, 10_00),
        ("F:1", r.DetailKind.REFUND, 3_00, 3_00),
    ]
    assert [e.split(":")[1] for e in errors] == ["3", "4", "5"]


def test_log_view_and_three_way_comparison_find_exactly_the_differences() -> None:
    swipes = [r.LogSwipe(INST, f"T1:{n}", 10_00 + n, 10_00) for n in range(4)]
    reversals = [r.LogReturn(INST, "T1:3", 10_00)]
    refunds = [r.LogReturn(INST, "F:1", 2_00)]
    totals, lines = r.log_view(D, swipes, reversals, refunds)
    assert totals[INST] == r.Totals(3 + 1, (10_00 + 10_01 + 10_02) - 2_00, 30_00 - 2_00)
    assert {x.request_id for x in lines} == {"T1:0", "T1:1", "T1:2", "F:1"}
    file_lines = [x for x in lines if x.request_id != "T1:1"]  # missing at the institution
    file_lines = [
        r.DetailLine(x.institution_id, x.day, x.request_id, x.kind, x.amount_fen + 1, x.account_fen)
        if x.request_id == "T1:2"
        else x
        for x in file_lines
    ]
    file_lines.append(r.DetailLine(INST, D, "T1:99", r.DetailKind.SWIPE, 5_00, 5_00))
    diffs = r.compare_details(lines, file_lines, [INST])
    assert [(d.request_id, d.issue) for d in diffs] == [
        ("T1:1", r.DetailIssue.MISSING_IN_FILE),
        ("T1:2", r.DetailIssue.AMOUNT_DIFFERS),
        ("T1:99", r.DetailIssue.MISSING_IN_MEDCLEAR),
    ]
    settled = {INST: r.Totals(4, None, 28_00)}
    rows = r.compare_totals(settled, totals, {INST: totals[INST], OTHER: r.Totals(1, 1_00, 1_00)})
    assert [(r.institution_id, r.status) for r in rows] == [
        (OTHER, r.Status.MISSING_IN_MEDCLEAR),
        (INST, r.Status.MATCHED),
    ]
    wrong = r.compare_totals(settled, totals, {INST: r.Totals(4, 38_03, 27_00)})
    assert wrong[0].status == r.Status.MISMATCHED and any("27" in n for n in wrong[0].notes)
    absent = r.compare_totals(settled, totals, {})
    assert absent[0].status == r.Status.MISSING_IN_FILE
