"""Terminal security on the real swipe path (`terminal_security` on): every POS request's
MAC is verified through the HSM before it can reach an aggregate; the PIN block is
verified through the HSM against the card's verification value set at a window."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from clearing.codes import CardKind, CardState, InsuranceCategory, ResultCode
from medclear import stack
from medclear.infra import status
from medclear.infra.pki import Role
from medclear.infra.rpc import result_pb, sync_channel
from medclear.infra.settings import Settings
from medclear.infra.terminals import Keyring
from medclear.sim.city import make_ssn
from medclear.stack import supervisor
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.integration.kafka_read import all_records

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.timeout(240)]
PHARMACY, HOSPITAL = "310101P00001", "310101H00001"
PIN, WRONG = "135790", "246801"


LMK_HEX = secrets.token_hex(32)  # given to `up` in its environment, as an operator would


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[stack.Endpoints, Keyring]]:
    state_dir = tmp_path_factory.mktemp("secured") / ".medclear"
    os.environ["MEDCLEAR_HSM_LMK"] = LMK_HEX
    try:
        settings = Settings(
            state_dir=state_dir, command_partitions=2, event_partitions=2, terminal_security=True
        )
    finally:
        del os.environ["MEDCLEAR_HSM_LMK"]
    assert settings.hsm_lmk.get_secret_value() == LMK_HEX
    console = Console(stderr=True)
    try:
        os.environ["MEDCLEAR_HSM_LMK"] = LMK_HEX  # what every child would inherit
        try:
            endpoints = stack.up(settings, console)
        finally:
            del os.environ["MEDCLEAR_HSM_LMK"]
        keyring = Keyring(state_dir / "terminals" / "keyring.json")
        PKI[:] = [state_dir.resolve() / "pki"]
        asyncio.run(
            keyring.provision(endpoints.hsm, ["POS1", "POS2", "WIN1"], state_dir.resolve() / "pki")
        )
        yield endpoints, keyring
    finally:
        stack.down(settings, console, wipe=True)


PKI: list[Path] = []  # set by the stack fixture


def channel_to(address: str, role: Role) -> grpc.Channel:
    return sync_channel(address, role, PKI[0])


def window(tag: str) -> common_pb2.WindowContext:
    return common_pb2.WindowContext(
        window_id="WIN1", operator_id="op", request_id=f"sec-{tag}-{time.time_ns()}"
    )


def enrol_request(
    keyring: Keyring,
    tag: str,
    ssn: str,
    card: str,
    name: str,
    balance_fen: int,
    source: str,
    **fields: object,
) -> registry_pb2.EnrolPersonRequest:
    """An employee's enrolment at window WIN1 with PIN, `fields` changed."""
    request = registry_pb2.EnrolPersonRequest(
        window=window(tag),
        ssn=ssn,
        name=name,
        phone="13700000041",
        category=int(InsuranceCategory.EMPLOYEE),
        region="310101",
        card_no=card,
        new_pin_block=keyring.pin_block("WIN1", PIN, card),
        opening_balance_fen=balance_fen,
        source_id=f"{source}-{ssn}",
    )
    for field, value in fields.items():
        setattr(request, field, value)
    return request


def enrol(secured: tuple[stack.Endpoints, Keyring], index: int, card_no: str) -> str:
    """A person with an active card whose PIN was set at window WIN1, and 100 yuan."""
    endpoints, keyring = secured
    ssn = make_ssn(random.Random(index), 777 + index)
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        replies = [
            reg.RegisterPerson(
                registry_pb2.RegisterPersonRequest(
                    window=window("r"),
                    ssn=ssn,
                    name="安全",
                    phone="13700000000",
                    category=int(InsuranceCategory.EMPLOYEE),
                )
            ),  # type: ignore[arg-type]
            reg.IssueCard(
                registry_pb2.IssueCardRequest(
                    window=window("i"), ssn=ssn, card_no=card_no, kind=int(CardKind.SOCIAL_SECURITY)
                )
            ),  # type: ignore[arg-type]
            reg.ActivateCard(registry_pb2.CardRequest(window=window("a"), card_no=card_no)),
            reg.ChangePin(
                registry_pb2.ChangePinRequest(
                    window=window("p"),
                    card_no=card_no,
                    new_pin_block=keyring.pin_block("WIN1", PIN, card_no),
                )
            ),
            reg.CreditAccount(
                registry_pb2.CreditRequest(
                    window=window("c"), ssn=ssn, amount_fen=100_00, source_id=f"sec-{index}"
                )
            ),
        ]
    assert [ResultCode(r.result) for r in replies] == [ResultCode.OK] * 5
    return ssn


@pytest.fixture(scope="module")
def card(secured: tuple[stack.Endpoints, Keyring]) -> str:
    enrol(secured, 0, "SEC000001")
    return "SEC000001"


_traces = iter(range(1, 10_000))


