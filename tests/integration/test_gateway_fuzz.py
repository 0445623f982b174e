"""Hostile and malformed POS requests against the gateway of a real stack (hypothesis):
random bytes and unicode as card numbers, huge and negative amounts, overlong strings,
wrong or missing MACs, missing fields, and bytes that are no protobuf at all, sent
through a raw generic gRPC call. Every answer must be a clear one (a result code other
than UNSPECIFIED, never an approval; or INVALID_ARGUMENT / PERMISSION_DENIED with
details; grpc's own refusal of undecodable bytes), the gateway must stay healthy, and a
seeded person's balance and state version, and the approvals on the events topic, must
not change. `medclear drill fuzz --examples N` runs the same generator for longer.

Terminal security is on (TLS off): the MAC check is part of what is attacked, and
signed requests (a provisioned terminal's real MAC) reach the routing and the workers
with hostile fields."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings

from medclear.drills.access import StackAccess, access
from medclear.drills.fuzz import fuzz_cases
from medclear.drills.hostile import FuzzCase, FuzzTarget, fuzz_victim, gateway_healthy, snapshot
from medclear.infra.settings import Settings
from medclear.sim.city import Resident
from tests.integration.running import running_stack

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.timeout(600)]

EXAMPLES = 300


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[StackAccess, Resident]]:
    config = Settings(
        tls=False,
        terminal_security=True,
        state_dir=tmp_path_factory.mktemp("fuzz") / ".medclear",
        command_partitions=2,
        event_partitions=2,
        jobs="abnormal",
    )
    with running_stack(config):
        a = access(config)
        yield a, fuzz_victim(a)


def test_hostile_requests_get_clear_codes_and_change_nothing(
    target: tuple[StackAccess, Resident],
) -> None:
    a, victim = target
    before = snapshot(a, victim.ssn)
    fuzz = FuzzTarget(a)
    wide = "Ｓ" * 100_000

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(fuzz_cases(victim.card_no, victim.ssn))
    @example(FuzzCase("Authorize", raw=b"\xff\xff\xff\xff"))
    @example(FuzzCase("Refund", raw=b"\x0a\x05\x12\x03\xff\xfe\xfd"))  # bad UTF-8
    @example(
        FuzzCase("Authorize", (("card_no", victim.card_no), ("amount_fen", -(2**63))), mac="signed")
    )
    @example(
        FuzzCase(
            "Authorize",
            (("amount_fen", 1_00), ("card_no", victim.card_no)),
            (("institution_id", "310101H00001"), ("terminal_id", "TFUZZ1"), ("trace_number", 1)),
            mac="none",
        )
    )
    @example(FuzzCase("Reverse", (("card_no", wide), ("ssn", wide)), mac="signed"))
    @example(FuzzCase("BalanceInquiry"))
    def hostile(case: FuzzCase) -> None:
        fuzz.check(case)

    try:
        hostile()
    finally:
        fuzz.close()
    print(dict(fuzz.results))
    assert gateway_healthy(a)
    assert snapshot(a, victim.ssn) == before
