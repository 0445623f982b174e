"""The fault drills' bounds, in one table: rates, persons and swipes per person, timeouts
and waits, what counts as approved or undecided; and DrillError, raised when a drill
cannot run at all (a failed check is no error: it is one of the result's problems)."""

from __future__ import annotations

from clearing.codes import ResultCode
from medclear.errors import MedclearError

RATE_PER_S_DEFAULT = 50.0
PERSONS_MIN = 100
SWIPES_PER_PERSON_MAX = 15  # GetPerson shows 20 records: the opening credit + these
SWIPES_PER_PERSON_CAP = 25  # never more (the sms job sends at most 30 per person-hour)
REPLAY_CHECK_APPROVALS_MAX = 55  # a replay beyond the 64 remembered replies would debit
OPENING_BALANCE_FEN = 10_000_00
SWIPE_FEN_MIN, SWIPE_FEN_MAX = 1_00, 30_00  # never more than the balance in one drill
RPC_TIMEOUT_S = 10.0
RETRY_PAUSE_S = 1.0  # before a terminal sends an undecided swipe again, doubling ...
RESEND_LANES = 4  # resends at a time: a backlog is worked off, not fed
RETRY_PAUSE_MAX_S = 15.0  # ... up to this (resends are commands too: no retry storm)
IN_FLIGHT_MAX = 5_000  # swipes awaiting a definite answer; beyond: not sent (counted)
ANSWER_WAIT_S = 180.0  # after the traffic stops, for every swipe to get an answer
WARMUP_S = 2.0  # steady traffic before the fault
AFTER_RECOVERY_S = 2.0  # steady traffic after the first approval following a repair
RECOVERY_WAIT_S = 120.0  # a repaired stack must approve a swipe within this
DRAIN_TIMEOUT_S = 180.0
DRAIN_POLL_S = 1.0
STOP_WAIT_S = 15.0  # for a SIGTERMed component to exit
SECONDS_LISTED_MAX = 5  # repair/recovery times listed one by one; more: max and median
SMS_DOUBLES_ALLOWED = 0  # held to 0 everywhere, the kill loop included: a kill -9 of the
# sms job may double what the SMSC accepted and the job had not yet settled (the residual
# window of stream_jobs/sms.py); such a double fails the drill, and the note says how many
# resends were flagged resent_uncertain. The SMSC is stopped gracefully (it unbinds and
# answers every submit_sm it recorded)
UNDECIDED = frozenset({ResultCode.TIMEOUT, ResultCode.UNAVAILABLE, ResultCode.SYSTEM_ERROR})
APPROVED = frozenset({ResultCode.OK, ResultCode.PARTIALLY_APPROVED})
PERSON_SPACE = 50 * 12 * 28 * 1000  # distinct drill social security numbers
DRILL_TERMINALS = 8
SEED_ATTEMPTS = 5  # seeding again after a timeout (the same request ids)
LOOKUP_PAUSE_S = 1.0  # times the attempt: before a person lookup that timed out is asked again


class DrillError(MedclearError):
    """The drill could not run (no stack, a component missing, a repair failed)."""
