"""What a POS request is refused for before any person is looked at, and the answer to a
request for a card that no person holds.

The gateway runs `INGRESS_CHECKS` on every POS request, then routes it to the person's
worker, which runs clearing/pos.py's list on the person (or `decide_unrouted` runs it on
no person). The two lists are one order, asserted below when this module is imported
(`SWIPE_ORDER`) and tried pairwise by tests/unit/test_ingress.py:

    ingress:  form (10) → request MAC (11; 14 for a terminal without keys) → for a swipe
              whose chip cryptogram fails, the PIN block's form (12) → the cryptogram (13)
    person:   clearing/pos.py from the institution (20) on

Two rules are checked on both sides of the routing. The form: the gateway checks the
request's fields and bounds (medclear/infra/bounds.py), the core the command it became.
The PIN block: the ingress list asks its form only when the cryptogram fails (so that a
malformed block, 12, wins over it, 13); otherwise the person's worker checks the block
against the card's PIN, one HSM call where two would say the same. A terminal without
keys (14) is answered before its cryptogram (13): nothing of a request that cannot be
authenticated is looked at.

The checks are pure. Each reads an `Arrival` (the request's form, and what the HSM has
answered so far) and passes, refuses, or names the HSM answer it needs (`Ask`); the
adapter asks the HSM and runs the list again with the answer added. A request thus costs
the HSM the calls its checks need and no more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from clearing import pos, returns
from clearing.codes import ResultCode
from clearing.decisions import unchanged
from clearing.model import (
    Authorize,
    BalanceInquiry,
    Command,
    PinOutcome,
    Policy,
    Refund,
    Reply,
    Reverse,
)


class Ask(Enum):
    """An answer of the HSM that a check needs before it can decide."""

    MAC = "mac"  # the request's MAC under its terminal's key: OK, MAC_INVALID, TERMINAL_UNKNOWN
    CRYPTOGRAM = "cryptogram"  # the chip's cryptogram: OK, CRYPTOGRAM_INVALID, UNAVAILABLE
    PIN_FORM = "pin_form"  # the PIN block's form: PinOutcome.NOT_VERIFIED, INVALID_BLOCK, ...


@dataclass(frozen=True, slots=True)
class Arrival:
    """A POS request as the ingress checks see it."""

    form_problem: str | None  # the field that makes the request malformed; None: none
    secured: bool  # terminal security on: MACs, cryptograms and PIN blocks are checked
    swipe: bool  # an Authorize (the one request that may carry a chip cryptogram)
    mac: ResultCode | None = None  # None: not asked yet
    cryptogram: ResultCode | None = None
    pin_form: PinOutcome | None = None

    def told(self, ask: Ask, answer: ResultCode | PinOutcome) -> Arrival:
        """This arrival with the HSM's answer to `ask`."""
        if ask is Ask.PIN_FORM:
            return replace(self, pin_form=PinOutcome(answer))
        if ask is Ask.MAC:
            return replace(self, mac=ResultCode(answer))
        return replace(self, cryptogram=ResultCode(answer))


@dataclass(frozen=True, slots=True)
class Refused:
    code: ResultCode
    detail: str = ""  # for a malformed request: the field that made it so


Verdict = Refused | Ask | None  # None: this check passes
Check = Callable[[Arrival], Verdict]


def _form(a: Arrival) -> Verdict:
    if a.form_problem is not None:
        return Refused(ResultCode.MALFORMED_REQUEST, a.form_problem)
    return None


def _mac(a: Arrival) -> Verdict:
    if not a.secured:
        return None
    if a.mac is None:
        return Ask.MAC
    return None if a.mac == ResultCode.OK else Refused(a.mac)


def _pin_block(a: Arrival) -> Verdict:
    """Asked here only when the cryptogram fails; otherwise the person's worker checks the
    block against the card's PIN."""
    if not (a.secured and a.swipe):
        return None
    if a.cryptogram is None:
        return Ask.CRYPTOGRAM
    if a.cryptogram != ResultCode.CRYPTOGRAM_INVALID:
        return None
    if a.pin_form is None:
        return Ask.PIN_FORM
    return Refused(ResultCode.PIN_BLOCK_INVALID) if a.pin_form == PinOutcome.INVALID_BLOCK else None


def _cryptogram(a: Arrival) -> Verdict:
    if not (a.secured and a.swipe):
        return None
    if a.cryptogram is None:
        return Ask.CRYPTOGRAM
    return None if a.cryptogram == ResultCode.OK else Refused(a.cryptogram)


# Each entry names the lowest code its check can answer (the MAC's: 11, or 14).
INGRESS_LIST: tuple[tuple[ResultCode, Check], ...] = (
    (ResultCode.MALFORMED_REQUEST, _form),
    (ResultCode.MAC_INVALID, _mac),
    (ResultCode.PIN_BLOCK_INVALID, _pin_block),
    (ResultCode.CRYPTOGRAM_INVALID, _cryptogram),
)
INGRESS_ORDER = pos.in_code_order(tuple(code for code, _ in INGRESS_LIST), "the ingress checks")
INGRESS_CHECKS = tuple(check for _code, check in INGRESS_LIST)

# The rules checked on both sides of the routing (above); the rest of the person's list
# comes after the whole ingress list.
CHECKED_TWICE = frozenset({ResultCode.MALFORMED_REQUEST, ResultCode.PIN_BLOCK_INVALID})
SWIPE_ORDER = pos.in_code_order(
    INGRESS_ORDER + tuple(code for code in pos.SWIPE_ORDER if code not in CHECKED_TWICE),
    "the ingress and the person's checks",
)


def verdict(arrival: Arrival) -> Verdict:
    """The first refusal or question of the ingress list; None: the request goes on."""
    for check in INGRESS_CHECKS:
        said = check(arrival)
        if said is not None:
            return said
    return None


def decide_unrouted(command: Command, policy: Policy) -> Reply:
    """A command for a card the card index does not know (the gateway's, the card
    registry's), decided by the core on no person: a swipe or an enquiry by the person's
    list (its PIN block, the institution, then CARD_UNKNOWN), a reversal or a refund as
    for a swipe never seen (ORIGINAL_NOT_FOUND), a window operation CARD_UNKNOWN. Nothing
    is recorded: there is no person to record it on."""
    match command:
        case Authorize():
            return pos.decide_authorize(None, command, policy).reply
        case BalanceInquiry():
            return pos.decide_balance(None, command, policy).reply
        case Reverse():
            return returns.decide_reverse(None, command).reply
        case Refund():
            return returns.decide_refund(None, command).reply
    return unchanged(None, command.request_id, ResultCode.CARD_UNKNOWN, command.at_ms).reply
