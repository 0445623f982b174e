"""What a drill checks once its traffic has stopped and the pipeline has drained:

- conservation: credits − balances = settled + pending (`medclear recon check`);
- every client-approved swipe is in its person's state (GetPerson: the record, and the
  balance = balance before − Σ approved), and in ClickHouse exactly once (one
  SwipeApproved row per request id in `events FINAL`);
- no SMS doubled: the SMSC logs every message; an approved swipe's SMS is identified by
  its phone, amount and balance after (a person's balance only falls during a drill, so
  two swipes never share a text), and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearing import settlement as rules
from clearing.codes import ResultCode
from clearing.money import format_yuan
from medclear.cli.recon import read_accounts, read_settlements
from medclear.drills.access import StackAccess
from medclear.drills.bounds import (
    APPROVED,
    DRAIN_POLL_S,
    DRAIN_TIMEOUT_S,
    REPLAY_CHECK_APPROVALS_MAX,
    RPC_TIMEOUT_S,
    UNDECIDED,
)
from medclear.drills.persons import person_views
from medclear.drills.traffic import SwipeRecord
from medclear.infra.pki import Role
from medclear.infra.rpc import aio_channel
from medclear.v1 import pos_pb2_grpc
from stream_jobs import ch


def sms_key(phone: str, paid_fen: int, balance_fen: int) -> tuple[str, str]:
    """What identifies an approved swipe's SMS at the SMSC: destination (86 + phone) and
    the text's "支出<amount>元，余额<balance>元" (stream_jobs/templates/sms.toml)."""
    return f"86{phone}", f"支出{format_yuan(paid_fen)}元，余额{format_yuan(balance_fen)}元"


@dataclass(frozen=True)
class SmsCount:
    expected: int
    delivered: int  # expected SMS seen at least once
    doubled: int  # extra copies of expected SMS
    missing: int


def count_sms(
    messages: Iterable[Mapping[str, Any]], expected: Iterable[tuple[str, str]]
) -> SmsCount:
    """Match the SMSC's complete messages against the expected (destination, snippet)."""
    wanted = set(expected)
    by_destination: dict[str, list[str]] = {}
    for m in messages:
        if m.get("kind", "message") == "message":
            by_destination.setdefault(str(m.get("destination", "")), []).append(
                str(m.get("text", ""))
            )
    seen: Counter[tuple[str, str]] = Counter()
    for destination, snippet in wanted:
        seen[(destination, snippet)] = sum(
            1 for text in by_destination.get(destination, ()) if snippet in text
        )
    delivered = sum(1 for n in seen.values() if n > 0)
    doubled = sum(n - 1 for n in seen.values() if n > 1)
    return SmsCount(len(wanted), delivered, doubled, len(wanted) - delivered)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of the SMSC's log (a line being written is skipped)."""
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@dataclass(frozen=True)
class StateCheck:
    verified: int  # approvals found in the person's records (or answered `replayed`)
    balance_mismatches: list[str]  # masked persons whose balance ≠ before − Σ approved
    unknown_in_state: int  # consumption records the client was never told were approved
    decided_again: int = 0  # approvals the person had forgotten: the replay check decided
    # them anew (it had to ask with the swipe itself), so it changed the state it checks


def expected_balances(before: Mapping[str, int], swipes: Iterable[SwipeRecord]) -> dict[str, int]:
    """Each person's balance after the drill: before − Σ paid of their approved swipes."""
    out = dict(before)
    for s in swipes:
        if s.approved:
            out[s.ssn] -= s.paid_from_account_fen
    return out


async def _replayed(a: StackAccess, swipes: Sequence[SwipeRecord]) -> tuple[set[str], int]:
    """Request ids whose repeat is answered `replayed` with the original payment, and how
    many repeats were decided anew instead (the person had no memory of the swipe)."""
    out, decided_again = set(), 0
    async with aio_channel(a.endpoints.gateway, Role.TERMINAL, a.pki_dir) as channel:
        stub = pos_pb2_grpc.PosServiceStub(channel)
        for s in swipes:
            assert s.request is not None
            reply = await stub.Authorize(s.request, timeout=RPC_TIMEOUT_S)
            if not reply.replayed and ResultCode(reply.result) not in UNDECIDED:
                decided_again += 1
            elif (
                reply.replayed
                and ResultCode(reply.result) in APPROVED
                and reply.paid_from_account_fen == s.paid_from_account_fen
            ):
                out.add(s.request_id)
    return out, decided_again


