"""gRPC plumbing shared by medclear's servers and clients: server with health checking and
reflection, translation of core replies into proto messages, the ingress clock."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clearing.codes import ResultCode, message_of
from clearing.limits import SHANGHAI_UTC_OFFSET_MS
from clearing.model import Reply
from clearing.validate import mask_ssn
from medclear.infra import pki
from medclear.infra.pki import Role, channel_credentials
from medclear.v1 import common_pb2

Clock = Callable[[], int]  # epoch milliseconds

# One call from a console, a tool or a simulated terminal to a medclear server. The swipe
# path's own HSM calls have shorter bounds (medclear/infra/hsm_client.py).
CALL_TIMEOUT_S = 10.0
NOT_SERVING_DRAIN_S = 0.5  # NOT_SERVING is announced this long before the server stops
STOP_GRACE_S = 2.0  # calls in flight at a stop may finish within this


def aio_channel(address: str, role: Role, pki_dir: Path | None) -> grpc.aio.Channel:
    """A channel to a medclear server as `role` (mutual TLS when there is a PKI)."""
    if pki_dir is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, channel_credentials(pki_dir, role))


def sync_channel(address: str, role: Role, pki_dir: Path | None) -> grpc.Channel:
    if pki_dir is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(pki_dir, role))


def system_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def shanghai_iso(at_ms: int) -> str:
    tz = timezone(timedelta(milliseconds=SHANGHAI_UTC_OFFSET_MS), "Asia/Shanghai")
    return (
        datetime.fromtimestamp(at_ms / 1000, UTC).astimezone(tz).isoformat(timespec="milliseconds")
    )


async def create_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    pki_dir: Path | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Bind (port 0 picks a free one), register servicers, health and reflection. With a
    PKI directory: mutual TLS, and every method checked against the caller's role."""
    interceptors = [pki.RoleInterceptor()] if pki_dir else []
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = (
        server.add_secure_port(address, pki.server_credentials(pki_dir))
        if pki_dir
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    for name in (*service_names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def state_of(ssn: str, reply: Reply) -> common_pb2.StateVersion:
    return common_pb2.StateVersion(person_key=mask_ssn(ssn) if ssn else "", version=reply.version)


def message(code: ResultCode, detail: str = "") -> str:
    """A reply's human text; `detail` says which field made a request malformed."""
    return f"{message_of(code)}: {detail}" if detail else message_of(code)


def mac_input(message: Any) -> bytes:
    """What a request's or reply's MAC covers: the message with its `mac` field empty,
    deterministically serialized (every field sent, nothing left out by a list)."""
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.mac = b""
    data: bytes = unsigned.SerializeToString(deterministic=True)
    return data


def result_pb(code: ResultCode) -> common_pb2.ResultCode.ValueType:
    """The proto enum value of a core result code (same numbers, checked by a test)."""
    return cast(common_pb2.ResultCode.ValueType, int(code))


def pb_enum(value: IntEnum) -> Any:
    """A core enum as the proto enum field value (the numbers are the same by design)."""
    return int(value)


async def serve_until_stopped(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    on_stopping: Callable[[], None],
) -> None:
    """Serve until SIGTERM or SIGINT (or the server ends). A graceful stop then goes in
    order: every service NOT_SERVING on the health service (a balancer or a client
    watching health moves away), `on_stopping` (the process's READY to 0), a short
    drain, and the server's stop with a grace for the calls in flight."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    ended = asyncio.ensure_future(server.wait_for_termination())
    asked = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({ended, asked}, return_when=asyncio.FIRST_COMPLETED)
    asked.cancel()
    await health_servicer.enter_graceful_shutdown()
    on_stopping()
    await asyncio.sleep(NOT_SERVING_DRAIN_S)
    await server.stop(grace=STOP_GRACE_S)
    ended.cancel()
