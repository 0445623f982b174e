"""The core's enums and the proto's must agree name for name, number for number."""

from __future__ import annotations

from enum import IntEnum

import pytest

from clearing import codes
from medclear.v1 import common_pb2

PAIRS = [
    (codes.ResultCode, common_pb2.ResultCode),
    (codes.CardKind, common_pb2.CardKind),
    (codes.CardColour, common_pb2.CardColour),
    (codes.InsuranceCategory, common_pb2.InsuranceCategory),
    (codes.CardState, common_pb2.CardState),
    (codes.InstitutionType, common_pb2.InstitutionType),
]


@pytest.mark.parametrize(
    ("core_enum", "proto_enum"), PAIRS, ids=lambda e: getattr(e, "__name__", "")
)
def test_core_enum_matches_proto(core_enum: type[IntEnum], proto_enum: object) -> None:
    proto_items = dict(proto_enum.items())  # type: ignore[attr-defined]
    assert {m.name: int(m) for m in core_enum} == proto_items


def test_every_result_code_has_a_message() -> None:
    missing = [
        c.name
        for c in codes.ResultCode
        if c != codes.ResultCode.RESULT_CODE_UNSPECIFIED and c not in codes.MESSAGES
    ]
    assert missing == []


def test_every_non_active_card_state_has_a_decline() -> None:
    states = set(codes.CardState) - {codes.CardState.CARD_STATE_UNSPECIFIED, codes.CardState.ACTIVE}
    assert states == set(codes.DECLINE_OF_CARD_STATE)
