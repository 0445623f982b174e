"""gRPC errors with google.rpc.Status details (the richer error model of AIP-193).

medclear answers what it can decide with a result code in the reply: a declined swipe or a
malformed field of a swipe is an answer, not an error (DESIGN.md: result codes are an
enum, and the POS terminal reads them). A gRPC error is what a call gets when it cannot
be answered at all: a request that does not decode, a caller whose role may not call the
method, an HSM request naming a key it does not hold or a field it cannot use. Such an
error carries, in the `grpc-status-details-bin` trailer, a google.rpc.Status with
- an ErrorInfo: `reason` (a Reason below, UPPER_SNAKE), `domain` DOMAIN, and metadata
  (the method, the role, the key id: never key material, a PIN or a card number);
- a BadRequest when one field is at fault, naming it (`field`) and what is wrong with it.

`details_of` reads them back from a failed call, for the CLI and the HSM client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "medclear.v1"  # ErrorInfo.domain: the API that raised the error
DETAILS_KEY = "grpc-status-details-bin"  # the trailer gRPC carries the Status in


class Reason(StrEnum):
    """ErrorInfo.reason: why a call could not be answered."""

    REQUEST_UNDECODABLE = "REQUEST_UNDECODABLE"  # the bytes are not the request message
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"  # the caller's certificate role may not call it
    KEY_NOT_FOUND = "KEY_NOT_FOUND"  # the HSM holds no such key (or version)
    FIELD_INVALID = "FIELD_INVALID"  # a field the service cannot use (BadRequest names it)
    REQUEST_REFUSED = "REQUEST_REFUSED"  # not one field: the request as a whole (a key
    # that exists already, components that do not form a key)


def error_status(
    code: grpc.StatusCode,
    message: str,
    reason: Reason,
    *,
    metadata: dict[str, str] | None = None,
    bad_field: str = "",
) -> grpc.Status:
    """The status of a call that cannot be answered, with its details."""
    info = error_details_pb2.ErrorInfo(reason=reason.value, domain=DOMAIN, metadata=metadata or {})
    details = [_packed(info)]
    if bad_field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=bad_field, description=message
        )
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    number: int = code.value[0]  # grpc.StatusCode's number is google.rpc.Code's
    status = status_pb2.Status(code=number, message=message, details=details)
    return rpc_status.to_status(status)


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: Reason,
    *,
    metadata: dict[str, str] | None = None,
    bad_field: str = "",
) -> NoReturn:
    """End the call with that status and its details."""
    status = error_status(code, message, reason, metadata=metadata, bad_field=bad_field)
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # it raises


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call's google.rpc.Status says, read back."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    fields: tuple[tuple[str, str], ...] = ()  # (field, description) of a BadRequest

    def describe(self) -> str:
        """One line for a person: the reason, the metadata, the fields at fault."""
        parts = [self.reason] if self.reason else []
        parts += [f"{k}={v}" for k, v in sorted(self.metadata.items())]
        parts += [f"field {name}: {text}" for name, text in self.fields]
        return "; ".join(parts)


def details_of(error: Any) -> ErrorDetails | None:
    """The details of a failed call (grpc.RpcError or grpc.aio.AioRpcError), or None when
    it carries no google.rpc.Status (a deadline, a transport failure, another server)."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    raw = next((value for key, value in trailers or () if key == DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return None
    status = status_pb2.Status.FromString(raw)
    reason, domain, metadata, fields = "", "", {}, []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad):
            fields += [(v.field, v.description) for v in bad.field_violations]
    return ErrorDetails(reason, domain, metadata, tuple(fields))


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def describe(error: Any) -> str:
    """A failed call for a person: `CODE message (reason; key=value; field f: why)`."""
    code = error.code().name if hasattr(error, "code") else type(error).__name__
    text = f"{code} {error.details() if hasattr(error, 'details') else error}"
    found = details_of(error)
    return f"{text} ({found.describe()})" if found is not None and found.describe() else text
