"""The POS gateway's terminal security (MEDCLEAR_TERMINAL_SECURITY, on by default; off: no
HSM on the path and nothing below is checked):
- Request MAC: every POS request carries a MAC under its terminal's MAC key
  (`tak-<terminal>`) over its deterministic protobuf serialization with `mac` empty
  (`medclear.infra.rpc.mac_input`), so every field the terminal sent is covered, with no
  hand-kept list of fields. It is verified through the HSM before routing: a bad MAC is
  MAC_INVALID (11), a terminal without keys TERMINAL_UNKNOWN (14), and neither reaches an
  aggregate.
- Reply MAC: every POS reply is MACed through the HSM under the same key, over the same
  serialization. The reader agent and `medclear pos` take a reply without a valid MAC as
  no answer, and the agent reverses the swipe. Each reply costs one `GenerateMac`: no
  reply is known before the request's MAC is verified (checking it later would give
  unauthenticated requests the card-index wait and the HSM's PIN-block check), so there
  is no round trip to share.
- PIN blocks: a PIN travels as an ISO 9564 format-4 block under the terminal's PIN key
  (`tpk-<terminal>`). The gateway passes it on; the clearing worker
  (stream_jobs/worker.py) has the HSM verify it against the card's PIN verification value
  (PVV) and hands the core CORRECT, WRONG or INVALID_BLOCK. A repeat of a decided request
  is answered from memory without asking the HSM again. Here a block is checked for its
  form only: an unrouted card's, and a swipe's whose cryptogram failed (12 wins over 13).
  Both sides ask through medclear/infra/pin_check.py: with the HSM silent for a second,
  the swipe is answered UNAVAILABLE and nothing is decided. (At a service window,
  ChangePin has the HSM turn the new PIN block into the card's PVV, which the card keeps.)
- Chip cryptogram (`TerminalSecurity.cryptogram`), after the MAC: a request carrying one
  is checked through the HSM's `VerifyCardCryptogram` under `cmk-cards`. A wrong one, or
  a challenge or counter without a cryptogram, is CRYPTOGRAM_INVALID (13) and reaches no
  aggregate; a cloned card (EF05/EF06 copied, another key) is refused this way. A swipe
  without a cryptogram is accepted by default: the simulated fleet, `medclear pos swipe
  --card` and the benchmarks are key-entered (no chip).
  MEDCLEAR_CARD_CRYPTOGRAM_REQUIRED=true makes it mandatory, which a deployment of chip
  readers should set: without it, a cloner who leaves the cryptogram out is not stopped
  by this check. Not done: the server does not keep the card's counter, so a replayed
  cryptogram is stopped only by the challenge being the terminal's; a server-issued
  challenge or a per-card counter high-water mark would close that.
"""

from __future__ import annotations

import asyncio
from typing import Any

from clearing import ingress, validate
from clearing.codes import ResultCode
from clearing.model import PinOutcome
from medclear.infra.bounds import CRYPTOGRAM_BYTES_MAX
from medclear.infra.hsm_client import HsmClient
from medclear.infra.pin_check import PinCheck
from medclear.infra.rpc import (
    mac_input,
)
from medclear.v1 import pos_pb2


class TerminalSecurity:
    """Request MACs, chip cryptograms, PIN-block forms and reply MACs through the HSM.

    A swipe with a cryptogram must carry a valid one. A swipe without one (key-entered or
    simulated traffic: no chip read) passes unless `cryptogram_required`
    (MEDCLEAR_CARD_CRYPTOGRAM_REQUIRED), which a deployment of chip readers should set."""

    def __init__(self, hsm: HsmClient, cryptogram_required: bool) -> None:
        self.hsm = hsm
        self.cryptogram_required = cryptogram_required
        self.pins = PinCheck(hsm)
        self.stopping = asyncio.Event()  # a request in flight at the server's stop is cancelled

    async def admit(self, request: Any) -> ResultCode:
        """The request's MAC under its terminal's MAC key: OK, MAC_INVALID, TERMINAL_UNKNOWN."""
        return await self.hsm.verify_mac(
            request.terminal.terminal_id, mac_input(request), request.mac
        )

    async def cryptogram(self, request: pos_pb2.AuthorizeRequest) -> ResultCode:
        if not request.card_cryptogram:
            present = request.card_challenge or request.card_counter
            required = self.cryptogram_required or present
            return ResultCode.CRYPTOGRAM_INVALID if required else ResultCode.OK
        if (
            len(request.card_challenge) < CHALLENGE_BYTES_MIN
            or len(request.card_cryptogram) != CRYPTOGRAM_BYTES_MAX
        ):
            return ResultCode.CRYPTOGRAM_INVALID
        return await self.hsm.verify_cryptogram(
            request.card_no,
            request.card_challenge,
            request.amount_fen,
            request.terminal.terminal_id,
            request.card_counter,
            request.card_cryptogram,
        )

    async def ask(self, ask: ingress.Ask, request: Any) -> ResultCode | PinOutcome:
        """The HSM's answer to what an ingress check asks of `request`."""
        if ask is ingress.Ask.MAC:
            return await self.admit(request)
        if ask is ingress.Ask.CRYPTOGRAM:
            return await self.cryptogram(request)
        return await self.pin_form(request)

    async def pin_form(self, request: Any) -> PinOutcome:
        """The PIN block's form (the card has no PIN to verify it against here)."""
        return await self.pins.outcome(
            request.terminal.terminal_id, request.pin_block, request.card_no, "", self.stopping
        )

    async def sign(self, terminal_id: str, reply: Any) -> None:
        """Set the reply's MAC under the terminal's MAC key (none for an unknown terminal:
        the terminal then takes the reply as no answer)."""
        if not validate.is_id(terminal_id):
            return
        code, mac = await self.hsm.generate_mac(terminal_id, mac_input(reply))
        if code == ResultCode.OK:
            reply.mac = mac


CHALLENGE_BYTES_MIN = 4  # the terminal's unpredictable number (EMV: 4 bytes)
