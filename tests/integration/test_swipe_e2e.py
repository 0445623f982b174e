"""One swipe end to end on the real stack: `medclear up` in a temporary state directory
(real broker, ClickHouse, Prometheus, clearing worker, gateway, registry as processes),
window operations and swipes over gRPC, then `medclear down --wipe`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rich.console import Console

from clearing import codec
from clearing.abnormal import Alert, AlertKind
from clearing.codes import CardKind, InsuranceCategory, ResultCode
from medclear import stack
from medclear.infra import topics
from medclear.infra.exits import Exit
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import KafkaSecurity, Settings
from medclear.infra.tokens import load_card_tokens
from medclear.sim.city import make_ssn
from medclear.stack import acls
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.integration.kafka_read import all_records
from tests.integration.running import running_stack

pytestmark = [
    pytest.mark.stack,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
    pytest.mark.timeout(300),
]

PHARMACY = "310101P00001"
HOSPITAL = "310101H00001"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    state_dir = tmp_path_factory.mktemp("stack") / ".medclear"
    policy = state_dir.parent / "pre_loss_policy.csv"
    policy.write_text("region,amount,unit,note\ndrill,2,seconds,pre-loss lapses in 2 s\n")
    # the open path (no terminal security): test_terminal_security.py covers the secured one
    yield Settings(
        terminal_security=False,
        tls=False,
        state_dir=state_dir,
        command_partitions=3,
        event_partitions=3,
        pre_loss_policy_file=policy,
        pre_loss_timer_interval_s=0.5,
    )


@pytest.fixture(scope="module")
def endpoints(settings: Settings) -> Iterator[stack.Endpoints]:
    with running_stack(settings) as endpoints:
        yield endpoints


_counter = iter(range(1, 1_000_000))


def window(tag: str) -> common_pb2.WindowContext:
    return common_pb2.WindowContext(
        window_id="W1", operator_id="op1", request_id=f"it-{tag}-{next(_counter)}-{time.time_ns()}"
    )


def enrol(
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    index: int,
    balance_fen: int,
    category: InsuranceCategory = InsuranceCategory.EMPLOYEE,
    region: str = "310101",
) -> tuple[str, str]:

    ssn = make_ssn(random.Random(index), 900_000 + index)
    card = f"IT{index:07d}"
    steps = [
        registry.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                window=window("reg"),
                ssn=ssn,
                name="测试",
                category=int(category),  # type: ignore[arg-type]
                phone="13900000000",
                region=region,
            )
        ),
        registry.IssueCard(
            registry_pb2.IssueCardRequest(
                window=window("issue"), ssn=ssn, card_no=card, kind=int(CardKind.SOCIAL_SECURITY)
            )
        ),  # type: ignore[arg-type]
        registry.ActivateCard(registry_pb2.CardRequest(window=window("act"), card_no=card)),
        registry.ChangePin(registry_pb2.ChangePinRequest(window=window("pin"), card_no=card)),
    ]
    if balance_fen:
        steps.append(
            registry.CreditAccount(
                registry_pb2.CreditRequest(
                    window=window("credit"),
                    ssn=ssn,
                    amount_fen=balance_fen,
                    source_id=f"src-{index}",
                )
            )
        )
    assert [ResultCode(r.result) for r in steps] == [ResultCode.OK] * len(steps)
    return ssn, card


def authorize(
    pos: pos_pb2_grpc.PosServiceStub,
    card: str,
    amount_fen: int,
    trace: int,
    institution: str = PHARMACY,
    terminal: str = "T-IT-1",
    **kw: object,
) -> pos_pb2.AuthorizeReply:
    request = pos_pb2.AuthorizeRequest(
        terminal=common_pb2.TerminalContext(
            terminal_id=terminal, institution_id=institution, trace_number=trace
        ),
        card_no=card,
        amount_fen=amount_fen,
        **kw,
    )  # type: ignore[arg-type]
    reply: pos_pb2.AuthorizeReply = pos.Authorize(request, timeout=10)
    return reply


def test_both_grpc_servers_expose_health_and_reflection(endpoints: stack.Endpoints) -> None:
    for address, service in (
        (endpoints.gateway, "medclear.v1.PosService"),
        (endpoints.registry, "medclear.v1.CardRegistryService"),
    ):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_swipe_debits_once_and_a_repeat_is_answered_with_the_original(
    registry: registry_pb2_grpc.CardRegistryServiceStub, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    _ssn, card = enrol(registry, 1, 100_00)
    first = authorize(pos, card, 12_50, trace=1)
    assert ResultCode(first.result) == ResultCode.OK, first.message
    assert (first.paid_from_account_fen, first.balance_after_fen) == (12_50, 87_50)
    assert first.state.version > 0 and first.state.person_key.endswith(_ssn[-4:])
    repeat = authorize(pos, card, 12_50, trace=1)
    assert repeat.replayed and repeat.balance_after_fen == 87_50
    assert repeat.state.version == first.state.version
    second = authorize(pos, card, 7_50, trace=2, institution=HOSPITAL)
    assert ResultCode(second.result) == ResultCode.OK
    assert second.balance_after_fen == 80_00


def test_declines_change_nothing(
    registry: registry_pb2_grpc.CardRegistryServiceStub, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    _ssn, card = enrol(registry, 2, 10_00)
    assert ResultCode(authorize(pos, card, 20_00, trace=1).result) == (
        ResultCode.INSUFFICIENT_BALANCE
    )
    assert ResultCode(authorize(pos, "ZZ0000000", 1_00, trace=2).result) == (
        ResultCode.CARD_UNKNOWN
    )
    assert ResultCode(authorize(pos, card, 0, trace=3).result) == ResultCode.MALFORMED_REQUEST
    assert ResultCode(authorize(pos, "bad", 1_00, trace=4).result) == (ResultCode.MALFORMED_REQUEST)
    assert (
        ResultCode(authorize(pos, card, 1_00, trace=5, institution="310101P99999").result)
        == ResultCode.INSTITUTION_NOT_DESIGNATED
    )
    ok = authorize(pos, card, 10_00, trace=6, institution=HOSPITAL)
    assert ResultCode(ok.result) == ResultCode.OK and ok.balance_after_fen == 0


def test_a_reversal_or_a_refund_for_a_card_no_one_holds_finds_no_original(
    pos: pos_pb2_grpc.PosServiceStub,
) -> None:
    """Decided by the core on no person, as a reversal of a swipe it never saw."""

    def terminal(trace: int) -> common_pb2.TerminalContext:
        return common_pb2.TerminalContext(
            terminal_id="T-IT-9", institution_id=PHARMACY, trace_number=trace
        )

    reverse = pos.Reverse(
        pos_pb2.ReverseRequest(terminal=terminal(2), card_no="ZZ0000001", original_trace_number=1),
        timeout=10,
    )
    refund = pos.Refund(
        pos_pb2.RefundRequest(
            terminal=terminal(3), card_no="ZZ0000001", original_trace_number=1, amount_fen=1_00
        ),
        timeout=10,
    )
    assert ResultCode(reverse.result) == ResultCode.ORIGINAL_NOT_FOUND, reverse.message
    assert ResultCode(refund.result) == ResultCode.ORIGINAL_NOT_FOUND, refund.message
    assert reverse.reversed_amount_fen == 0 and refund.refunded_amount_fen == 0


def test_a_window_operation_on_a_card_no_one_holds_is_card_unknown(
    registry: registry_pb2_grpc.CardRegistryServiceStub,
) -> None:
    """The registry's unrouted commands are the core's to decide too."""
    request = registry_pb2.CardRequest(window=window("nobody"), card_no="ZZ0000002")
    for call in (registry.ReportPreLoss, registry.Freeze, registry.ConfirmLoss):
        reply = call(request, timeout=10)
        assert ResultCode(reply.result) == ResultCode.CARD_UNKNOWN, reply.message


def test_a_pre_loss_report_blocks_the_next_swipe_and_a_release_restores_it(
    registry: registry_pb2_grpc.CardRegistryServiceStub, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    _ssn, card = enrol(registry, 3, 50_00)
    report = registry.ReportPreLoss(registry_pb2.CardRequest(window=window("loss"), card_no=card))
    assert ResultCode(report.result) == ResultCode.OK
    assert report.card.state == common_pb2.PRE_LOST
    assert ResultCode(authorize(pos, card, 1_00, trace=1).result) == ResultCode.CARD_PRE_LOST
    release = registry.ReleaseLoss(registry_pb2.CardRequest(window=window("rel"), card_no=card))
    assert ResultCode(release.result) == ResultCode.OK
    assert ResultCode(authorize(pos, card, 1_00, trace=2).result) == ResultCode.OK


def test_a_swipe_on_a_reported_card_raises_an_alert_naming_only_the_masked_card(
    settings: Settings,
    endpoints: stack.Endpoints,
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    pos: pos_pb2_grpc.PosServiceStub,
) -> None:
    ssn, card = enrol(registry, 41, 10_00)
    person = load_card_tokens(settings).person_ref(ssn)  # alerts name the person by token
    report = registry.ReportPreLoss(registry_pb2.CardRequest(window=window("loss"), card_no=card))
    assert ResultCode(report.result) == ResultCode.OK
    refused = authorize(pos, card, 1_00, trace=1, terminal="T-IT-ALERT")
    assert ResultCode(refused.result) == ResultCode.CARD_PRE_LOST
    deadline = time.monotonic() + 45  # the abnormal job's consumer joins when the stack is up
    mine: list[Alert] = []
    while not mine and time.monotonic() < deadline:
        records = asyncio.run(all_records(endpoints.kafka(), topics.ALERTS.name))
        alerts = [codec.decode(raw.partition(b"|")[2]) for _, raw in records]
        mine = [a for a in alerts if a.person_ref == person]
        time.sleep(0.2)
    assert [(a.kind, a.card_masked, a.terminal_id) for a in mine] == [
        (AlertKind.BLOCKED_CARD_USED, "*****" + card[-4:], "T-IT-ALERT")
    ]
    assert mine[0].cardholder_facing and card not in mine[0].card_ref


def test_green_card_is_refused_at_a_pharmacy(
    registry: registry_pb2_grpc.CardRegistryServiceStub, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    _ssn, card = enrol(registry, 4, 0, InsuranceCategory.RESIDENT)
    assert ResultCode(authorize(pos, card, 1_00, trace=1).result) == (ResultCode.COLOUR_NOT_ALLOWED)


def test_pos_swipe_command_prints_the_decision(
    registry: registry_pb2_grpc.CardRegistryServiceStub, settings: Settings
) -> None:
    _ssn, card = enrol(registry, 5, 30_00)
    argv = [
        sys.executable,
        "-m",
        "medclear",
        "pos",
        "swipe",
        "--card",
        card,
        "--amount",
        "12.50",
        "--institution",
        PHARMACY,
        "--terminal",
        "T-CLI",
        "--trace",
        "42",
    ]
    env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir), "COLUMNS": "120"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "OK (1)" in done.stdout and "17.50" in done.stdout
    bad = subprocess.run(
        [a if a != "12.50" else "12.505" for a in argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "two decimals" in bad.stderr


def test_state_survives_kill_minus_9_of_the_worker(
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    pos: pos_pb2_grpc.PosServiceStub,
    settings: Settings,
) -> None:
    _ssn, card = enrol(registry, 6, 100_00)
    assert authorize(pos, card, 40_00, trace=1).balance_after_fen == 60_00
    rows = {r.name: r for r in stack.status(settings)}
    os.kill(rows["worker-0"].pid, signal.SIGKILL)
    stack.restart_component(settings, "worker-0")  # waits until it is ready again
    # the repeat of trace 1 is still remembered (replayed, not debited again) ...
    again = authorize(pos, card, 40_00, trace=1)
    assert again.replayed and again.balance_after_fen == 60_00
    # ... and the balance carried over
    after = authorize(pos, card, 10_00, trace=2, institution=HOSPITAL)
    assert ResultCode(after.result) == ResultCode.OK and after.balance_after_fen == 50_00


def test_status_reports_every_component_healthy(
    settings: Settings, endpoints: stack.Endpoints
) -> None:
    rows = stack.status(settings)
    names = {r.name for r in rows}
    assert {
        "broker-0",
        "clickhouse",
        "worker-0",
        "gateway",
        "registry",
        "jobs",  # every stream job, in one process
        "prometheus",
    } <= names
    assert all(r.healthy for r in rows), [(r.name, r.detail) for r in rows if not r.healthy]


def test_up_with_external_servers_starts_only_medclears_own_processes(
    kafka: KafkaAccess, clickhouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """MEDCLEAR_KAFKA_BOOTSTRAP / MEDCLEAR_CLICKHOUSE_URL: the servers are used, not started.
    The cluster's operator grants medclear's principals their ACLs first, as the RUNBOOK
    says (`medclear kafka acls --apply`)."""
    if kafka.tls:
        acls.apply(kafka, acls.rules())
        acls.wait_effective(kafka)
    external = Settings(
        terminal_security=False,
        tls=False,
        state_dir=tmp_path_factory.mktemp("external") / ".medclear",
        kafka_bootstrap=kafka.bootstrap,
        kafka_security=KafkaSecurity.SSL if kafka.tls else KafkaSecurity.PLAINTEXT,
        kafka_ssl_dir=kafka.ssl_dir,
        kafka_replication=kafka.replication,
        clickhouse_url=clickhouse_url,
        command_partitions=2,
        event_partitions=2,
    )
    console = Console(stderr=True)
    try:
        endpoints = stack.up(external, console)
        assert endpoints.kafka_bootstrap == kafka.bootstrap
        names = {r.name for r in stack.status(external)}
        assert "worker-0" in names and "gateway" in names
        started = {r.name for r in stack.status(external) if r.pid}
        assert not {"broker", "broker-0", "clickhouse"} & started
        with grpc.insecure_channel(endpoints.registry) as channel:
            registry = registry_pb2_grpc.CardRegistryServiceStub(channel)
            _ssn, card = enrol(registry, 7, 20_00)
        with grpc.insecure_channel(endpoints.gateway) as channel:
            reply = authorize(pos_pb2_grpc.PosServiceStub(channel), card, 5_00, trace=1)
        assert ResultCode(reply.result) == ResultCode.OK and reply.balance_after_fen == 15_00
    finally:
        stack.down(external, console, wipe=True)


def registry_stub(endpoints: stack.Endpoints) -> registry_pb2_grpc.CardRegistryServiceStub:
    return registry_pb2_grpc.CardRegistryServiceStub(grpc.insecure_channel(endpoints.registry))


def test_a_pre_loss_lapses_through_the_timer_job(
    registry: registry_pb2_grpc.CardRegistryServiceStub, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    """DOMAIN: a pre-loss not made formal lapses automatically (policy: 2 s in 'drill')."""
    _ssn, card = enrol(registry, 20, 10_00, region="drill")
    report = registry.ReportPreLoss(registry_pb2.CardRequest(window=window("loss"), card_no=card))
    assert ResultCode(report.result) == ResultCode.OK
    deadline = time.monotonic() + 30
    state = common_pb2.PRE_LOST
    while state == common_pb2.PRE_LOST and time.monotonic() < deadline:
        time.sleep(0.5)
        view = registry.GetPerson(registry_pb2.GetPersonRequest(card_no=card))
        state = view.cards[0].state
    assert state == common_pb2.ACTIVE, "the timer job did not expire the pre-loss"
    assert ResultCode(authorize(pos, card, 1_00, trace=1).result) == ResultCode.OK


SENT_BEFORE_REPORT = 10  # of the 50 racing swipes; the others are sent after the report


def test_no_swipe_is_approved_after_the_loss_report_is_decided(
    registry: registry_pb2_grpc.CardRegistryServiceStub, endpoints: stack.Endpoints
) -> None:
    """50 concurrent swipes of one card from 50 terminals race a loss report: every
    approval was decided before the report (lower state version), every swipe decided
    after it is declined, and every swipe sent after the acknowledgement is declined."""
    import asyncio

    ssn, card = enrol(registry, 21, 50_000_00)

    async def race() -> tuple[
        list[pos_pb2.AuthorizeReply], registry_pb2.RegistryReply, list[pos_pb2.AuthorizeReply]
    ]:
        async with (
            grpc.aio.insecure_channel(endpoints.gateway) as pos_channel,
            grpc.aio.insecure_channel(endpoints.registry) as reg_channel,
        ):
            pos_stub = pos_pb2_grpc.PosServiceStub(pos_channel)
            reg_stub = registry_pb2_grpc.CardRegistryServiceStub(reg_channel)

            answered = asyncio.Event()  # some swipes are decided: now the report is sent
            reporting = asyncio.Event()  # the report is on its way: the other swipes race it

            async def swipe(terminal: int, trace: int) -> pos_pb2.AuthorizeReply:
                # The first ones go before the report, the rest only once it is sent (timed
                # from the start, a slow first answer let all 50 pass before the report).
                if terminal < SENT_BEFORE_REPORT:
                    await asyncio.sleep(terminal * 0.004)
                else:
                    await reporting.wait()
                    await asyncio.sleep((terminal - SENT_BEFORE_REPORT) * 0.004)
                reply: pos_pb2.AuthorizeReply = await pos_stub.Authorize(
                    pos_pb2.AuthorizeRequest(
                        terminal=common_pb2.TerminalContext(
                            terminal_id=f"RACE{terminal}",
                            institution_id=HOSPITAL,
                            trace_number=trace,
                        ),
                        card_no=card,
                        ssn=ssn,
                        amount_fen=1_00,
                    ),
                    timeout=20,
                )
                if terminal >= 5:
                    answered.set()
                return reply

            async def report() -> registry_pb2.RegistryReply:
                await answered.wait()
                reporting.set()
                reply: registry_pb2.RegistryReply = await reg_stub.ReportPreLoss(
                    registry_pb2.CardRequest(window=window("race"), card_no=card), timeout=20
                )
                return reply

            *swipes, reported = await asyncio.gather(*(swipe(t, 1) for t in range(50)), report())
            later = await asyncio.gather(*(swipe(t, 2) for t in range(10)))
            return list(swipes), reported, list(later)  # type: ignore[arg-type]

    swipes, reported, later = asyncio.run(race())
    assert ResultCode(reported.result) == ResultCode.OK
    report_version = reported.state.version
    approved = [r for r in swipes if ResultCode(r.result) == ResultCode.OK]
    declined = [r for r in swipes if ResultCode(r.result) != ResultCode.OK]
    assert approved and declined, "the race did not straddle the report; tune the delays"
    assert all(r.state.version < report_version for r in approved)
    assert all(ResultCode(r.result) == ResultCode.CARD_PRE_LOST for r in declined)
    assert all(r.state.version > report_version for r in declined)
    assert all(ResultCode(r.result) == ResultCode.CARD_PRE_LOST for r in later)


HELD_UP_S = 0.3  # a swipe answered this late was waiting for the restarted worker


def test_kill_9_while_swipes_flow_loses_no_approval_and_debits_none_twice(
    registry: registry_pb2_grpc.CardRegistryServiceStub,
    endpoints: stack.Endpoints,
    settings: Settings,
) -> None:
    """Terminals keep swiping while the clearing worker is killed with -9 and restarted;
    a terminal repeats a request that got no definite answer (same trace number). At the
    end, per person: balance = opening − Σ approved, and the person's records hold
    exactly the approved swipes, each once."""
    import asyncio
    import threading

    people = [enrol(registry, 30 + i, 500_00) for i in range(4)]
    plan = [(i % 4, i) for i in range(48)]  # (person, trace); 12 hospital swipes each
    undecided = {ResultCode.TIMEOUT, ResultCode.UNAVAILABLE}

    def killer() -> None:
        time.sleep(0.6)
        rows = {r.name: r for r in stack.status(settings)}
        killed_at.append(time.monotonic())
        os.kill(rows["worker-0"].pid, signal.SIGKILL)
        stack.restart_component(settings, "worker-0")

    retries = 0
    killed_at: list[float] = []
    slowest_s = 0.0
    window_s: list[float] = []

    async def flow() -> dict[int, pos_pb2.AuthorizeReply]:
        window_s.append(time.monotonic())
        answers: dict[int, pos_pb2.AuthorizeReply] = {}
        async with grpc.aio.insecure_channel(endpoints.gateway) as channel:
            stub = pos_pb2_grpc.PosServiceStub(channel)
            lanes = asyncio.Semaphore(4)

            async def one(person: int, trace: int) -> None:
                nonlocal retries, slowest_s
                ssn, card = people[person]
                request = pos_pb2.AuthorizeRequest(
                    terminal=common_pb2.TerminalContext(
                        terminal_id=f"CRASH{person}",
                        institution_id=HOSPITAL,
                        trace_number=trace + 1,
                    ),
                    card_no=card,
                    ssn=ssn,
                    amount_fen=3_00 + trace,
                )
                async with lanes:
                    await asyncio.sleep(0.1)  # a counter's pace: the flow spans the crash
                    for _attempt in range(60):  # bounded: about a minute at most
                        started = time.monotonic()
                        try:
                            reply = await stub.Authorize(request, timeout=5)
                            slowest_s = max(slowest_s, time.monotonic() - started)
                        except grpc.aio.AioRpcError:
                            retries += 1
                            await asyncio.sleep(0.5)
                            continue
                        if ResultCode(reply.result) not in undecided:
                            answers[trace] = reply
                            return
                        retries += 1
                        await asyncio.sleep(0.5)
                    raise AssertionError(f"swipe {trace} never got a definite answer")

            await asyncio.gather(*(one(p, t) for p, t in plan))
        window_s.append(time.monotonic())
        return answers

    thread = threading.Thread(target=killer)
    thread.start()
    answers = asyncio.run(flow())
    thread.join()
    # the crash fell inside the flow, and swipes were held up by it (answered after the
    # restart within the gateway deadline, or retried by the terminal). A swipe takes
    # ~20 ms here; the worker's restart with its stores kept takes under a second.
    assert window_s[0] < killed_at[0] < window_s[1], "the crash missed the flow"
    assert retries > 0 or slowest_s > HELD_UP_S, "no swipe was in flight during the crash"
    for person, (_ssn, card) in enumerate(people):
        mine = [answers[t] for p, t in plan if p == person]
        approved = {
            r.request_id: r.paid_from_account_fen
            for r in mine
            if ResultCode(r.result) == ResultCode.OK
        }
        assert len(approved) == len(mine), [ResultCode(r.result).name for r in mine]
        view = registry.GetPerson(registry_pb2.GetPersonRequest(card_no=card))
        recorded = [t.request_id for t in view.transactions if t.kind == "consumption"]
        assert sorted(recorded) == sorted(approved), "records differ from client approvals"
        assert view.balance_fen == 500_00 - sum(approved.values())


def test_card_commands_drive_the_window_operations(
    registry: registry_pb2_grpc.CardRegistryServiceStub, settings: Settings
) -> None:
    """`medclear card ...` reaches the registry: report a loss, confirm it, see it refused
    to release (exit 3, declined, with the code), and show the person."""
    _ssn, card = enrol(registry, 40, 12_34)
    env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir), "COLUMNS": "160"}

    def medclear(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "medclear", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    done = medclear("card", "report-loss", "--card", card)
    assert done.returncode == 0 and "PRE_LOST" in done.stdout, done.stdout + done.stderr
    assert medclear("card", "confirm-loss", "--card", card).returncode == 0
    refused = medclear("card", "release", "--card", card)
    assert (
        refused.returncode == Exit.DECLINED and "RELEASE_AFTER_FORMAL_LOSS (71)" in refused.stdout
    )
    shown = medclear("card", "show", "--card", card)
    assert shown.returncode == 0 and "LOST" in shown.stdout and "12.34" in shown.stdout
    as_json = json.loads(medclear("card", "show", "--card", card, "--json").stdout)
    assert int(as_json["balance_fen"]) == 12_34
    assert [c["state"] for c in as_json["cards"] if c["card_no"] == card] == ["LOST"]
    assert "allocation" in shown.stdout  # the opening credit is among the records


def test_topics_keep_what_they_hold_for_as_long_as_it_is_needed(
    endpoints: stack.Endpoints,
) -> None:
    """Replies expire within the hour (nobody reads one twice), the tables (changelogs,
    card index, settlements) are compacted, never expired, and the events are kept for ever:
    the log of record (medclear.infra.topics.config)."""
    wanted = {
        "medclear.replies.gw-0": {"retention.ms": "3600000", "cleanup.policy": "delete"},
        "medclear.replies.reg-0": {"retention.ms": "3600000", "cleanup.policy": "delete"},
        "medclear-clearing-persons-changelog": {"cleanup.policy": "compact"},
        topics.CARD_INDEX.name: {"cleanup.policy": "compact"},
        topics.SETTLEMENTS.name: {"cleanup.policy": "compact"},
        topics.EVENTS.name: {"retention.ms": "-1", "cleanup.policy": "delete"},
    }

    admin = AdminClient(acls.admin_config(endpoints.kafka()))
    found = admin.describe_configs([ConfigResource("topic", name) for name in wanted])
    got = {
        resource.name: {key: entry.value for key, entry in future.result(timeout=30).items()}
        for resource, future in found.items()
    }
    for name, config in wanted.items():
        assert {k: got[name].get(k) for k in config} == config, name


def test_a_benchmark_leaves_the_running_stack_alone(
    registry: registry_pb2_grpc.CardRegistryServiceStub, settings: Settings
) -> None:
    """`medclear bench run` brings up a stack of its own: run beside this one (the same
    MEDCLEAR_STATE_DIR), it used to take this stack as its own and wipe it at the end."""
    ssn, card = enrol(registry, 61, 10_00)
    env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir)}
    argv = [
        sys.executable,
        "-m",
        "medclear",
        "bench",
        "run",
        "--persons",
        "30",
        "--swipes",
        "30",
        "--concurrency",
        "1",
        "--security",
        "off",
        "--idle-seconds",
        "0",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (settings.state_dir / "stack.json").exists()
    found = registry.GetPerson(registry_pb2.GetPersonRequest(card_no=card), timeout=10)
    assert ResultCode(found.result) == ResultCode.OK and found.balance_fen == 10_00, ssn
