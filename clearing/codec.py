"""Commands, events, replies and person state to bytes and back (JSON, type-tagged).

The records are the frozen dataclasses of clearing.model. Each class's type hints are
read once, at its first use, into a plan: which fields need converting (enums, nested
records, tuples, optional records) and which may be left out. Encoding and decoding then
follow the plan, with no reflection per record, and orjson writes and reads the JSON
(compact, UTF-8, the bytes `json.dumps(..., ensure_ascii=False, separators=(",", ":"))`
gave; 3.1x faster to encode and to decode than the reflective codec on the stdlib's json,
`medclear bench codec`: docs/PERFORMANCE.md). Adding a field needs no codec change.
Unknown fields are ignored and missing ones take their default: old changelogs stay
readable.

A field that holds its default is left out when that default is empty (0, "", False,
None, (), an enum's 0 member). Most of a person's bytes were such zeros: the 64 replies
it remembers carry fifteen fields each, most of them 0, and the whole person is written
to the changelog on every decision. An empty default therefore is part of the format:
never change one to a non-empty value (add a field instead). Defaults that are not
empty (e.g. a card's daily pharmacy limit, a named constant that policy may change) are
always written, so a stored record never takes a new value from a changed constant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from enum import Enum, IntEnum
from typing import Any

import orjson

from clearing import abnormal, model
from clearing.errors import ClearingError

RECORD_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        model.RegisterPerson,
        model.IssueCard,
        model.CardCommand,
        model.CreditAccount,
        model.Authorize,
        model.BalanceInquiry,
        model.Reverse,
        model.Refund,
        model.ExpirePreLoss,
        model.ReplaceCard,
        model.SetPharmacyLimit,
        model.SetPhone,
        model.CancelPerson,
        model.EnrolPerson,
        model.QueryPerson,
        model.PersonRegistered,
        model.CardIssued,
        model.CardStateChanged,
        model.PinChanged,
        model.AccountCredited,
        model.SwipeApproved,
        model.SwipeDeclined,
        model.SwipeReversed,
        model.ReversalUnmatched,
        model.Refunded,
        model.PinTriesReset,
        model.PharmacyLimitSet,
        model.PhoneSet,
        model.PersonCancelled,
        model.Reply,
        model.Person,
        model.Card,
        model.SwipeRecord,
        model.CreditRecord,
        abnormal.Alert,
    )
}

TYPE_KEY = "@"  # the key of an encoded record that names its class

Convert = Callable[[Any], Any] | None  # None: the value is taken as it is


class CodecError(ClearingError, ValueError):
    """Bytes that are not a record of this version of medclear."""


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, Enum):
        return bool(value.value == 0)
    return type(value) in (int, str, bool, tuple) and not value


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """How one record class is written and read."""

    out: tuple[tuple[str, bool, Convert], ...]  # (field, may be left out, to plain)
    into: dict[str, Convert]  # field → from plain

    def to_plain(self, record: Any) -> dict[str, Any]:
        plain: dict[str, Any] = {}
        for name, omittable, convert in self.out:
            value = getattr(record, name)
            if omittable and not value:  # an empty default: see the module's docstring
                continue
            plain[name] = value if convert is None else convert(value)
        return plain

    def from_plain(self, cls: type[Any], data: dict[str, Any]) -> Any:
        into = self.into
        kwargs = {}
        for name, value in data.items():
            if name in into:
                convert = into[name]
                kwargs[name] = value if convert is None else convert(value)
        return cls(**kwargs)


_PLANS: dict[type[Any], _Plan] = {}


def _plan(cls: type[Any]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        out = tuple(
            (
                f.name,
                f.default is not dataclasses.MISSING and _is_empty(f.default),
                _converter(hints[f.name], writing=True),
            )
            for f in fields
        )
        plan = _PLANS[cls] = _Plan(
            out, {f.name: _converter(hints[f.name], writing=False) for f in fields}
        )
    return plan


def _converter(hint: Any, writing: bool) -> Convert:
    """How a value of this type becomes JSON's (writing) or JSON's value becomes one of
    this type (reading); None: taken as it is."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        inner = _converter(_optional_of(hint), writing)
        return None if inner is None else (lambda v: None if v is None else inner(v))
    if origin is tuple:
        item = _converter(typing.get_args(hint)[0], writing)
        sequence: type[Any] = list if writing else tuple
        return sequence if item is None else (lambda v: sequence(map(item, v)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        record_cls = hint  # its plan is looked up when first needed: records may nest
        if writing:
            return lambda v: _plan(record_cls).to_plain(v)
        return lambda v: _plan(record_cls).from_plain(record_cls, v)
    if isinstance(hint, type) and issubclass(hint, Enum):
        if not writing:
            return hint
        return int if issubclass(hint, IntEnum) else _enum_value
    return None


def _enum_value(member: Enum) -> Any:
    return member.value


def _optional_of(hint: Any) -> Any:
    (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return inner


def encode(record: Any) -> bytes:
    body = _plan(type(record)).to_plain(record)
    body[TYPE_KEY] = type(record).__name__
    return orjson.dumps(body)


def decode(raw: bytes) -> Any:
    try:
        data = orjson.loads(raw)
        cls = RECORD_TYPES[data.pop(TYPE_KEY)]
        return _plan(cls).from_plain(cls, data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CodecError(f"undecodable record: {exc}") from exc