def swipe(
    secured: tuple[stack.Endpoints, Keyring],
    card: str,
    pin: str | None,
    *,
    terminal: str = "POS1",
    amount_fen: int = 1_00,
    trace: int | None = None,
    tamper: bool = False,
    sign_as: str | None = None,
) -> pos_pb2.AuthorizeReply:
    endpoints, keyring = secured
    request = pos_pb2.AuthorizeRequest(
        terminal=common_pb2.TerminalContext(
            terminal_id=terminal, institution_id=HOSPITAL, trace_number=trace or next(_traces)
        ),
        card_no=card,
        amount_fen=amount_fen,
        pin_block=keyring.pin_block(sign_as or terminal, pin, card) if pin else b"",
    )
    keyring.sign(sign_as or terminal, request)
    if tamper:
        request.amount_fen += 1  # changed after the MAC: what a man in the middle would do
    with channel_to(endpoints.gateway, Role.TERMINAL) as channel:
        reply: pos_pb2.AuthorizeReply = pos_pb2_grpc.PosServiceStub(channel).Authorize(
            request, timeout=15
        )
    return reply


def person_version(secured: tuple[stack.Endpoints, Keyring], card: str) -> tuple[int, int]:
    with channel_to(secured[0].registry, Role.WINDOW) as channel:
        view = registry_pb2_grpc.CardRegistryServiceStub(channel).GetPerson(
            registry_pb2.GetPersonRequest(card_no=card)
        )
    return view.state.version, view.balance_fen


