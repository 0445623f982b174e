"""Bounds on every string and bytes field of every request medclear's gRPC servers take,
and the form checks the POS gateway makes before anything else.

Checked first, before any HSM call or command: a request with a field over its bound, or
with a field of the wrong form, is answered MALFORMED_REQUEST with the field named in the
reply's message. A field without a bound here is a programmer error, caught by
`unbounded_fields` (a unit test runs it over every request of every service).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from clearing import validate
from clearing.limits import (
    CARD_NO_CHARS,
    ID_CHARS_MAX,
    NAME_CHARS_MAX,
    PHONE_CHARS,
    PVV_BYTES,
    REASON_CHARS_MAX,
    REGION_CHARS_MAX,
    SSN_CHARS,
)

PIN_BLOCK_BYTES_MAX = 16  # ISO 9564 format 4 (AES); formats 0, 1 and 3 are 8
MAC_BYTES_MAX = 16  # AES-CMAC; a TDES retail MAC is 8
CHALLENGE_BYTES_MAX = 255  # the terminal's unpredictable number (EMV: 4 bytes)
CRYPTOGRAM_BYTES_MAX = 8
ENROL_BATCH_MAX = 1_000  # persons in one EnrolPersons call
SET_PINS_MAX = 1_000  # requests in one HSM SetPins call

# Field name → most characters (strings) or bytes it may hold, wherever it appears.
FIELD_BOUNDS: dict[str, int] = {
    # ids
    "terminal_id": ID_CHARS_MAX,
    "institution_id": ID_CHARS_MAX,
    "original_terminal_id": ID_CHARS_MAX,
    "window_id": ID_CHARS_MAX,
    "operator_id": ID_CHARS_MAX,
    "request_id": ID_CHARS_MAX,
    "source_id": ID_CHARS_MAX,
    # the card and its holder (EF05 / EF06)
    "card_no": CARD_NO_CHARS,
    "old_card_no": CARD_NO_CHARS,
    "new_card_no": CARD_NO_CHARS,
    "ssn": SSN_CHARS,
    "name": NAME_CHARS_MAX,
    "phone": PHONE_CHARS,
    "region": REGION_CHARS_MAX,
    "reason": REASON_CHARS_MAX,
    # terminal security
    "pin_block": PIN_BLOCK_BYTES_MAX,
    "old_pin_block": PIN_BLOCK_BYTES_MAX,
    "new_pin_block": PIN_BLOCK_BYTES_MAX,
    "pin_verification_value": PVV_BYTES,
    "mac": MAC_BYTES_MAX,
    "card_challenge": CHALLENGE_BYTES_MAX,
    "card_cryptogram": CRYPTOGRAM_BYTES_MAX,
}

_SIZED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def _sized_fields(descriptor: Descriptor, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in descriptor.fields:
        if f.type in _SIZED:
            yield prefix + f.name, f
        elif f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
            yield from _sized_fields(f.message_type, f"{prefix}{f.name}.")


def unbounded_fields(descriptor: Descriptor) -> list[str]:
    """The string and bytes fields of a request type that have no bound (should be none)."""
    return [path for path, f in _sized_fields(descriptor) if f.name not in FIELD_BOUNDS]


def oversized(message: Any, prefix: str = "") -> str | None:
    """The first string or bytes field over its bound, as a sentence naming it; None."""
    for f in message.DESCRIPTOR.fields:
        if f.type in _SIZED:
            value = getattr(message, f.name)
            bound = FIELD_BOUNDS[f.name]
            if len(value) > bound:
                unit = "characters" if f.type == FieldDescriptor.TYPE_STRING else "bytes"
                return f"{prefix}{f.name} is longer than {bound} {unit}"
        elif f.type == FieldDescriptor.TYPE_MESSAGE and message.HasField(f.name):
            found = oversized(getattr(message, f.name), f"{prefix}{f.name}.")
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------- POS forms

FormCheck = tuple[str, Callable[[Any], bool], str]  # field, well formed?, what it must be

_TERMINAL: list[FormCheck] = [
    (
        "terminal.terminal_id",
        lambda r: validate.is_id(r.terminal.terminal_id),
        "an id of 1-64 letters, digits or . _ : / -",
    ),
    ("terminal.trace_number", lambda r: r.terminal.trace_number > 0, "above 0"),
    (
        "terminal.institution_id",
        lambda r: validate.is_id(r.terminal.institution_id),
        "an institution id",
    ),
]
_CARD: list[FormCheck] = [
    ("card_no", lambda r: validate.is_card_no(r.card_no), "9 capital letters or digits"),
    (
        "ssn",
        lambda r: not r.ssn or validate.is_ssn(r.ssn),
        "empty, or 18 characters with a valid check character",
    ),
]
_AMOUNT: FormCheck = (
    "amount_fen",
    lambda r: validate.is_amount_fen(r.amount_fen),
    "1 to 10,000,000 fen",
)
_ORIGINAL: FormCheck = ("original_trace_number", lambda r: r.original_trace_number > 0, "above 0")

POS_FORMS: dict[str, list[FormCheck]] = {
    "AuthorizeRequest": [*_TERMINAL, *_CARD, _AMOUNT],
    "BalanceInquiryRequest": [*_TERMINAL, *_CARD],
    "ReverseRequest": [
        *_TERMINAL,
        *_CARD,
        _ORIGINAL,
        ("amount_fen", lambda r: r.amount_fen >= 0, "0 (not checked) or above"),
    ],
    "RefundRequest": [
        *_TERMINAL,
        *_CARD,
        _ORIGINAL,
        _AMOUNT,
        (
            "original_terminal_id",
            lambda r: not r.original_terminal_id or validate.is_id(r.original_terminal_id),
            "empty, or a terminal id",
        ),
    ],
}


def pos_problem(request: Any) -> str | None:
    """What makes a POS request malformed, naming the field: a field over its bound, or
    one of the wrong form (in the order of POS_FORMS). None when it is well formed."""
    found = oversized(request)
    if found is not None:
        return found
    for name, well_formed, expected in POS_FORMS[request.DESCRIPTOR.name]:
        if not well_formed(request):
            return f"{name} must be {expected}"
    return None
