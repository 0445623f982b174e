"""The ClickHouse sink on the real stack (`medclear up`: Apache Kafka, ClickHouse 18.16, worker,
gateway, registry, the sink job as its own process).

- swipes through the gateway become rows, tokens and masked numbers only;
- redelivery (records re-published, and a second consumer group reading from offset 0)
  leaves one row per event id and the daily totals unchanged;
- ClickHouse stopped while swipes flow, then started again: nothing lost, and the lag
  gauge rose, then returned to 0;
- the migrations are idempotent; they also run on a current ClickHouse (chdb), if installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from clickhouse_driver import Client
from rich.console import Console

from clearing import model
from clearing.calendar import shanghai_day
from clearing.codes import CardKind, InstitutionType, InsuranceCategory, ResultCode
from clearing.redact import CONTACT, PERSON, CardTokens, Redaction, Sealer, published
from medclear import stack
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import Settings
from medclear.infra.tokens import load_card_tokens
from medclear.sim.city import make_ssn
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc
from stream_jobs import ch
from stream_jobs.clickhouse_sink import ClickHouseSink

pytestmark = [
    pytest.mark.stack,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
    pytest.mark.timeout(180),
]

PHARMACY = "310101P00001"
HOSPITAL = "310101H00001"
SINK = "clickhouse-sink"
LAG_SECONDS = "medclear_clickhouse_sink_lag_seconds"
LAG_RECORDS = "medclear_clickhouse_sink_lag_records"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        state_dir=tmp_path_factory.mktemp("sink") / ".medclear",
        terminal_security=False,
        tls=False,
        command_partitions=2,
        event_partitions=2,
        jobs=f"{SINK},abnormal",  # the other stream jobs have their own tests
        jobs_in_one_process=False,  # the sink is its own component: production's layout
    )


@pytest.fixture(scope="module")
def endpoints(settings: Settings) -> Iterator[stack.Endpoints]:
    console = Console(stderr=True)
    try:
        yield stack.up(settings, console)
    finally:
        stack.down(settings, console, wipe=True)


@pytest.fixture(scope="module")
def client(endpoints: stack.Endpoints) -> Iterator[Client]:
    client = ch.connect(endpoints.clickhouse_url)
    yield client
    client.disconnect()


_ids = iter(range(1, 1_000_000))


def _window() -> common_pb2.WindowContext:
    return common_pb2.WindowContext(
        window_id="W1", operator_id="op1", request_id=f"sink-{next(_ids)}-{time.time_ns()}"
    )


def _decided(method: object, request: object) -> ResultCode:
    """A window call, repeated with the same request id while it times out (a loaded
    machine): the worker answers a repeat with the original reply."""
    for _ in range(5):
        result = ResultCode(method(request, timeout=15).result)  # type: ignore[operator]
        if result != ResultCode.TIMEOUT:
            return result
    return result


def enrol(registry: registry_pb2_grpc.CardRegistryServiceStub, index: int) -> tuple[str, str]:
    ssn = make_ssn(random.Random(index), 700_000 + index)
    card = f"CH{index:07d}"
    steps = [
        (
            registry.RegisterPerson,
            registry_pb2.RegisterPersonRequest(
                window=_window(),
                ssn=ssn,
                name="测试",
                phone="13900001234",
                region="310101",
                category=int(InsuranceCategory.EMPLOYEE),  # type: ignore[arg-type]
            ),
        ),
        (
            registry.IssueCard,
            registry_pb2.IssueCardRequest(
                window=_window(),
                ssn=ssn,
                card_no=card,
                kind=int(CardKind.SOCIAL_SECURITY),  # type: ignore[arg-type]
            ),
        ),
        (registry.ActivateCard, registry_pb2.CardRequest(window=_window(), card_no=card)),
        (registry.ChangePin, registry_pb2.ChangePinRequest(window=_window(), card_no=card)),
        (
            registry.CreditAccount,
            registry_pb2.CreditRequest(
                window=_window(), ssn=ssn, amount_fen=1_000_00, source_id=f"alloc-{index}"
            ),
        ),
    ]
    results = [_decided(method, request) for method, request in steps]
    assert results == [ResultCode.OK] * len(steps)
    return ssn, card


def _terminal(terminal: str, trace: int, institution: str) -> common_pb2.TerminalContext:
    return common_pb2.TerminalContext(
        terminal_id=terminal, institution_id=institution, trace_number=trace
    )


def swipe(
    pos: pos_pb2_grpc.PosServiceStub,
    card: str,
    amount_fen: int,
    terminal: str,
    trace: int,
    institution: str = PHARMACY,
) -> ResultCode:
    request = pos_pb2.AuthorizeRequest(
        terminal=_terminal(terminal, trace, institution), card_no=card, amount_fen=amount_fen
    )
    return _decided(pos.Authorize, request)


def wait_for(what: str, check: object, timeout_s: float, interval_s: float = 0.1) -> float:
    """Poll `check()` until it is truthy; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic() - t0
        except Exception:  # a server not answering yet counts as "not yet"
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def sink_metric(settings: Settings, name: str) -> float:
    state = json.loads((settings.state_dir / stack.STATE_FILE).read_text())
    comp = next(c for c in state["components"] if c["name"] == SINK)
    url = f"http://127.0.0.1:{comp['ports']['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=2) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported by the sink")


