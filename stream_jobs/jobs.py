"""The stream jobs `medclear up` starts: name → "module:function".

Each function is `run(settings, bootstrap)` and blocks (its stream runtimes, medclear/streams,
until SIGTERM). For every entry `medclear serve <name>` exists and `medclear up` starts it
after the gateway and registry, then waits for its READY gauge. Adding a job is one line
here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

JOBS: dict[str, str] = {
    "pre-loss-timer": "stream_jobs.pre_loss_timer:run",
    "clickhouse-sink": "stream_jobs.clickhouse_sink:run",
    "sms": "stream_jobs.sms:run",
    "abnormal": "stream_jobs.abnormal_job:run",
    "settlement": "stream_jobs.settlement:run",
}

JOB_HELP: dict[str, str] = {
    "pre-loss-timer": "sends an expiry command when a pre-loss deadline passes",
    "clickhouse-sink": "writes every event to ClickHouse (one row per event id)",
    "sms": "sends the consumption and card-status SMS over SMPP (medclear.sms-outcomes)",
    "abnormal": "flags abnormal transactions (异常交易) on the alerts topic",
    "settlement": "daily settlement per institution (medclear.settlements)",
}


def runner(name: str) -> Callable[..., Any]:
    module, _, function = JOBS[name].partition(":")
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]
