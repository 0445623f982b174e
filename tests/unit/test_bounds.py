"""Every string and bytes field of every request of the POS and registry services has a
named bound, and a request over one, or of the wrong form, is named by its field."""

from __future__ import annotations

import pytest

from medclear.infra import bounds
from medclear.v1 import common_pb2, pos_pb2, registry_pb2

SERVICES = [
    pos_pb2.DESCRIPTOR.services_by_name["PosService"],
    registry_pb2.DESCRIPTOR.services_by_name["CardRegistryService"],
]
REQUESTS = sorted(
    {m.input_type.full_name: m.input_type for s in SERVICES for m in s.methods}.items()
)


@pytest.mark.parametrize("name,descriptor", REQUESTS, ids=[n for n, _ in REQUESTS])
def test_every_string_and_bytes_field_has_a_bound(name: str, descriptor: object) -> None:
    assert bounds.unbounded_fields(descriptor) == []  # type: ignore[arg-type]


def terminal(terminal_id: str = "T1") -> common_pb2.TerminalContext:
    return common_pb2.TerminalContext(
        terminal_id=terminal_id, institution_id="310101P00001", trace_number=7
    )


def test_an_oversized_field_is_named_whatever_it_is() -> None:
    huge = "A" * 1_000_000
    request = pos_pb2.AuthorizeRequest(terminal=terminal(), card_no=huge, amount_fen=1)
    assert bounds.pos_problem(request) == "card_no is longer than 9 characters"
    request = pos_pb2.AuthorizeRequest(terminal=terminal(huge), card_no="A00000001")
    assert bounds.pos_problem(request) == "terminal.terminal_id is longer than 64 characters"
    request = pos_pb2.BalanceInquiryRequest(
        terminal=terminal(), card_no="A00000001", pin_block=b"\0" * 70_000
    )
    assert bounds.pos_problem(request) == "pin_block is longer than 16 bytes"
    window = registry_pb2.SetPhoneRequest(phone="1" * 12)
    assert bounds.oversized(window) == "phone is longer than 11 characters"
    nested = registry_pb2.CardRequest(window=common_pb2.WindowContext(request_id="r" * 65))
    assert bounds.oversized(nested) == "window.request_id is longer than 64 characters"


@pytest.mark.parametrize(
    "request_type",
    [
        pos_pb2.AuthorizeRequest,
        pos_pb2.BalanceInquiryRequest,
        pos_pb2.ReverseRequest,
        pos_pb2.RefundRequest,
    ],
)
def test_an_empty_terminal_id_is_the_same_problem_for_every_pos_call(request_type: type) -> None:
    request = request_type(terminal=terminal(""), card_no="A00000001")
    problem = bounds.pos_problem(request)
    assert problem is not None and problem.startswith("terminal.terminal_id must be")


def test_a_well_formed_swipe_has_no_problem() -> None:
    request = pos_pb2.AuthorizeRequest(terminal=terminal(), card_no="A00000001", amount_fen=1_00)
    assert bounds.pos_problem(request) is None
    assert bounds.pos_problem(
        pos_pb2.AuthorizeRequest(terminal=terminal(), card_no="A00000001", amount_fen=0)
    ) == ("amount_fen must be 1 to 10,000,000 fen")
