"""Commands, events, replies and person state to bytes and back (JSON, type-tagged).

The records are the frozen dataclasses of clearing.model; this module walks their type
hints once per class, so adding a field needs no codec change. Unknown fields are
ignored and missing ones take their default: old changelogs stay readable.

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
import json
import types
import typing
from enum import Enum, IntEnum
from typing import Any

from clearing import abnormal, model
from clearing.errors import ClearingError

RECORD_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        model.RegisterPerson, model.IssueCard, model.CardCommand, model.CreditAccount,
        model.Authorize, model.BalanceInquiry, model.Reverse, model.Refund,
        model.ExpirePreLoss, model.ReplaceCard, model.SetPharmacyLimit, model.SetPhone,
        model.CancelPerson, model.EnrolPerson, model.QueryPerson,
        model.PersonRegistered, model.CardIssued, model.CardStateChanged, model.PinChanged,
        model.AccountCredited, model.SwipeApproved, model.SwipeDeclined, model.SwipeReversed,
        model.ReversalUnmatched, model.Refunded, model.PinTriesReset, model.PharmacyLimitSet,
        model.PhoneSet,
        model.PersonCancelled,
        model.Reply, model.Person, model.Card, model.SwipeRecord, model.CreditRecord,
        abnormal.Alert,
    )
}  # fmt: skip


class CodecError(ClearingError, ValueError):
    """Bytes that are not a record of this version of medclear."""


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_EMPTY_DEFAULTS: dict[type[Any], tuple[tuple[str, bool], ...]] = {}


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, Enum):
        return bool(value.value == 0)
    return type(value) in (int, str, bool, tuple) and not value


def _fields(cls: type[Any]) -> tuple[tuple[str, bool], ...]:
    """(name, may be left out) for each field of a record class."""
    fields = _EMPTY_DEFAULTS.get(cls)
    if fields is None:
        fields = _EMPTY_DEFAULTS[cls] = tuple(
            (f.name, f.default is not dataclasses.MISSING and _is_empty(f.default))
            for f in dataclasses.fields(cls)
        )
    return fields


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        plain = {}
        for name, omittable in _fields(type(value)):
            item = getattr(value, name)
            if omittable and _is_empty(item):
                continue
            plain[name] = _to_plain(item)
        return plain
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, IntEnum):
        return int(value)
    return value


def _from_plain(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _from_plain(args[0], value)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        return tuple(_from_plain(item, v) for v in value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value)
    return value


def _build(cls: type[Any], data: dict[str, Any]) -> Any:
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _from_plain(hints[k], v) for k, v in data.items() if k in known}
    return cls(**kwargs)


def encode(record: Any) -> bytes:
    body = _to_plain(record)
    body["@"] = type(record).__name__
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def decode(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
        cls = RECORD_TYPES[data.pop("@")]
        return _build(cls, data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CodecError(f"undecodable record: {exc}") from exc