def _gone(pid: int) -> bool:
    """The process has exited (reaped if it is a child of this one: `up` ran in here)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def present(client: Client, request_ids: list[str]) -> set[str]:
    """Which of these requests have their first event in ClickHouse (event ids also carry
    the ingress time, so tests name events by request id)."""
    found = client.execute(
        "SELECT DISTINCT request_id FROM events FINAL WHERE request_id IN %(r)s"
        " AND event_id LIKE '%%#0'",
        {"r": tuple(request_ids)},
    )
    return {r[0] for r in found}


def totals(client: Client) -> list[ch.DailyTotals]:
    return ch.daily_totals(client, shanghai_day(int(time.time() * 1000)))


# ---------------------------------------------------------------------------- tests


def test_swipes_through_the_gateway_become_rows_without_clear_identifiers(
    settings: Settings,
    client: Client,
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    pos: pos_pb2_grpc.PosServiceStub,
) -> None:
    ssn, card = enrol(registry, 1)
    assert swipe(pos, card, 35_20, "T-CH-A", 1) == ResultCode.OK
    assert swipe(pos, card, 12_00, "T-CH-A", 2, institution=HOSPITAL) == ResultCode.OK
    assert swipe(pos, card, 5_000_00, "T-CH-A", 3) == ResultCode.INSUFFICIENT_BALANCE
    reverse = pos_pb2.ReverseRequest(
        terminal=_terminal("T-CH-A", 4, HOSPITAL), original_trace_number=2, card_no=card
    )
    assert _decided(pos.Reverse, reverse) == ResultCode.OK
    refund = pos_pb2.RefundRequest(
        terminal=_terminal("T-CH-A", 5, PHARMACY),
        original_trace_number=1,
        card_no=card,
        amount_fen=5_20,
    )
    assert _decided(pos.Refund, refund) == ResultCode.OK
    ids = [f"T-CH-A:{n}" for n in range(1, 6)]
    wait_for("the swipes in ClickHouse", lambda: present(client, ids) == set(ids), 15)

    rows = client.execute(
        "SELECT event_id, event_type, result, amount_fen, paid_from_account_fen,"
        " institution_id, person_ref, ssn_masked, card_ref, card_masked, original_day, day,"
        " request_id FROM events FINAL WHERE person_ref = %(p)s ORDER BY at_ms, event_id",
        {"p": load_card_tokens(settings).person_ref(ssn)},
    )
    by_id = {r[12]: r for r in rows if r[12].startswith("T-CH-A:")}
    kinds = [r[1] for r in rows]
    for kind in (
        "PersonRegistered",
        "CardIssued",
        "CardStateChanged",
        "PinChanged",
        "AccountCredited",
        "SwipeApproved",
        "SwipeDeclined",
        "SwipeReversed",
        "Refunded",
    ):
        assert kind in kinds
    assert by_id["T-CH-A:1"][1:6] == ("SwipeApproved", ResultCode.OK, 35_20, 35_20, PHARMACY)
    assert by_id["T-CH-A:3"][1:3] == ("SwipeDeclined", ResultCode.INSUFFICIENT_BALANCE)
    assert by_id["T-CH-A:4"][1] == "SwipeReversed" and by_id["T-CH-A:4"][3] == 12_00
    assert by_id["T-CH-A:5"][1] == "Refunded" and by_id["T-CH-A:5"][3] == 5_20
    for row in rows:
        text = " ".join(str(cell) for cell in row)
        assert ssn not in text and card not in text and "13900001234" not in text
        assert row[8].startswith("ct_") or row[1] in ("PersonRegistered", "AccountCredited")
    detail = client.execute("SELECT detail FROM events WHERE person_ref = %(p)s", {"p": rows[0][6]})
    assert all(ssn not in d and card not in d for (d,) in detail)

    by_institution = {t.institution_id: t for t in totals(client)}
    pharmacy, hospital = by_institution[PHARMACY], by_institution[HOSPITAL]
    assert pharmacy.approved_count >= 1 and pharmacy.refunded_fen >= 5_20
    assert hospital.reversed_count >= 1
    assert pharmacy.net_fen == (
        pharmacy.approved_account_fen - pharmacy.reversed_fen - pharmacy.refunded_fen
    )
    view = client.execute(
        "SELECT * FROM institution_daily_totals WHERE day = %(d)s ORDER BY institution_id",
        {"d": pharmacy.day},
    )
    assert [ch.DailyTotals(*r) for r in view] == totals(client)


async def _republish_all(kafka: KafkaAccess, partition_count: int) -> int:
    """Read every record of the events topic and produce it again, key and value as they
    were: a redelivery as a producer retry or a worker replay would make it."""
    consumer = AIOKafkaConsumer(**kafka.options(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    producer = AIOKafkaProducer(**kafka.options(), acks=-1)
    await producer.start()
    try:
        partitions = [TopicPartition(topics.EVENTS.name, p) for p in range(partition_count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        count = 0
        done: set[TopicPartition] = set()
        while len(done) < len(partitions):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    if record.offset < ends[tp]:
                        await producer.send_and_wait(tp.topic, record.value, key=record.key)
                        count += 1
            for tp in partitions:
                if await consumer.position(tp) >= ends[tp]:
                    done.add(tp)
        return count
    finally:
        await producer.stop()
        await consumer.stop()


def test_redelivered_events_leave_one_row_per_event_id(
    settings: Settings, endpoints: stack.Endpoints, client: Client
) -> None:
    assert ch.event_count(client) > 0  # the first test left events
    wait_for("the sink to catch up", lambda: sink_metric(settings, LAG_RECORDS) == 0, 15)
    distinct_before, physical_before = ch.event_count(client), ch.event_count(client, final=False)
    totals_before = totals(client)

    republished = asyncio.run(_republish_all(endpoints.kafka(), settings.event_partitions))
    assert republished >= distinct_before
    # the job inserts every one of them again: the duplicates are really there
    wait_for(
        "the redelivered records in ClickHouse",
        lambda: ch.event_count(client, final=False) >= physical_before + republished,
        20,
    )
    assert ch.event_count(client) == distinct_before
    assert totals(client) == totals_before

    # a second consumer group from offset 0 (as after an offset reset): once more
    physical = ch.event_count(client, final=False)
    tokens = load_card_tokens(settings)

    async def replay() -> None:
        sink = ClickHouseSink(
            endpoints.kafka(),
            endpoints.clickhouse_url,
            tokens,
            database=settings.clickhouse_database,
            group_id="test-replay-from-zero",
            member_id=None,
        )
        task = asyncio.create_task(sink.run())
        deadline = time.monotonic() + 90  # a wait, not a speed check: generous under load
        while ch.event_count(client, final=False) < physical + 2 * republished:
            assert time.monotonic() < deadline, "replay did not finish"
            await asyncio.sleep(0.2)
        sink.stopping.set()
        await asyncio.wait_for(task, 15)

    asyncio.run(replay())
    assert ch.event_count(client) == distinct_before
    (uniq,) = client.execute("SELECT uniqExact(event_id) FROM events")[0]
    assert uniq == distinct_before
    assert totals(client) == totals_before


def test_clickhouse_stopped_mid_run_loses_nothing_and_the_lag_returns_to_zero(
    settings: Settings,
    client: Client,
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    pos: pos_pb2_grpc.PosServiceStub,
) -> None:
    cards = [enrol(registry, 10 + i)[1] for i in range(3)]
    approved: list[str] = []
    stop = threading.Event()

    def traffic(card: str, terminal: str) -> None:
        trace = 0
        while not stop.is_set():
            trace += 1
            if swipe(pos, card, 1_00, terminal, trace, HOSPITAL) == ResultCode.OK:
                approved.append(f"{terminal}:{trace}")
            time.sleep(0.02)

    threads = [
        threading.Thread(target=traffic, args=(card, f"T-CH-OUT-{i}"), daemon=True)
        for i, card in enumerate(cards)
    ]
    for thread in threads:
        thread.start()
    try:
        _outage(settings, client, approved, stop)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)


def _outage(settings: Settings, client: Client, approved: list[str], stop: threading.Event) -> None:
    time.sleep(1.0)
    ch_pid = next(r.pid for r in stack.status(settings) if r.name == "clickhouse")
    assert ch_pid is not None
    retries_before = sink_metric(settings, "medclear_clickhouse_sink_retries_total")
    os.kill(ch_pid, signal.SIGTERM)
    wait_for("clickhouse to stop", lambda: _gone(ch_pid), 15)
    during_outage = len(approved)
    lag_max = 0.0
    t_outage = time.monotonic()
    while time.monotonic() - t_outage < 4.0:
        lag_max = max(lag_max, sink_metric(settings, LAG_SECONDS))
        time.sleep(0.25)
    assert len(approved) > during_outage, "swipes must go on while ClickHouse is away"
    assert lag_max >= 2.0, f"lag gauge did not rise: {lag_max}"
    assert sink_metric(settings, "medclear_clickhouse_sink_retries_total") > retries_before

    t_restart = time.monotonic()
    stack.restart_component(settings, "clickhouse")
    time.sleep(1.0)
    stop.set()
    time.sleep(0.5)  # the swipes in flight finish
    catch_up_s = wait_for(
        "every approved swipe in ClickHouse",
        lambda: present(client, approved) == set(approved),
        30,
        0.2,
    )
    wait_for("the lag gauge back to 0", lambda: sink_metric(settings, LAG_SECONDS) == 0, 10)
    wait_for("no records behind", lambda: sink_metric(settings, LAG_RECORDS) == 0, 10)
    print(
        f"\n{len(approved)} approved swipes, {during_outage} before the outage; lag max "
        f"{lag_max:.1f} s; caught up {time.monotonic() - t_restart:.1f} s after the restart "
        f"began ({catch_up_s:.1f} s after it was ready)"
    )


def test_migrations_are_idempotent_and_any_new_file_is_applied(
    endpoints: stack.Endpoints, tmp_path: Path
) -> None:
    url = endpoints.clickhouse_url.rsplit("/", 1)[0] + "/migrations_twice"
    client = ch.connect(url)
    try:
        names = [m.name for m in ch.migrations()]
        assert ch.migrate(client) == names
        assert ch.migrate(client) == []
        recorded = client.execute("SELECT name FROM schema_migrations ORDER BY name")
        assert [r[0] for r in recorded] == names
        # the analysts' lookups: one row per code however often migrate ran, and the log
        # in yuan with the codes' names beside it
        codes = client.execute("SELECT count(), countIf(approved = 1) FROM result_codes FINAL")
        assert codes == [(len(ResultCode), sum(1 for c in ResultCode if c.approved))]
        client.execute(f"INSERT INTO events ({', '.join(ch.COLUMNS)}) VALUES", [_sample_row()])
        named = client.execute(
            "SELECT amount_yuan, result_name, type_name FROM ("
            " SELECT amount_yuan, institution_type, name AS result_name FROM events_yuan"
            " ANY LEFT JOIN (SELECT code AS result, name FROM result_codes FINAL) USING result)"
            " ANY LEFT JOIN (SELECT type AS institution_type, name AS type_name"
            " FROM institution_types FINAL) USING institution_type"
        )
        assert named == [(35.2, "OK", "pharmacy")]
        for migration in ch.migrations():  # every statement is idempotent on its own
            for statement in migration.statements():
                client.execute(statement)

        for migration in ch.migrations():
            (tmp_path / migration.name).write_text(migration.sql)
        (tmp_path / "999_later.sql").write_text(
            "-- a later job's table\nCREATE TABLE IF NOT EXISTS later_probe (id String)\n"
            "ENGINE = ReplacingMergeTree() ORDER BY id;\n"
        )
        assert ch.migrate(client, tmp_path) == ["999_later.sql"]
        (tmp_path / "999_later.sql").write_text("SELECT 1;\n")
        with pytest.raises(ch.MigrationError, match="changed after it was applied"):
            ch.migrate(client, tmp_path)
    finally:
        client.execute("DROP DATABASE IF EXISTS migrations_twice")
        client.disconnect()


def test_the_event_log_is_reordered_by_day_and_institution_keeping_every_row(
    endpoints: stack.Endpoints, tmp_path: Path
) -> None:
    """530 rebuilds `events` ordered (day, institution_id, event_id) for analysts: the
    rows of a log made under the old order are all kept, still one per event id, and the
    views that name `events` read the new table."""
    url = endpoints.clickhouse_url.rsplit("/", 1)[0] + "/migrations_reorder"
    client = ch.connect(url)
    try:
        before = tmp_path / "before"
        before.mkdir()
        for migration in ch.migrations():
            if migration.name < "530":
                (before / migration.name).write_text(migration.sql)
        ch.migrate(client, before)
        row = _sample_row()
        other = (f"{row[0]}-2", *row[1:])
        client.execute(ch.INSERT_SQL, [row, row, other])  # a copy of the first: redelivered
        assert "ORDER BY event_id" in client.execute("SHOW CREATE TABLE events")[0][0]

        assert ch.migrate(client) == ["530_events_by_day.sql"]
        create = client.execute("SHOW CREATE TABLE events")[0][0]
        assert "ORDER BY (day, institution_id, event_id)" in create, create
        assert client.execute("SELECT count() FROM events FINAL") == [(2,)]
        assert client.execute("SELECT count() FROM events_yuan") == [(2,)]
        totals = client.execute("SELECT approved_count, net_fen FROM institution_daily_totals")
        assert totals == [(2, 2 * 35_20)]
        tables = {r[0] for r in client.execute("SHOW TABLES")}
        assert not {"events_by_event_id", "events_reordering"} & tables
    finally:
        client.execute("DROP DATABASE IF EXISTS migrations_reorder")
        client.disconnect()


def test_migrations_run_on_a_current_clickhouse(tmp_path: Path) -> None:
    """The same files on chdb (an in-process current ClickHouse), then one event inserted
    twice: FINAL counts it once there too."""
    chdb_session = pytest.importorskip(
        "chdb.session", reason="chdb-core not installed (pip install '.[current-clickhouse]')"
    )
    session = chdb_session.Session(str(tmp_path / "chdb"))
    try:
        session.query("CREATE DATABASE IF NOT EXISTS medclear")
        session.query("USE medclear")
        for migration in ch.migrations():
            for statement in migration.statements():
                session.query(statement)
        version = str(session.query("SELECT version()", "CSV")).strip().strip('"')
        assert int(version.split(".")[0]) >= 24
        row = dict(zip(ch.COLUMNS, _sample_row(), strict=True))
        row["day"] = row["original_day"] = str(row["day"])
        line = json.dumps(row, ensure_ascii=False)
        for _ in range(2):
            session.query(f"INSERT INTO events FORMAT JSONEachRow {line}")
        day = f"AND original_day = '{row['day']}'"
        result = str(session.query(ch._TOTALS_SELECT.format(where=day), "CSV")).strip()
        assert result.split(",")[2:5] == ["1", "3520", "3520"]
        count = str(session.query("SELECT count() FROM events FINAL", "CSV")).strip()
        assert count == "1"
    finally:
        session.close()


def _sample_row() -> tuple[object, ...]:
    tokens = CardTokens(b"s" * 32)
    redaction = Redaction(tokens, Sealer(CONTACT, b"c" * 32), Sealer(PERSON, b"p" * 32))
    event = model.SwipeApproved(
        "T9:1#0",
        1_795_000_000_000,
        "11010519491231002X",
        "T9:1",
        "A00000009",
        PHARMACY,
        InstitutionType.PHARMACY,
        35_20,
        35_20,
        0,
        64_80,
        shanghai_day(1_795_000_000_000),
    )
    return ch.event_row(published(event, redaction), tokens)


def test_alerts_reach_clickhouse_once_with_masked_cards_only(
    settings: Settings,
    client: Client,
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    pos: pos_pb2_grpc.PosServiceStub,
) -> None:
    """The abnormal job's alerts (medclear.alerts) land in `alerts` by the sink's side feed:
    a swipe on a reported card gives one row naming the card by token and last digits."""
    ssn, card = enrol(registry, 40)
    loss = registry_pb2.CardRequest(window=_window(), card_no=card)
    report = _decided(registry.ReportPreLoss, loss)
    assert report == ResultCode.OK
    assert swipe(pos, card, 1_00, "T-CH-ALERT", 1) == ResultCode.CARD_PRE_LOST
    person = load_card_tokens(settings).person_ref(ssn)

    def rows() -> list[tuple[object, ...]]:
        return list(
            client.execute(
                "SELECT kind, card_ref, card_masked, terminal_id, cardholder_facing"
                " FROM alerts FINAL WHERE person_ref = %(p)s",
                {"p": person},
            )
        )

    wait_for("the alert in ClickHouse", lambda: len(rows()) > 0, 30)
    assert rows() == [
        (
            "blocked_card_used",
            load_card_tokens(settings).card_ref(card),
            "*****" + card[-4:],
            "T-CH-ALERT",
            1,
        )
    ]
    dump = client.execute("SELECT * FROM alerts FINAL")
    assert card not in repr(dump) and ssn not in repr(dump)
