"""Pre-loss deadlines on China's calendar: pure arithmetic on the command's timestamp.

Working days come from chinese-calendar (official holidays and adjusted workdays, 调休).
For a year it has no data for (1.11.0 ends at 2026), Monday to Friday count as working
days: an approximation that errs by the holidays of that year, named here so nobody
mistakes it for the official calendar (upgrade the package when the State Council's
calendar for the year is published).
"""

from __future__ import annotations

import datetime as dt

import chinese_calendar

from clearing.errors import CalendarError
from clearing.limits import DAY_MS, SHANGHAI_UTC_OFFSET_MS
from clearing.model import LifetimeUnit, PreLossLifetime

HOUR_MS = 3600 * 1000
WORKING_DAYS_SEARCH_MAX = 60  # calendar days searched for N working days (N ≤ 20)
EPOCH = dt.date(1970, 1, 1)


def shanghai_day(at_ms: int) -> int:
    """The Asia/Shanghai calendar day of an instant, as days since 1970-01-01."""
    return (at_ms + SHANGHAI_UTC_OFFSET_MS) // DAY_MS


def day_start_ms(day: int) -> int:
    """00:00 Beijing time of a Shanghai day number, as epoch milliseconds."""
    return day * DAY_MS - SHANGHAI_UTC_OFFSET_MS


def is_working_day(day: int) -> bool:
    date = EPOCH + dt.timedelta(days=day)
    try:
        return bool(chinese_calendar.is_workday(date))
    except NotImplementedError:  # a year the package has no data for
        return date.weekday() < 5


def pre_loss_deadline_ms(reported_at_ms: int, lifetime: PreLossLifetime) -> int:
    """When a pre-loss reported at `reported_at_ms` lapses.

    hours / days: that long after the report. working_days: at the end (24:00 Beijing)
    of the N-th working day after the day of the report (the report day does not count).
    """
    if lifetime.amount <= 0:
        raise CalendarError("a pre-loss lifetime is positive")
    if lifetime.unit == LifetimeUnit.SECONDS:
        return reported_at_ms + lifetime.amount * 1000
    if lifetime.unit == LifetimeUnit.HOURS:
        return reported_at_ms + lifetime.amount * HOUR_MS
    if lifetime.unit == LifetimeUnit.DAYS:
        return reported_at_ms + lifetime.amount * DAY_MS
    if lifetime.unit != LifetimeUnit.WORKING_DAYS:
        raise CalendarError(f"unknown lifetime unit {lifetime.unit!r}")
    day = shanghai_day(reported_at_ms)
    counted = 0
    for _ in range(WORKING_DAYS_SEARCH_MAX):
        day += 1
        if is_working_day(day):
            counted += 1
            if counted == lifetime.amount:
                return day_start_ms(day + 1)
    raise CalendarError(f"no {lifetime.amount} working days within {WORKING_DAYS_SEARCH_MAX} days")
