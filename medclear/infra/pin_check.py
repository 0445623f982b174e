"""The one PIN check of the swipe path: a PIN block through the HSM, as a PinOutcome.

The clearing worker checks a swipe's or an enquiry's block against the card's PIN
verification value (PVV); the gateway, for a card no person holds, checks its form only
(there is no PIN to match). Both come here, so both have the same policy for an HSM that
does not answer: ask again with a growing pause for at most PIN_CHECK_PATIENCE_S, and
stop asking at once when the process is stopping; then the outcome is UNAVAILABLE, which
the core answers with ResultCode.UNAVAILABLE and no decision (clearing/pos.py). A
terminal that gets UNAVAILABLE reverses the swipe, as after a timeout (reader_agent).

Only the encrypted block and the PVV cross to the HSM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from clearing.codes import ResultCode
from clearing.model import PinOutcome
from medclear.infra.hsm_client import HsmClient
from monitoring import metrics

log = structlog.get_logger(module="pin_check")

PIN_CHECK_PATIENCE_S = 1.0  # asking again for this long after the first ask failed
PIN_CHECK_BACKOFF_MIN_S = 0.1
PIN_CHECK_BACKOFF_MAX_S = 0.4
OUTCOME_OF_MATCH = {ResultCode.OK: PinOutcome.CORRECT, ResultCode.PIN_WRONG: PinOutcome.WRONG}


class PinCheck:
    """`outcome` of a PIN block, with the HSM-down policy above."""

    def __init__(self, hsm: HsmClient, patience_s: float = PIN_CHECK_PATIENCE_S) -> None:
        self._hsm = hsm
        self._patience_s = patience_s

    async def outcome(
        self, terminal_id: str, pin_block: bytes, card_no: str, pvv: str, stopping: asyncio.Event
    ) -> PinOutcome:
        """Against `pvv` (hex) when the card has one: CORRECT or WRONG; without one the
        form only: NOT_VERIFIED (well formed). A malformed block, or one the HSM refuses,
        is INVALID_BLOCK; no answer in time, or none before `stopping` (the process's stop
        event) is set, is UNAVAILABLE."""
        if not pin_block:
            return PinOutcome.INVALID_BLOCK
        give_up_at = time.monotonic() + self._patience_s
        pause_s = PIN_CHECK_BACKOFF_MIN_S
        while True:
            if pvv:
                code = await self._hsm.verify_pin(
                    terminal_id, pin_block, card_no, bytes.fromhex(pvv)
                )
            else:
                code = await self._hsm.check_pin_block(terminal_id, pin_block, card_no)
                if code == ResultCode.OK:
                    return PinOutcome.NOT_VERIFIED  # well formed; no PIN to match
            if code != ResultCode.UNAVAILABLE:
                return OUTCOME_OF_MATCH.get(code, PinOutcome.INVALID_BLOCK)
            metrics.HSM_UNAVAILABLE.inc()
            if stopping.is_set() or time.monotonic() + pause_s > give_up_at:
                log.warning("hsm unavailable: the PIN check is answered UNAVAILABLE")
                return PinOutcome.UNAVAILABLE
            log.warning("hsm unavailable; asking again", retry_in_s=pause_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause_s)
            pause_s = min(2 * pause_s, PIN_CHECK_BACKOFF_MAX_S)

    async def of_hex(
        self, terminal_id: str, pin_block_hex: str, card_no: str, pvv: str, stopping: asyncio.Event
    ) -> PinOutcome:
        """`outcome` of a block carried in a command (hex)."""
        try:
            block = bytes.fromhex(pin_block_hex)
        except ValueError:
            return PinOutcome.INVALID_BLOCK
        return await self.outcome(terminal_id, block, card_no, pvv, stopping)
