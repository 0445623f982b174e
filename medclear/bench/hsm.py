"""`medclear hsm bench`: PIN and MAC verifications of the running HSM over gRPC.

The bench forms its own keys as a key ceremony would (a KEK from two components, a
terminal PIN key and MAC key exported under it, a PIN verification key), then times
VerifyPin and VerifyMac calls at a given number in flight. It asserts nothing.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from clearing.codes import ResultCode
from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm, PinBlockFormat
from hsm_sim.keystore import KeyType, unwrap_key
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel, pb_enum
from medclear.sim.traffic import LatencyStats, in_flight
from medclear.v1 import hsm_pb2, hsm_pb2_grpc

KEY_ALGORITHM = KeyAlgorithm.AES_128  # of the terminal keys and the PIN verification key
KEK_ALGORITHM = KeyAlgorithm.AES_256
KEK_COMPONENT_BYTES = 32
BENCH_PAN, BENCH_PIN = "S26000001", "271828"
MAC_DATA = b"AUTH|T1|310101P00001|42|S26000001|1250"


class _Keys:
    """The bench's keys in the HSM (ids tagged per run) and the terminal's clear copies."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.clear: dict[str, bytes] = {}

    def ref(self, name: str) -> hsm_pb2.KeyRef:
        return hsm_pb2.KeyRef(key_id=f"bench-{name}-{self.tag}")

    def pin_block(self) -> bytes:
        return crypto.encrypt_pin_block(
            PinBlockFormat.ISO_4,
            BENCH_PIN,
            BENCH_PAN,
            KEY_ALGORITHM,
            self.clear["tpk"],
            secrets.token_bytes,
        )


async def _ceremony(hsm: hsm_pb2_grpc.HsmServiceStub) -> _Keys:
    """The bench holds the KEK's components and the HSM forms the KEK; the terminal keys
    are made in the HSM and loaded by the 'terminal' from under the KEK."""
    keys = _Keys()
    parts = [secrets.token_bytes(KEK_COMPONENT_BYTES) for _ in range(2)]
    await hsm.FormKey(
        hsm_pb2.FormKeyRequest(
            key_id=keys.ref("kek").key_id,
            algorithm=pb_enum(KEK_ALGORITHM),
            components=parts,
            component_kcvs=[crypto.kcv(KEK_ALGORITHM, p) for p in parts],
        )
    )
    kek = bytes(a ^ b for a, b in zip(*parts, strict=True))
    for name, key_type in (
        ("tpk", KeyType.TERMINAL_PIN_KEY),
        ("tak", KeyType.TERMINAL_MAC_KEY),
        ("pvk", KeyType.PIN_VERIFICATION_KEY),
    ):
        await hsm.GenerateKey(
            hsm_pb2.GenerateKeyRequest(
                key_id=keys.ref(name).key_id,
                type=pb_enum(key_type),
                algorithm=pb_enum(KEY_ALGORITHM),
            )
        )
        if name != "pvk":
            out = await hsm.ExportKey(
                hsm_pb2.ExportKeyRequest(key=keys.ref(name), kek=keys.ref("kek"))
            )
            keys.clear[name] = unwrap_key(KEK_ALGORITHM, kek, out.wrapped)
    return keys


async def _requests(
    checker: hsm_pb2_grpc.HsmServiceStub, keys: _Keys, count: int
) -> dict[str, list[Any]]:
    """`count` VerifyPin requests (each its own PIN block) and MAC checks."""
    pvv = (
        await checker.SetPin(
            hsm_pb2.SetPinRequest(
                pin_key=keys.ref("tpk"),
                verification_key=keys.ref("pvk"),
                pin_block=keys.pin_block(),
                format=pb_enum(PinBlockFormat.ISO_4),
                pan=BENCH_PAN,
            )
        )
    ).pin_verification_value
    pins = [
        hsm_pb2.VerifyPinRequest(
            pin_key=keys.ref("tpk"),
            verification_key=keys.ref("pvk"),
            pin_block=keys.pin_block(),
            format=pb_enum(PinBlockFormat.ISO_4),
            pan=BENCH_PAN,
            pin_verification_value=pvv,
        )
        for _ in range(count)
    ]
    mac = crypto.generate_mac(KEY_ALGORITHM, keys.clear["tak"], MAC_DATA)
    mac_request = hsm_pb2.MacRequest(key=keys.ref("tak"), data=MAC_DATA, mac=mac)
    return {"VerifyPin": pins, "VerifyMac": [mac_request] * count}


async def _timed(
    method: Callable[..., Awaitable[Any]], requests: list[Any], concurrency: int
) -> LatencyStats:
    stats = LatencyStats()

    async def one(request: Any) -> None:
        started = time.perf_counter()
        reply = await method(request, timeout=CALL_TIMEOUT_S)
        stats.add((time.perf_counter() - started) * 1000, ResultCode(reply.result).name)

    await in_flight(requests, concurrency, one)
    stats.ended = time.perf_counter()
    return stats


async def run(
    address: str, count: int, concurrency: int, pki: Path | None
) -> dict[str, LatencyStats]:
    """VerifyPin and VerifyMac, `count` calls each at `concurrency` in flight: key
    administration as the operator, the checks as medclear's services."""
    async with (
        aio_channel(address, Role.OPERATOR, pki) as channel,
        aio_channel(address, Role.SERVICE, pki) as service_channel,
    ):
        checker = hsm_pb2_grpc.HsmServiceStub(service_channel)
        keys = await _ceremony(hsm_pb2_grpc.HsmServiceStub(channel))
        requests = await _requests(checker, keys, count)
        return {
            label: await _timed(getattr(checker, label), batch, concurrency)
            for label, batch in requests.items()
        }
