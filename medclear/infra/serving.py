"""A gRPC server in front of the command topic (the gateway, the card registry): the
asking end of the reply protocol and the card index started first, health and reflection
served, READY set while serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from clearing.redact import PERSON
from medclear.infra import topics
from medclear.infra.card_index import CardIndex
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import wait_for_topics
from medclear.infra.replies import Requester
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
    register: Callable[[Requester, CardIndex, grpc.aio.Server], None],
    pki_dir: Path | None = None,
) -> None:
    """Run a gRPC server whose servicer asks the workers and reads the card index, until
    terminated: start both (the process may start beside its broker: it waits for the
    broker and the topics first), serve with health and reflection, mark the process
    ready; at SIGTERM, NOT_SERVING and not ready first, then stop the server (calls in
    flight may finish), the requester and the index."""
    settings = get_settings()
    person = load_sealer(settings, PERSON)
    found = await wait_for_topics(kafka, [topics.COMMANDS.name, topics.CARD_INDEX.name])
    requests = Requester(kafka, instance_id, person)
    cards = CardIndex(kafka, load_card_tokens(settings), person)
    await requests.start()
    await cards.start(found[topics.CARD_INDEX.name])
    server, bound, health_servicer = await create_server(
        address, lambda s: register(requests, cards, s), [service_name], pki_dir
    )
    metrics.READY.set(1)
    structlog.get_logger(process=process).info(
        f"{process} serving", port=bound, reply_topic=requests.reply_topic
    )
    try:
        await serve_until_stopped(server, health_servicer, lambda: metrics.READY.set(0))
    finally:
        metrics.READY.set(0)
        await asyncio.gather(requests.stop(), cards.stop())
