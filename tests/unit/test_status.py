"""google.rpc.Status details: what a server attaches is what a client reads back."""

from __future__ import annotations

from typing import Any

import grpc

from medclear.infra import status


class _Failed:
    """A failed call as a client sees it: code, message, trailers."""

    def __init__(self, st: grpc.Status) -> None:
        self._status = st

    def code(self) -> grpc.StatusCode:
        return self._status.code  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._status.details  # type: ignore[no-any-return]

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


def test_error_info_and_the_bad_field_round_trip() -> None:
    st = status.error_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "data longer than 8 bytes",
        status.Reason.FIELD_INVALID,
        metadata={"key_id": "tak-T1"},
        bad_field="data",
    )
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT and st.details.startswith("data")
    found = status.details_of(_Failed(st))
    assert found == status.ErrorDetails(
        "FIELD_INVALID",
        status.DOMAIN,
        {"key_id": "tak-T1"},
        (("data", "data longer than 8 bytes"),),
    )
    assert status.describe(_Failed(st)) == (
        "INVALID_ARGUMENT data longer than 8 bytes "
        "(FIELD_INVALID; key_id=tak-T1; field data: data longer than 8 bytes)"
    )


def test_without_a_field_there_is_no_bad_request_and_without_details_none() -> None:
    st = status.error_status(
        grpc.StatusCode.PERMISSION_DENIED, "terminal may not call X", status.Reason.ROLE_NOT_ALLOWED
    )
    found = status.details_of(_Failed(st))
    assert found is not None and found.fields == () and found.reason == "ROLE_NOT_ALLOWED"
    bare = grpc.Status()  # a deadline or a transport failure carries no details
    bare.code, bare.details, bare.trailing_metadata = grpc.StatusCode.UNAVAILABLE, "down", ()
    assert status.details_of(_Failed(bare)) is None
    assert status.describe(_Failed(bare)) == "UNAVAILABLE down"