def test_the_right_pin_pays_and_a_wrong_one_counts_a_try(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    ok = swipe(secured, card, PIN)
    assert ResultCode(ok.result) == ResultCode.OK, ok.message
    wrong = swipe(secured, card, WRONG)
    assert ResultCode(wrong.result) == ResultCode.PIN_WRONG and wrong.pin_tries_remaining == 2
    again = swipe(secured, card, PIN, terminal="POS2")
    assert ResultCode(again.result) == ResultCode.OK  # a right PIN resets the count
    missing = swipe(secured, card, None)
    assert ResultCode(missing.result) == ResultCode.PIN_BLOCK_INVALID


def test_a_bad_mac_never_reaches_the_aggregate(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    before = person_version(secured, card)
    tampered = swipe(secured, card, PIN, tamper=True)
    assert ResultCode(tampered.result) == ResultCode.MAC_INVALID
    wrong_key = swipe(secured, card, PIN, terminal="POS1", sign_as="POS2")
    assert ResultCode(wrong_key.result) == ResultCode.MAC_INVALID
    stranger = swipe(secured, card, PIN, terminal="POS9", sign_as="POS1")
    assert ResultCode(stranger.result) == ResultCode.TERMINAL_UNKNOWN
    assert person_version(secured, card) == before  # no event, no debit, no try counted


def test_a_replayed_request_gets_the_original_reply(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    first = swipe(secured, card, PIN, trace=9000, amount_fen=2_00)
    replay = swipe(secured, card, PIN, trace=9000, amount_fen=2_00)
    assert ResultCode(first.result) == ResultCode.OK and replay.replayed
    assert replay.balance_after_fen == first.balance_after_fen


def test_three_wrong_pins_lock_the_card(secured: tuple[stack.Endpoints, Keyring]) -> None:
    endpoints, keyring = secured
    ssn, card_no = make_ssn(random.Random(6), 778), "SEC000002"
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        reg.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                window=window("r2"),
                ssn=ssn,
                name="锁定",
                phone="13700000001",
                category=int(InsuranceCategory.EMPLOYEE),
            )
        )  # type: ignore[arg-type]
        reg.IssueCard(
            registry_pb2.IssueCardRequest(window=window("i2"), ssn=ssn, card_no=card_no, kind=1)
        )  # type: ignore[arg-type]
        reg.ActivateCard(registry_pb2.CardRequest(window=window("a2"), card_no=card_no))
        reg.ChangePin(
            registry_pb2.ChangePinRequest(
                window=window("p2"),
                card_no=card_no,
                new_pin_block=keyring.pin_block("WIN1", PIN, card_no),
            )
        )
    codes = [ResultCode(swipe(secured, card_no, WRONG).result) for _ in range(4)]
    assert codes == [
        ResultCode.PIN_WRONG,
        ResultCode.PIN_WRONG,
        ResultCode.PIN_TRIES_EXCEEDED,
        ResultCode.CARD_LOCKED,
    ]


def test_one_enrol_person_rpc_makes_a_person_who_pays_with_the_pin(
    secured: tuple[stack.Endpoints, Keyring],
) -> None:
    """EnrolPerson: register, issue, activate, the PIN's value from the HSM and the opening
    balance in one command; a repeat is replayed. A malformed enrolment, or one naming a
    card another person holds, makes nothing; a terminal may not enrol."""
    endpoints, keyring = secured
    ssn, card_no = make_ssn(random.Random(41), 841), "SEC000041"
    other_ssn, other_card = make_ssn(random.Random(42), 842), "SEC000042"

    def enrolment(
        tag: str, who: str = ssn, card: str = card_no, **fields: object
    ) -> registry_pb2.EnrolPersonRequest:
        return enrol_request(keyring, tag, who, card, "一次办结", 80_00, "sec-enrol", **fields)

    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        first = enrolment("e1")
        enrolled = reg.EnrolPerson(first, timeout=15)
        assert ResultCode(enrolled.result) == ResultCode.OK, enrolled.message
        assert enrolled.card.state == CardState.ACTIVE and enrolled.balance_fen == 80_00
        assert enrolled.state.version == 5  # registered, issued, activated, PIN, credit
        again = reg.EnrolPerson(first, timeout=15)
        assert ResultCode(again.result) == ResultCode.OK and again.replayed
        view = reg.GetPerson(registry_pb2.GetPersonRequest(card_no=card_no), timeout=15)
        assert view.name == "一次办结" and view.state.version == 5  # the index has the card
        refusals = [
            reg.EnrolPerson(enrolment("e2", other_ssn, other_card, phone="12345"), timeout=15),
            reg.EnrolPerson(enrolment("e3", other_ssn, card_no), timeout=15),  # card in use
            reg.EnrolPerson(
                enrolment("e4", other_ssn, other_card, opening_balance_fen=-1), timeout=15
            ),
        ]
        assert [ResultCode(r.result) for r in refusals] == [
            ResultCode.MALFORMED_REQUEST,
            ResultCode.CARD_EXISTS,
            ResultCode.MALFORMED_REQUEST,
        ]
        nobody = reg.GetPerson(registry_pb2.GetPersonRequest(ssn=other_ssn), timeout=15)
        assert ResultCode(nobody.result) == ResultCode.PERSON_UNKNOWN and not nobody.cards
    by_terminal = enrolment("e5", other_ssn, other_card)
    with (
        channel_to(endpoints.registry, Role.TERMINAL) as channel,
        pytest.raises(grpc.RpcError) as exc,
    ):
        registry_pb2_grpc.CardRegistryServiceStub(channel).EnrolPerson(by_terminal, timeout=10)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    paid = swipe(secured, card_no, PIN, amount_fen=12_50)
    assert ResultCode(paid.result) == ResultCode.OK and paid.balance_after_fen == 67_50
    wrong = swipe(secured, card_no, WRONG)
    assert ResultCode(wrong.result) == ResultCode.PIN_WRONG and wrong.pin_tries_remaining == 2


def test_enrol_persons_decides_each_person_alone_in_one_call(
    secured: tuple[stack.Endpoints, Keyring],
) -> None:
    """EnrolPersons: each person decided as by EnrolPerson, replies in order. In one batch:
    two who enrol, a malformed one, one whose card another of the batch takes, one whose PIN
    block is not under the window's key; the good ones pay with their PIN, the others are
    made nothing; the same batch again is replayed; over the bound is INVALID_ARGUMENT."""
    endpoints, keyring = secured
    people = [(make_ssn(random.Random(120 + i), 920 + i), f"SEC00012{i}") for i in range(5)]

    def person(i: int, **fields: object) -> registry_pb2.EnrolPersonRequest:
        who, card = people[i]
        return enrol_request(
            keyring, f"batch{i}", who, card, "批量办卡", 50_00, "sec-batch", **fields
        )

    batch = registry_pb2.EnrolPersonsRequest(
        persons=[
            person(0),
            person(1),
            person(2, phone="12345"),
            person(3, card_no=people[0][1]),  # the card person 0 takes in this batch
            person(4, new_pin_block=b"\x5a" * 16),  # no block under WIN1's PIN key
        ]
    )
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        replies = reg.EnrolPersons(batch, timeout=15).replies
        assert [ResultCode(r.result) for r in replies] == [
            ResultCode.OK,
            ResultCode.OK,
            ResultCode.MALFORMED_REQUEST,
            ResultCode.CARD_EXISTS,
            ResultCode.PIN_BLOCK_INVALID,
        ], [r.message for r in replies]
        assert [r.request_id for r in replies] == [p.window.request_id for p in batch.persons]
        assert "phone" in replies[2].message
        assert replies[0].balance_fen == 50_00 and replies[0].state.version == 5
        again = reg.EnrolPersons(batch, timeout=15).replies
        assert [r.replayed for r in again[:2]] == [True, True]
        for who, _card in people[2:]:
            nobody = reg.GetPerson(registry_pb2.GetPersonRequest(ssn=who), timeout=15)
            assert ResultCode(nobody.result) == ResultCode.PERSON_UNKNOWN
        too_many = registry_pb2.EnrolPersonsRequest(persons=[person(0)] * 1_001)
        with pytest.raises(grpc.RpcError) as exc:
            reg.EnrolPersons(too_many, timeout=15)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        found = status.details_of(exc.value)
        assert found is not None and found.fields[0][0] == "persons"
    for _who, card in people[:2]:
        paid = swipe(secured, card, PIN, amount_fen=10_00)
        assert ResultCode(paid.result) == ResultCode.OK and paid.balance_after_fen == 40_00


def appears(secret: str, haystack: str | bytes) -> bool:
    """`secret` is in `haystack` as itself, not as a run of digits inside a longer number
    (a request id holds a nanosecond clock, whose digits may spell any PIN)."""
    pattern = rf"(?<!\d){re.escape(secret)}(?!\d)"
    if isinstance(haystack, bytes):
        return re.search(pattern.encode(), haystack) is not None
    return re.search(pattern, haystack) is not None


def test_no_log_or_record_downstream_holds_a_pin_card_number_ssn_name_or_phone(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    """After the swipes above, a wrong PIN, a lookup, and a second person's card lost and
    replaced (so card-issued, state-change, replacement and pre-loss timer records exist):
    no process log (HSM, workers, gateway, registry, stream jobs, broker, ClickHouse,
    Prometheus) and no record of any topic holds a typed PIN; and no log and no record of
    a topic downstream of the worker (events, card index, replies, alerts, settlement,
    SMS outcomes, the jobs' changelogs) holds a full card number, a social security number,
    a name or a phone number in clear. The two topics that must carry them to decide are
    the exceptions: the commands (the worker needs the PAN to check a PIN block, the ssn to
    find the person) and the persons table's changelog (the aggregate itself); those hold
    no PIN either."""
    endpoints = secured[0]
    swipe(secured, card, WRONG)  # make sure a wrong PIN went through this run as well
    lost, replacement = "SEC000003", "SEC000004"
    ssn = make_ssn(random.Random(7), 779)
    names, phones = ("挂失人", "安全员"), ("13700000001", "13700000000")
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        replies = [
            reg.RegisterPerson(
                registry_pb2.RegisterPersonRequest(
                    window=window("r2"),
                    ssn=ssn,
                    name=names[0],
                    phone=phones[0],
                    category=int(InsuranceCategory.EMPLOYEE),
                )
            ),  # type: ignore[arg-type]
            reg.IssueCard(
                registry_pb2.IssueCardRequest(
                    window=window("i2"),
                    ssn=ssn,
                    card_no=lost,
                    kind=int(CardKind.SOCIAL_SECURITY),
                )
            ),  # type: ignore[arg-type]
            reg.ActivateCard(registry_pb2.CardRequest(window=window("a2"), card_no=lost)),
            reg.ReportPreLoss(registry_pb2.CardRequest(window=window("p2"), card_no=lost)),
            reg.ConfirmLoss(registry_pb2.CardRequest(window=window("l2"), card_no=lost)),
            reg.ApplyReplacement(registry_pb2.CardRequest(window=window("x2"), card_no=lost)),
            reg.IssueReplacement(
                registry_pb2.IssueReplacementRequest(
                    window=window("n2"), ssn=ssn, old_card_no=lost, new_card_no=replacement
                )
            ),
            reg.SetPhone(
                registry_pb2.SetPhoneRequest(window=window("f2"), ssn=ssn, phone="13700000002")
            ),
        ]
        view = reg.GetPerson(registry_pb2.GetPersonRequest(ssn=ssn))  # a whole record replied
    assert [ResultCode(r.result) for r in replies] == [ResultCode.OK] * 8
    assert view.name == names[0]
    assert swipe(secured, replacement, None).result != result_pb(ResultCode.OK)
    time.sleep(3)  # the stream jobs have read the events and written their changelogs

    pins = (PIN, WRONG)
    cards = (card, "SEC000002", lost, replacement)
    persons = (ssn, make_ssn(random.Random(0), 777), make_ssn(random.Random(6), 778))
    personal = (*cards, *persons, *names, *phones, "13700000002")
    logs = sorted((secured_state_dir(secured) / "logs").glob("*.log"))
    assert len(logs) >= 6
    for log in logs:
        text = log.read_text(errors="replace")
        for secret in pins + personal:
            if log.name == "smsc.log" and secret.startswith("137"):
                continue  # the SMSC (a third party) must see where its SMS go
            assert not appears(secret, text), f"{secret!r} appears in {log.name}"

    records = asyncio.run(all_records(endpoints.kafka()))
    must_carry = ("medclear.commands", "-persons-changelog")
    seen = {topic for topic, _ in records}
    assert {"medclear.events", "medclear.card-index", "medclear.commands"} <= seen, seen
    assert any(topic.startswith("medclear.replies.") for topic in seen)
    assert any("sms-persons-changelog" in topic for topic in seen), seen
    downstream = 0
    for topic, raw in records:
        for secret in pins:
            assert not appears(secret, raw), f"a clear PIN in {topic}"
        if not any(marker in topic for marker in must_carry):
            downstream += 1
            for secret in personal:
                assert not appears(secret, raw), f"{secret} in {topic}: {raw[:300]!r}"
    assert downstream > 40  # the records of this run were really read


def secured_state_dir(secured: tuple[stack.Endpoints, Keyring]) -> Path:
    return secured[1].path.parent.parent  # <state_dir>/terminals/keyring.json


def test_with_the_hsm_frozen_nothing_is_decided_and_then_it_resumes(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    """SIGSTOP the HSM: a swipe is refused UNAVAILABLE (the MAC cannot be checked) and the
    person's state does not move; SIGCONT: the next swipe is decided normally."""
    import os
    import signal

    settings = Settings(state_dir=secured_state_dir(secured))
    hsm_pid = next(r.pid for r in stack.status(settings) if r.name == "hsm")
    assert hsm_pid is not None
    before = person_version(secured, card)
    os.kill(hsm_pid, signal.SIGSTOP)
    try:
        frozen = swipe(secured, card, PIN)
        assert ResultCode(frozen.result) == ResultCode.UNAVAILABLE
    finally:
        os.kill(hsm_pid, signal.SIGCONT)
    assert person_version(secured, card) == before
    resumed = swipe(secured, card, PIN)
    assert ResultCode(resumed.result) == ResultCode.OK


def test_roles_are_checked_at_every_grpc_boundary(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    """A terminal cannot call window operations or HSM administration; a window cannot
    swipe; a client without a certificate of this CA does not get in at all."""
    from medclear.v1 import hsm_pb2, hsm_pb2_grpc

    endpoints, keyring = secured
    request = pos_pb2.AuthorizeRequest(
        terminal=common_pb2.TerminalContext(
            terminal_id="POS1", institution_id=HOSPITAL, trace_number=next(_traces)
        ),
        card_no=card,
        amount_fen=1_00,
        pin_block=keyring.pin_block("POS1", PIN, card),
    )
    keyring.sign("POS1", request)
    attempts = [
        (
            endpoints.registry,
            Role.TERMINAL,
            lambda ch: registry_pb2_grpc.CardRegistryServiceStub(ch).ReportPreLoss(
                registry_pb2.CardRequest(window=window("evil"), card_no=card), timeout=10
            ),
        ),
        (
            endpoints.hsm,
            Role.TERMINAL,
            lambda ch: hsm_pb2_grpc.HsmServiceStub(ch).ListKeys(
                hsm_pb2.ListKeysRequest(), timeout=10
            ),
        ),
        (
            endpoints.gateway,
            Role.WINDOW,
            lambda ch: pos_pb2_grpc.PosServiceStub(ch).Authorize(request, timeout=10),
        ),
    ]
    refused: list[grpc.RpcError] = []
    for address, role, call in attempts:
        with channel_to(address, role) as channel, pytest.raises(grpc.RpcError) as exc:
            call(channel)
        refused.append(exc.value)
    for error in refused:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "may not call" in (error.details() or "")  # type: ignore[attr-defined]
        found = status.details_of(error)  # the reason and who was refused what, as data
        assert found is not None and found.reason == "ROLE_NOT_ALLOWED", found
        assert set(found.metadata) == {"method", "role"} and found.domain == status.DOMAIN
    assert status.details_of(refused[0]) == status.ErrorDetails(
        "ROLE_NOT_ALLOWED",
        status.DOMAIN,
        {"method": "/medclear.v1.CardRegistryService/ReportPreLoss", "role": "terminal"},
    )
    assert "terminal may not call /medclear.v1.CardRegistryService/ReportPreLoss" in (
        refused[0].details() or ""
    )  # type: ignore[attr-defined]
    with grpc.insecure_channel(endpoints.gateway) as channel, pytest.raises(grpc.RpcError) as exc:
        pos_pb2_grpc.PosServiceStub(channel).Authorize(pos_pb2.AuthorizeRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # no certificate: no entry


def test_bytes_that_are_no_request_get_invalid_argument_with_its_details(
    secured: tuple[stack.Endpoints, Keyring],
) -> None:
    """The gateway decodes requests itself: bytes that are no AuthorizeRequest are an
    INVALID_ARGUMENT whose google.rpc.Status says why and which message was expected."""
    endpoints, _keyring = secured
    with channel_to(endpoints.gateway, Role.TERMINAL) as channel:
        call = channel.unary_unary("/medclear.v1.PosService/Authorize")
        with pytest.raises(grpc.RpcError) as exc:
            call(b"\xff\xff\xff", timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert status.details_of(exc.value) == status.ErrorDetails(
        "REQUEST_UNDECODABLE", status.DOMAIN, {"message": "medclear.v1.AuthorizeRequest"}
    )


def test_every_dashboard_query_returns_data(secured: tuple[stack.Endpoints, Keyring]) -> None:
    """Traffic of every kind the dashboards show (approvals, a reversal, a refund, a
    decline, a swipe on a reported card), then each query of each Grafana dashboard in
    monitoring/dashboards is run against this stack's Prometheus and must return series."""
    import json
    import urllib.parse
    import urllib.request

    from monitoring.dashboards.build import DASHBOARDS, queries

    endpoints, keyring = secured
    card_no = "SEC000050"
    enrol(secured, 50, card_no)

    def signed(request: object) -> object:
        return keyring.sign("POS1", request)

    first_trace, second_trace = next(_traces), next(_traces)
    first = swipe(secured, card_no, PIN, amount_fen=2_00, trace=first_trace)
    assert first.result == result_pb(ResultCode.OK)
    with channel_to(endpoints.gateway, Role.TERMINAL) as channel:
        pos = pos_pb2_grpc.PosServiceStub(channel)
        reverse = pos.Reverse(
            signed(
                pos_pb2.ReverseRequest(
                    terminal=common_pb2.TerminalContext(
                        terminal_id="POS1", institution_id=HOSPITAL, trace_number=next(_traces)
                    ),
                    original_trace_number=first_trace,
                    card_no=card_no,
                    amount_fen=2_00,
                )
            ),
            timeout=15,
        )  # type: ignore[arg-type]
        second = swipe(secured, card_no, PIN, amount_fen=3_00, trace=second_trace)
        refund = pos.Refund(
            signed(
                pos_pb2.RefundRequest(
                    terminal=common_pb2.TerminalContext(
                        terminal_id="POS1", institution_id=HOSPITAL, trace_number=next(_traces)
                    ),
                    original_trace_number=second_trace,
                    card_no=card_no,
                    amount_fen=1_00,
                )
            ),
            timeout=15,
        )  # type: ignore[arg-type]
    assert [ResultCode(r.result) for r in (reverse, second, refund)] == [ResultCode.OK] * 3
    assert swipe(secured, card_no, WRONG).result == result_pb(ResultCode.PIN_WRONG)
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        reported = reg.ReportPreLoss(registry_pb2.CardRequest(window=window("d"), card_no=card_no))
    assert ResultCode(reported.result) == ResultCode.OK
    assert swipe(secured, card_no, PIN).result == result_pb(ResultCode.CARD_PRE_LOST)

    def query(expr: str) -> list[object]:
        # Grafana's variables, as Grafana would fill them for the last hour / today
        expr = expr.replace("$institution", ".*").replace("$__rate_interval", "1m")
        expr = expr.replace("$__range", "1d")
        url = f"{endpoints.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    exprs = [e for board in DASHBOARDS.values() for e in queries(board)]
    assert len(exprs) >= 12
    empty = exprs
    deadline = time.monotonic() + 60  # rate() needs two scrapes (every 5 s) after the traffic
    while empty and time.monotonic() < deadline:
        time.sleep(2)
        empty = [e for e in empty if not query(e)]
    assert not empty, f"dashboard queries without data: {empty}"


# ---------------------------------------------------------------- issue 15: the defects


def pos_stub(endpoints: stack.Endpoints) -> tuple[grpc.Channel, pos_pb2_grpc.PosServiceStub]:
    channel = channel_to(endpoints.gateway, Role.TERMINAL)
    return channel, pos_pb2_grpc.PosServiceStub(channel)


def terminal_context(
    terminal: str = "POS1", institution: str = HOSPITAL
) -> common_pb2.TerminalContext:
    return common_pb2.TerminalContext(
        terminal_id=terminal, institution_id=institution, trace_number=next(_traces)
    )


def test_an_oversized_field_is_malformed_and_named_not_an_unknown_terminal(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    """A 1 MB card number from a provisioned terminal, MACed: MALFORMED_REQUEST naming the
    field (it was TERMINAL_UNKNOWN: the HSM refused the MAC data), and nothing changes.
    The same at the registry, before any HSM call."""
    endpoints, keyring = secured
    before = person_version(secured, card)
    huge = "9" * 1_000_000
    channel, pos = pos_stub(endpoints)
    with channel:
        authorize = pos.Authorize(
            keyring.sign(
                "POS1",
                pos_pb2.AuthorizeRequest(
                    terminal=terminal_context(),
                    card_no=huge,
                    amount_fen=1_00,
                    pin_block=keyring.pin_block("POS1", PIN, card),
                ),
            ),
            timeout=15,
        )
        balance = pos.BalanceInquiry(
            keyring.sign(
                "POS1",
                pos_pb2.BalanceInquiryRequest(terminal=terminal_context(), card_no=card, ssn=huge),
            ),
            timeout=15,
        )
        blocks = pos.Authorize(
            keyring.sign(
                "POS1",
                pos_pb2.AuthorizeRequest(
                    terminal=terminal_context(),
                    card_no=card,
                    amount_fen=1_00,
                    pin_block=b"\1" * 70_000,
                ),
            ),
            timeout=15,
        )
    assert ResultCode(authorize.result) == ResultCode.MALFORMED_REQUEST
    assert "card_no is longer than 9 characters" in authorize.message
    assert ResultCode(balance.result) == ResultCode.MALFORMED_REQUEST and "ssn" in balance.message
    assert ResultCode(blocks.result) == ResultCode.MALFORMED_REQUEST
    assert "pin_block is longer than 16 bytes" in blocks.message
    for reply in (authorize, balance, blocks):
        assert keyring.reply_is_genuine("POS1", reply)
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        name = reg.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                window=window("huge"),
                ssn=make_ssn(random.Random(90), 990),
                name="名" * 100_000,
                category=int(InsuranceCategory.EMPLOYEE),
            ),
            timeout=15,
        )  # type: ignore[arg-type]
        pin = reg.ChangePin(
            registry_pb2.ChangePinRequest(
                window=window("huge"), card_no=card, new_pin_block=b"\2" * 100_000
            ),
            timeout=15,
        )
        view = reg.GetPerson(registry_pb2.GetPersonRequest(card_no="X" * 500_000), timeout=15)
    assert ResultCode(name.result) == ResultCode.MALFORMED_REQUEST
    assert "name is longer than 30 characters" in name.message
    assert ResultCode(pin.result) == ResultCode.MALFORMED_REQUEST
    assert "new_pin_block" in pin.message
    assert ResultCode(view.result) == ResultCode.MALFORMED_REQUEST and "card_no" in view.message
    assert person_version(secured, card) == before


def test_an_empty_terminal_id_is_the_same_code_at_every_pos_call(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    endpoints, _keyring = secured
    context = terminal_context("")
    requests = {
        "Authorize": pos_pb2.AuthorizeRequest(terminal=context, card_no=card, amount_fen=1_00),
        "BalanceInquiry": pos_pb2.BalanceInquiryRequest(terminal=context, card_no=card),
        "Reverse": pos_pb2.ReverseRequest(terminal=context, card_no=card, original_trace_number=1),
        "Refund": pos_pb2.RefundRequest(
            terminal=context, card_no=card, original_trace_number=1, amount_fen=1_00
        ),
    }
    channel, pos = pos_stub(endpoints)
    with channel:
        replies = {name: getattr(pos, name)(r, timeout=15) for name, r in requests.items()}
    for name, reply in replies.items():
        assert ResultCode(reply.result) == ResultCode.MALFORMED_REQUEST, name
        assert "terminal.terminal_id" in reply.message, name


def test_a_temporary_card_pays_right_after_it_is_made(
    secured: tuple[stack.Endpoints, Keyring],
) -> None:
    """DOMAIN.md: a temporary card's PIN is set when it is made, and it needs no
    activation. Made through the HSM from the window's PIN block, it pays at once."""
    endpoints, keyring = secured
    ssn, temp = make_ssn(random.Random(60), 860), "TMP000060"
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        reg = registry_pb2_grpc.CardRegistryServiceStub(channel)
        registered = reg.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                window=window("t-r"),
                ssn=ssn,
                name="临时",
                phone="13700000060",
                category=int(InsuranceCategory.EMPLOYEE),
            )
        )  # type: ignore[arg-type]
        without_pin = reg.IssueCard(
            registry_pb2.IssueCardRequest(
                window=window("t-0"), ssn=ssn, card_no=temp, kind=int(CardKind.TEMPORARY)
            )
        )  # type: ignore[arg-type]
        issued = reg.IssueCard(
            registry_pb2.IssueCardRequest(
                window=window("t-i"),
                ssn=ssn,
                card_no=temp,
                kind=int(CardKind.TEMPORARY),
                new_pin_block=keyring.pin_block("WIN1", PIN, temp),
            )
        )  # type: ignore[arg-type]
        credited = reg.CreditAccount(
            registry_pb2.CreditRequest(
                window=window("t-c"), ssn=ssn, amount_fen=30_00, source_id="sec-temp-60"
            )
        )
        view = reg.GetPerson(registry_pb2.GetPersonRequest(ssn=ssn))
    assert ResultCode(registered.result) == ResultCode.OK
    assert ResultCode(without_pin.result) == ResultCode.MALFORMED_REQUEST
    assert "new_pin_block" in without_pin.message
    assert ResultCode(issued.result) == ResultCode.OK and issued.card.state == CardState.ACTIVE
    assert ResultCode(credited.result) == ResultCode.OK
    (card_view,) = view.cards
    assert not card_view.initial_pin and card_view.expires_at
    paid = swipe(secured, temp, PIN, amount_fen=9_90)
    assert ResultCode(paid.result) == ResultCode.OK, paid.message
    assert paid.balance_after_fen == 20_10
    assert ResultCode(swipe(secured, temp, WRONG).result) == ResultCode.PIN_WRONG


def test_a_malformed_pin_block_is_refused_before_the_card_colour_and_the_institution(
    secured: tuple[stack.Endpoints, Keyring],
) -> None:
    """Precedence through the real path: a PIN block that is no valid block (12) wins over
    a green card (39), an unknown institution (20) and an unknown card (30)."""
    endpoints, keyring = secured
    ssn, green = make_ssn(random.Random(61), 861), "GRN000061"
    with channel_to(endpoints.registry, Role.WINDOW) as channel:
        enrolled = registry_pb2_grpc.CardRegistryServiceStub(channel).EnrolPerson(
            registry_pb2.EnrolPersonRequest(
                window=window("g"),
                ssn=ssn,
                name="居民",
                phone="13700000061",
                category=int(InsuranceCategory.RESIDENT),
                region="310101",
                card_no=green,
                new_pin_block=keyring.pin_block("WIN1", PIN, green),
            ),
            timeout=15,
        )  # type: ignore[arg-type]
    assert ResultCode(enrolled.result) == ResultCode.OK, enrolled.message
    garbage = b"\x5a" * 16  # the right length, but no block under POS1's PIN key

    def attempt(card_no: str, pin_block: bytes, institution: str = HOSPITAL) -> ResultCode:
        request = pos_pb2.AuthorizeRequest(
            terminal=terminal_context(institution=institution),
            card_no=card_no,
            amount_fen=1_00,
            pin_block=pin_block,
        )
        channel, pos = pos_stub(endpoints)
        with channel:
            reply = pos.Authorize(keyring.sign("POS1", request), timeout=15)
        assert keyring.reply_is_genuine("POS1", reply)
        return ResultCode(reply.result)

    good = keyring.pin_block("POS1", PIN, green)
    assert attempt(green, good) == ResultCode.COLOUR_NOT_ALLOWED
    assert attempt(green, garbage) == ResultCode.PIN_BLOCK_INVALID
    assert attempt(green, b"") == ResultCode.PIN_BLOCK_INVALID
    assert attempt(green, garbage, "NOWHERE001") == ResultCode.PIN_BLOCK_INVALID
    stranger = "ZZZ000061"
    assert attempt(stranger, keyring.pin_block("POS1", PIN, stranger)) == ResultCode.CARD_UNKNOWN
    assert attempt(stranger, garbage) == ResultCode.PIN_BLOCK_INVALID
    assert (
        attempt(stranger, keyring.pin_block("POS1", PIN, stranger), "NOWHERE001")
        == ResultCode.INSTITUTION_UNKNOWN
    )


def test_a_balance_is_told_only_for_the_right_pin_and_wrong_ones_lock(
    secured: tuple[stack.Endpoints, Keyring],
) -> None:
    endpoints, keyring = secured
    card_no = "SEC000062"
    enrol(secured, 62, card_no)

    def enquire(pin: str | None) -> pos_pb2.BalanceInquiryReply:
        request = pos_pb2.BalanceInquiryRequest(
            terminal=terminal_context(),
            card_no=card_no,
            pin_block=keyring.pin_block("POS1", pin, card_no) if pin else b"",
        )
        channel, pos = pos_stub(endpoints)
        with channel:
            reply: pos_pb2.BalanceInquiryReply = pos.BalanceInquiry(
                keyring.sign("POS1", request), timeout=15
            )
        assert keyring.reply_is_genuine("POS1", reply)
        return reply

    right = enquire(PIN)
    assert ResultCode(right.result) == ResultCode.OK and right.balance_fen == 100_00
    replies = [enquire(WRONG), enquire(None), enquire(WRONG), enquire(WRONG), enquire(PIN)]
    assert [ResultCode(r.result) for r in replies] == [
        ResultCode.PIN_WRONG,
        ResultCode.PIN_BLOCK_INVALID,
        ResultCode.PIN_WRONG,
        ResultCode.PIN_TRIES_EXCEEDED,
        ResultCode.CARD_LOCKED,
    ]
    assert all(r.balance_fen == 0 for r in replies)
    assert ResultCode(swipe(secured, card_no, PIN).result) == ResultCode.CARD_LOCKED


def test_every_pos_reply_carries_the_gateways_mac(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    """Approved, declined, replayed, refused-before-the-worker, reversal and refund replies:
    each verifies under the terminal's MAC key, and none does once a field is changed."""
    endpoints, keyring = secured
    trace = next(_traces)
    replies: list[object] = [
        swipe(secured, card, PIN, trace=trace, amount_fen=1_00),
        swipe(secured, card, PIN, trace=trace, amount_fen=1_00),  # replayed
        swipe(secured, card, WRONG),
        swipe(secured, card, PIN, tamper=True),  # MAC_INVALID: answered, and MACed
        swipe(secured, "ZZZ000099", PIN),  # CARD_UNKNOWN, decided at the gateway
    ]
    channel, pos = pos_stub(endpoints)
    with channel:
        replies.append(
            pos.Refund(
                keyring.sign(
                    "POS1",
                    pos_pb2.RefundRequest(
                        terminal=terminal_context(),
                        original_trace_number=trace,
                        card_no=card,
                        amount_fen=50,
                    ),
                ),
                timeout=15,
            )
        )
        replies.append(
            pos.Reverse(
                keyring.sign(
                    "POS1",
                    pos_pb2.ReverseRequest(
                        terminal=terminal_context(), original_trace_number=trace, card_no=card
                    ),
                ),
                timeout=15,
            )
        )
    codes = [ResultCode(r.result) for r in replies]  # type: ignore[attr-defined]
    assert codes == [
        ResultCode.OK,
        ResultCode.OK,
        ResultCode.PIN_WRONG,
        ResultCode.MAC_INVALID,
        ResultCode.CARD_UNKNOWN,
        ResultCode.OK,
        ResultCode.OK,
    ]
    for reply in replies:
        assert keyring.reply_is_genuine("POS1", reply), reply
        changed = type(reply)()  # type: ignore[operator]
        changed.CopyFrom(reply)
        changed.request_id += "0"
        assert not keyring.reply_is_genuine("POS1", changed)
    assert not keyring.reply_is_genuine("POS2", replies[0])  # another terminal's key


def test_the_lmk_is_in_no_process_environment(secured: tuple[stack.Endpoints, Keyring]) -> None:
    """Given to `up` in its environment, the LMK goes into the HSM's owner-only file and
    into no process's environment: every /proc/PID/environ on this machine is read."""
    state_dir = secured_state_dir(secured)
    lmk_path = state_dir / "hsm" / "lmk.hex"
    assert lmk_path.read_text().strip() == LMK_HEX
    assert oct(lmk_path.stat().st_mode & 0o777) == "0o600"
    stack_processes, holders = 0, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if str(state_dir).encode() in environ:
            stack_processes += 1
        if LMK_HEX.encode() in environ:
            holders.append(entry.name)
    record = json.loads((state_dir / stack.STATE_FILE).read_text())
    own = [c for c in record["components"] if c["kind"] in supervisor.MEDCLEAR_ROLES]
    assert len(own) >= 5 and stack_processes >= len(own)  # each of them was read
    assert holders == []
    settings = Settings(state_dir=state_dir)
    hsm_pid = next(r.pid for r in stack.status(settings) if r.name == "hsm")
    assert LMK_HEX.encode() not in Path(f"/proc/{hsm_pid}/cmdline").read_bytes()


def test_the_cli_asks_for_a_pin_only_where_it_can_and_says_so_in_a_script(
    secured: tuple[stack.Endpoints, Keyring], card: str
) -> None:
    """`medclear card change-pin` and `medclear pos swipe` without --pin and without a
    terminal to ask on: a clear error (exit 1), not a getpass traceback and "Aborted."."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCLEAR_")}
    env["MEDCLEAR_STATE_DIR"] = str(secured_state_dir(secured))
    medclear = str(Path(sys.executable).parent / "medclear")
    for argv in (
        [medclear, "card", "change-pin", "--card", card],
        [
            medclear,
            "pos",
            "swipe",
            "--card",
            card,
            "--amount",
            "1.00",
            "--institution",
            HOSPITAL,
            "--terminal",
            "POS1",
        ],
    ):
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 1, output
        assert "give it with --pin" in output and "Traceback" not in output, output
        assert "Aborted" not in output
