"""Serving stream jobs in this process: one (`medclear serve <job>`) or several in one
event loop (`medclear serve jobs`), until SIGTERM (stream_runtime/process.py)."""

from __future__ import annotations

import functools

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import Settings
from stream_jobs.jobs import server
from stream_runtime.process import Served, run_until_signal


def run(settings: Settings, kafka: KafkaAccess, names: list[str]) -> None:
    """The named jobs (stream_jobs/jobs.py) until SIGTERM; one's failure ends them all. Each
    job talks to the broker as itself: its own principal and certificate, whatever process
    it shares."""
    served: list[Served] = [
        functools.partial(server(name), settings, kafka.as_principal(name)) for name in names
    ]
    run_until_signal(served)
