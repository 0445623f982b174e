"""The running stack's record, ``<state_dir>/stack.json``, as its clients read it: where
its servers listen (`load_endpoints`). `medclear up` (medclear.stack) writes it. This module
imports no Kafka client, so a server process or the reader agent can find the stack
without loading the supervisor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medclear.errors import MedclearError
from medclear.infra.kafka_access import OPERATOR, KafkaAccess
from medclear.infra.settings import Settings

STATE_FILE = "stack.json"
NOT_RUNNING = "stack not running; run `medclear up`"


class StackError(MedclearError):
    """A component failed; the message names it and ends with the tail of its log."""

    def __init__(self, message: str, component: str | None = None, log_tail: str = "") -> None:
        self.component = component
        self.log_tail = log_tail
        text = message
        if log_tail:
            text = (
                f"{message}\n--- last lines of the {component or 'component'} log ---\n{log_tail}"
            )
        super().__init__(text)


@dataclass(frozen=True)
class Endpoints:
    """Where the running stack listens; persisted in ``<state_dir>/stack.json``."""

    kafka_bootstrap: str  # "127.0.0.1:PORT" (or the external bootstrap servers)
    clickhouse_url: str  # "clickhouse://127.0.0.1:PORT/medclear" (native TCP port)
    clickhouse_http: str  # "http://127.0.0.1:PORT" ("" for an external ClickHouse)
    gateway: str  # "127.0.0.1:PORT"
    registry: str  # "127.0.0.1:PORT"
    prometheus: str  # "http://127.0.0.1:PORT"
    hsm: str = ""  # "127.0.0.1:PORT"
    terminal_security: bool = False  # POS requests must carry a MAC and a PIN block
    tls: bool = False  # mutual TLS with role certificates (<state_dir>/pki)
    kafka_ssl_dir: str = ""  # the Kafka principals' certificates ("": no TLS to the broker)
    kafka_replication: int = 1  # of the topics medclear creates

    def kafka(self, principal: str = OPERATOR) -> KafkaAccess:
        """How a client of this stack reaches its broker, as `principal`."""
        ssl_dir = Path(self.kafka_ssl_dir) if self.kafka_ssl_dir else None
        return KafkaAccess(self.kafka_bootstrap, principal, ssl_dir, self.kafka_replication)


def state_dir(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve()


def load_endpoints(settings: Settings) -> Endpoints:
    """Where the running stack listens; StackError if no complete `up` is recorded."""
    path = state_dir(settings) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StackError(NOT_RUNNING) from None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {path}: {exc}") from exc
    endpoints = data.get("endpoints")
    if not endpoints or not data.get("complete"):
        raise StackError(NOT_RUNNING)
    return Endpoints(**endpoints)


def client_pki_dir(settings: Settings) -> Path | None:
    """The certificates a client of the running stack uses; None if it runs without TLS."""
    return state_dir(settings) / "pki" if load_endpoints(settings).tls else None


def endpoint(settings: Settings, name: str) -> str:
    """host:port (or URL) of one server of the running stack, by its Endpoints field."""
    return str(getattr(load_endpoints(settings), name))
