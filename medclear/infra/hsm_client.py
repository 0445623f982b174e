"""The one client of the HSM for medclear's own processes, with every key id they use.

The gateway (request and reply MACs, chip cryptograms), the clearing worker (PIN blocks
of swipes and balance enquiries) and the card registry (new PINs) call the HSM through
this class, so a gRPC error means the same thing everywhere:

    (the reason of the error's google.rpc.Status details decides when it has one:
    KEY_NOT_FOUND → TERMINAL_UNKNOWN, any other → MALFORMED_REQUEST, logged)
    NOT_FOUND          the key does not exist: an unprovisioned terminal or window
                       → TERMINAL_UNKNOWN
    INVALID_ARGUMENT   a field the HSM refuses (callers bound every field first, so this
                       is a defect of the caller) → MALFORMED_REQUEST
    anything else      the HSM cannot answer now → UNAVAILABLE

A check that fails is an answer, not an error: MAC_INVALID, PIN_WRONG, PIN_BLOCK_INVALID,
CRYPTOGRAM_INVALID.

The key ids live here too: a terminal's (or service window's) MAC key `tak-<id>` and PIN
key `tpk-<id>` (AES-128; PIN blocks in ISO 9564 format 4), the cards' PIN verification
key `pvk-cards`, the card master key `cmk-cards`, and the simulated fleet's KEK
`kek-fleet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import structlog

from clearing.codes import ResultCode
from hsm_sim.crypto import KeyAlgorithm, PinBlockFormat
from medclear.infra import bounds, status
from medclear.infra.pki import Role
from medclear.infra.rpc import aio_channel, pb_enum
from medclear.v1 import hsm_pb2, hsm_pb2_grpc

log = structlog.get_logger(module="hsm_client")

HSM_CALL_TIMEOUT_S = 2.0  # one operation on the swipe path
HSM_WINDOW_CALL_TIMEOUT_S = 5.0  # one operation for a service window

TERMINAL_KEY_ALGORITHM = KeyAlgorithm.AES_128
PIN_BLOCK_FORMAT = PinBlockFormat.ISO_4
FLEET_KEK = "kek-fleet"  # the simulated terminal fleet's key-encryption key
PVK_ID = "pvk-cards"  # verifies every card's PIN
CMK_ID = "cmk-cards"  # card master key: per-card cryptogram keys derive from it


def tpk_id(terminal_id: str) -> str:
    """The PIN key of a terminal (or of a service window, which takes new PINs)."""
    return f"tpk-{terminal_id}"


def tak_id(terminal_id: str) -> str:
    """The MAC key of a terminal: request and reply MACs."""
    return f"tak-{terminal_id}"


def code_of_error(exc: grpc.aio.AioRpcError) -> ResultCode:
    """What an HSM error means, by the reason of its google.rpc.Status details when it has
    them (medclear/infra/status.py), else by its gRPC code."""
    found = status.details_of(exc)
    if found is not None and found.domain == status.DOMAIN:
        if found.reason == status.Reason.KEY_NOT_FOUND:
            return ResultCode.TERMINAL_UNKNOWN
        log.warning("the HSM refused a request", error=status.describe(exc))
        return ResultCode.MALFORMED_REQUEST
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return ResultCode.TERMINAL_UNKNOWN
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return ResultCode.MALFORMED_REQUEST
    return ResultCode.UNAVAILABLE


class HsmClient:
    """Async HSM operations as result codes. The channel is made on first use, inside the
    event loop that uses it."""

    def __init__(
        self, address: str, pki_dir: Path | None, timeout_s: float = HSM_CALL_TIMEOUT_S
    ) -> None:
        self._address = address
        self._pki_dir = pki_dir
        self._timeout_s = timeout_s
        self._stub: Any = None

    async def _call(self, method: str, request: Any) -> Any:
        """The reply, or the ResultCode an error means."""
        if self._stub is None:
            channel = aio_channel(self._address, Role.SERVICE, self._pki_dir)
            self._stub = hsm_pb2_grpc.HsmServiceStub(channel)
        try:
            return await getattr(self._stub, method)(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            return code_of_error(exc)

    async def verify_mac(self, terminal_id: str, data: bytes, mac: bytes) -> ResultCode:
        """OK, MAC_INVALID, or what an error means (TERMINAL_UNKNOWN: no MAC key)."""
        reply = await self._call(
            "VerifyMac",
            hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id=tak_id(terminal_id)), data=data, mac=mac),
        )
        return reply if isinstance(reply, ResultCode) else ResultCode(reply.result)

    async def generate_mac(self, terminal_id: str, data: bytes) -> tuple[ResultCode, bytes]:
        reply = await self._call(
            "GenerateMac",
            hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id=tak_id(terminal_id)), data=data),
        )
        if isinstance(reply, ResultCode):
            return reply, b""
        return ResultCode(reply.result), bytes(reply.mac)

    async def verify_pin(
        self, terminal_id: str, pin_block: bytes, card_no: str, pvv: bytes
    ) -> ResultCode:
        """OK, PIN_WRONG, PIN_BLOCK_INVALID, or what an error means."""
        reply = await self._call(
            "VerifyPin",
            hsm_pb2.VerifyPinRequest(
                pin_key=hsm_pb2.KeyRef(key_id=tpk_id(terminal_id)),
                verification_key=hsm_pb2.KeyRef(key_id=PVK_ID),
                pin_block=pin_block,
                format=pb_enum(PIN_BLOCK_FORMAT),
                pan=card_no,
                pin_verification_value=pvv,
            ),
        )
        return reply if isinstance(reply, ResultCode) else ResultCode(reply.result)

    async def check_pin_block(self, terminal_id: str, pin_block: bytes, card_no: str) -> ResultCode:
        """OK when the block is well formed for this card; PIN_BLOCK_INVALID otherwise."""
        reply = await self._call(
            "CheckPinBlock",
            hsm_pb2.CheckPinBlockRequest(
                pin_key=hsm_pb2.KeyRef(key_id=tpk_id(terminal_id)),
                pin_block=pin_block,
                format=pb_enum(PIN_BLOCK_FORMAT),
                pan=card_no,
            ),
        )
        return reply if isinstance(reply, ResultCode) else ResultCode(reply.result)

    async def set_pin(
        self, window_id: str, pin_block: bytes, card_no: str
    ) -> tuple[ResultCode, str]:
        """A new PIN (a block under the window's PIN key) as its verification value, hex."""
        reply = await self._call(
            "SetPin",
            hsm_pb2.SetPinRequest(
                pin_key=hsm_pb2.KeyRef(key_id=tpk_id(window_id)),
                verification_key=hsm_pb2.KeyRef(key_id=PVK_ID),
                pin_block=pin_block,
                format=pb_enum(PIN_BLOCK_FORMAT),
                pan=card_no,
            ),
        )
        if isinstance(reply, ResultCode):
            return reply, ""
        return ResultCode(reply.result), bytes(reply.pin_verification_value).hex()

    async def set_pins(
        self, window_id: str, blocks: list[tuple[bytes, str]]
    ) -> list[tuple[ResultCode, str]]:
        """set_pin for many (PIN block, card number) pairs of one window, in calls of at
        most SET_PINS_MAX; the results in order (an error of a call is each of its
        requests' result)."""
        key = hsm_pb2.KeyRef(key_id=tpk_id(window_id))
        pvk = hsm_pb2.KeyRef(key_id=PVK_ID)
        results: list[tuple[ResultCode, str]] = []
        for start in range(0, len(blocks), bounds.SET_PINS_MAX):
            chunk = blocks[start : start + bounds.SET_PINS_MAX]
            reply = await self._call(
                "SetPins",
                hsm_pb2.SetPinsRequest(
                    requests=[
                        hsm_pb2.SetPinRequest(
                            pin_key=key,
                            verification_key=pvk,
                            pin_block=block,
                            format=pb_enum(PIN_BLOCK_FORMAT),
                            pan=card_no,
                        )
                        for block, card_no in chunk
                    ]
                ),
            )
            if isinstance(reply, ResultCode):
                results += [(reply, "")] * len(chunk)
                continue
            results += [
                (ResultCode(r.result), bytes(r.pin_verification_value).hex()) for r in reply.replies
            ]
        return results

    async def verify_cryptogram(
        self,
        card_no: str,
        challenge: bytes,
        amount_fen: int,
        terminal_id: str,
        counter: int,
        cryptogram: bytes,
    ) -> ResultCode:
        """OK or CRYPTOGRAM_INVALID; no card master key means no genuine card either."""
        reply = await self._call(
            "VerifyCardCryptogram",
            hsm_pb2.CryptogramRequest(
                master_key=hsm_pb2.KeyRef(key_id=CMK_ID),
                card_no=card_no,
                challenge=challenge,
                amount_fen=amount_fen,
                terminal_id=terminal_id,
                counter=counter,
                cryptogram=cryptogram,
            ),
        )
        if reply in (ResultCode.TERMINAL_UNKNOWN, ResultCode.MALFORMED_REQUEST):
            return ResultCode.CRYPTOGRAM_INVALID
        return reply if isinstance(reply, ResultCode) else ResultCode(reply.result)
