"""A gRPC server in front of the command topic (the gateway, the card registry): the
command bus started first, health and reflection served, READY set while serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from clearing.redact import PERSON
from medclear.infra.bus import CommandBus
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.rpc import create_server, serve_until_stopped
from medclear.infra.settings import get_settings
from medclear.infra.tokens import load_card_tokens, load_sealer
from monitoring import metrics


async def serve_commands(
    process: str,
    kafka: KafkaAccess,
    instance_id: str,
    address: str,
    service_name: str,
    register: Callable[[CommandBus, grpc.aio.Server], None],
    pki_dir: Path | None = None,
) -> None:
    """Run a gRPC server whose servicer talks to the command bus, until terminated:
    start the bus, serve with health and reflection, mark the process ready; at SIGTERM,
    NOT_SERVING and not ready first, then stop the server (calls in flight may finish)
    and the bus."""
    settings = get_settings()
    bus = CommandBus(kafka, instance_id, load_card_tokens(settings),
                     load_sealer(settings, PERSON))  # fmt: skip
    await bus.start()
    server, bound, health_servicer = await create_server(
        address, lambda s: register(bus, s), [service_name], pki_dir
    )
    metrics.READY.set(1)
    structlog.get_logger(process=process).info(
        f"{process} serving", port=bound, reply_topic=bus.reply_topic
    )
    try:
        await serve_until_stopped(server, health_servicer, lambda: metrics.READY.set(0))
    finally:
        metrics.READY.set(0)
        await bus.stop()
