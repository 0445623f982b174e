"""`medclear serve <role>`: one medclear process in the foreground, as `medclear up` runs it
(`python -m medclear.cli.serve <role>`).

A server process imports the infrastructure and its own role, nothing else: the role's
module is loaded by name (ROLE_MODULES, stream_jobs.jobs.JOBS) when its command runs, so
the HSM and the card registry load no Kafka client nor stream runtime they do not use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from hsm_sim.keystore import KeyStoreError
from medclear.cli.support import fail
from medclear.infra import kafka_access, log, topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.policy import load_policy
from medclear.infra.settings import KafkaSecurity, Settings, get_settings, pki_dir
from medclear.infra.stack_state import StackError, load_endpoints
from monitoring import metrics
from stream_jobs import jobs
from stream_jobs.errors import StreamJobError

ROLE_MODULES = {
    "worker": "stream_jobs.worker",
    "gateway": "pos_gateway.service",
    "registry": "card_registry.service",
    "hsm": "hsm_sim.service",
    "watch": "medclear.stack.watch",
    "jobs": "stream_jobs.host",
}

serve_app = typer.Typer(
    help="Run one medclear process in the foreground (used by `up`).", no_args_is_help=True
)
MetricsPort = Annotated[int, typer.Option(help="port of /metrics (0: a free one)")]


def _role(name: str) -> ModuleType:
    return importlib.import_module(ROLE_MODULES[name])


def _prepare(name: str, metrics_port: int) -> Settings:
    """What every long-running process sets up first: logging, and /metrics on its port.
    The broker and ClickHouse come from the settings, else from the running stack's
    record (a process started by hand beside `medclear up`)."""
    log.configure(name)
    settings = get_settings()
    metrics.serve(metrics_port, settings.host, name)
    if settings.kafka_bootstrap and settings.clickhouse_url:
        return settings
    try:
        endpoints = load_endpoints(settings)
    except StackError as exc:
        if settings.kafka_bootstrap:  # ClickHouse only for the roles that write to it
            return settings
        raise fail(f"{exc} (or set MEDCLEAR_KAFKA_BOOTSTRAP and MEDCLEAR_CLICKHOUSE_URL)") from exc
    update: dict[str, object] = {
        "clickhouse_url": settings.clickhouse_url or endpoints.clickhouse_url
    }
    if not settings.kafka_bootstrap:  # the broker of the running stack, as it is secured
        update |= {
            "kafka_bootstrap": endpoints.kafka_bootstrap,
            "kafka_replication": endpoints.kafka_replication,
            "kafka_security": KafkaSecurity.SSL
            if endpoints.kafka_ssl_dir
            else KafkaSecurity.PLAINTEXT,
            "kafka_ssl_dir": Path(endpoints.kafka_ssl_dir) if endpoints.kafka_ssl_dir else None,
        }
    return settings.model_copy(update=update)


def _kafka(settings: Settings, principal: str) -> KafkaAccess:
    return kafka_access.from_settings(settings, principal)


@serve_app.command("worker")
def serve_worker(
    index: Annotated[int, typer.Option(help="worker number, for logs and metrics")] = 0,
    metrics_port: MetricsPort = 0,
) -> None:
    """A clearing worker: consumes commands, decides them, emits events and replies."""
    settings = _prepare(f"worker-{index}", metrics_port)
    _role("worker").run(settings, load_policy(settings), _kafka(settings, "worker"), index)


def _command_server(role: str, port: int, metrics_port: int, instance: str) -> None:
    """A gRPC server in front of the command topic (gateway, registry): the HSM when
    terminal security is on, mutual TLS when there is a PKI."""
    settings = _prepare(role, metrics_port)
    hsm = settings.hsm_address if settings.terminal_security else ""
    _role(role).run(
        _kafka(settings, role),
        settings.host,
        port,
        settings.decision_deadline_ms,
        instance,
        hsm,
        pki_dir(settings),
    )


@serve_app.command("gateway")
def serve_gateway(
    port: Annotated[int, typer.Option(help="gRPC port of the POS service")] = 0,
    metrics_port: MetricsPort = 0,
    instance: Annotated[str, typer.Option(help="names this gateway's reply topic")] = (
        f"{topics.GATEWAY_INSTANCE_PREFIX}0"
    ),
) -> None:
    """The POS gateway: gRPC PosService in front of the command topic."""
    _command_server("gateway", port, metrics_port, instance)


@serve_app.command("registry")
def serve_registry(
    port: Annotated[int, typer.Option(help="gRPC port of the card registry service")] = 0,
    metrics_port: MetricsPort = 0,
    instance: Annotated[str, typer.Option(help="names this registry's reply topic")] = (
        f"{topics.REGISTRY_INSTANCE_PREFIX}0"
    ),
) -> None:
    """The card registry: gRPC service for service windows and the 12333 hotline."""
    _command_server("registry", port, metrics_port, instance)


@serve_app.command("hsm")
def serve_hsm(
    port: Annotated[int, typer.Option(help="gRPC port of the HSM service")] = 0,
    metrics_port: MetricsPort = 0,
) -> None:
    """The HSM simulator: key store under the LMK, PIN / MAC / cryptogram operations."""
    log.configure("hsm")
    settings = get_settings()
    metrics.serve(metrics_port, settings.host, "hsm")
    try:
        _role("hsm").run_with_settings(settings, port)
    except (KeyStoreError, OSError) as exc:
        raise fail(f"hsm: {exc}") from exc


@serve_app.command("watch")
def serve_watch(metrics_port: MetricsPort = 0) -> None:
    """The stack's watcher: restarts a component that exits on its own, with back-off."""
    settings = _prepare("watch", metrics_port)
    _role("watch").run(settings)


@serve_app.command(jobs.JOBS_IN_ONE)
def serve_jobs(metrics_port: MetricsPort = 0) -> None:
    """Every stream job (or those MEDCLEAR_JOBS names) in one process and one event loop,
    as `up` runs them by default; one job's failure restarts them all."""
    settings = _prepare(jobs.JOBS_IN_ONE, metrics_port)
    try:
        names = jobs.selected(settings)
    except StreamJobError as exc:
        raise fail(str(exc)) from exc
    _role("jobs").run(settings, _kafka(settings, kafka_access.OPERATOR), names)


def _job_command(name: str) -> None:
    def serve_job(metrics_port: MetricsPort = 0) -> None:
        settings = _prepare(name, metrics_port)
        _role("jobs").run(settings, _kafka(settings, name), [name])

    serve_job.__doc__ = f"The {name} stream job: {jobs.JOB_HELP.get(name, 'see stream_jobs/')}."
    serve_app.command(name)(serve_job)


for _job in jobs.JOBS:  # one `medclear serve <job>` per entry of stream_jobs/jobs.py
    _job_command(_job)


if __name__ == "__main__":
    serve_app()