def check_state(
    a: StackAccess, before: Mapping[str, int], swipes: Sequence[SwipeRecord]
) -> StateCheck:
    approved = [s for s in swipes if s.approved]
    views = asyncio.run(person_views(a, list(before)))
    expected = expected_balances(before, swipes)
    mismatches = [
        f"{ssn[:6]}…{ssn[-4:]}: {format_yuan(views[ssn].balance_fen)} ≠ {format_yuan(balance)}"
        for ssn, balance in expected.items()
        if views[ssn].balance_fen != balance
    ]
    recorded: dict[str, set[str]] = {
        ssn: {t.request_id for t in v.transactions if t.kind == "consumption"}
        for ssn, v in views.items()
    }
    approved_ids = {s.request_id for s in approved}
    unknown = sum(len(ids - approved_ids) for ids in recorded.values())
    found = {s.request_id for s in approved if s.request_id in recorded[s.ssn]}
    per_person = Counter(s.ssn for s in approved)
    unseen = [s for s in approved if s.request_id not in found]
    replayable = [s for s in unseen if per_person[s.ssn] <= REPLAY_CHECK_APPROVALS_MAX]
    decided_again = 0
    if replayable:  # beyond the 20 records GetPerson shows: ask the person's memory
        replayed, decided_again = asyncio.run(_replayed(a, replayable))
        found |= replayed
    return StateCheck(len(found), mismatches, unknown, decided_again)


@contextlib.contextmanager
def _clickhouse(a: StackAccess) -> Iterator[Any]:
    """A client on the stack's ClickHouse database, disconnected afterwards."""
    client = ch.connect(a.endpoints.clickhouse_url, a.settings.clickhouse_database)
    try:
        yield client
    finally:
        client.disconnect()


def clickhouse_once(a: StackAccess, request_ids: Sequence[str]) -> tuple[int, int]:
    """(approved request ids with exactly one SwipeApproved row in `events FINAL`,
    physical duplicate rows among them not yet merged away)."""
    if not request_ids:
        return 0, 0
    with _clickhouse(a) as client:
        params = {"ids": tuple(request_ids)}
        rows = client.execute(
            "SELECT request_id, count() FROM events FINAL WHERE event_type = 'SwipeApproved' "
            "AND request_id IN %(ids)s GROUP BY request_id",
            params,
        )
        raw = client.execute(
            "SELECT count() - uniqExact(event_id) FROM events WHERE request_id IN %(ids)s",
            params,
        )
    return sum(1 for _rid, n in rows if int(n) == 1), int(raw[0][0])


def sms_resent_uncertain(a: StackAccess) -> int:
    """SMS the sms job sent again after a restart found them in flight (outcome records
    flagged `resent_uncertain` in ClickHouse): each may be a double, none is silent."""
    with _clickhouse(a) as client:
        rows = client.execute(
            "SELECT uniqExact(event_id) FROM sms_outcomes WHERE resent_uncertain = 1"
        )
    return int(rows[0][0])


def conservation(a: StackAccess) -> tuple[bool, int]:
    """`medclear recon check`'s figures: (holds, difference in fen)."""
    accounts = read_accounts(a.endpoints.kafka())
    settled, pending = rules.settled_and_pending(read_settlements(a.endpoints.kafka()))
    result = rules.Conservation(accounts.credits_fen, accounts.balances_fen, settled, pending)
    return result.holds and not accounts.person_differences, result.difference_fen


def wait_drained(a: StackAccess, approved: Sequence[SwipeRecord], sms: bool) -> float | None:
    """Poll until ClickHouse holds every approval, the SMSC has every SMS and money is
    conserved (the settlement job caught up); when that happened, or None."""
    ids = [s.request_id for s in approved]
    keys = [sms_key(s.phone, s.paid_from_account_fen, s.balance_after_fen) for s in approved]
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            once, _dups = clickhouse_once(a, ids)
            sms_ok = not sms or count_sms(read_jsonl(a.smsc_messages_file()), keys).missing == 0
            if once == len(ids) and sms_ok and conservation(a)[0]:
                return time.monotonic()
        except Exception:  # a server still coming back: poll again
            pass
        time.sleep(DRAIN_POLL_S)
    return None
