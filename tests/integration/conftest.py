"""Real servers for the integration tests, on 127.0.0.1 only.

By default the fixtures start embedded servers with the same building blocks `medclear up`
uses (medclear.stack): a noida-db broker (MEDCLEAR_TEST_BROKER=tansu for tansu) and the
Debian ClickHouse server. With a reachable Docker engine (`docker info` answers within
5 s) AND MEDCLEAR_TEST_DOCKER=1, `kafka_bootstrap` and `clickhouse_url` come from
testcontainers instead (real Apache Kafka, a current ClickHouse).

`broker_factory` always starts embedded brokers: a test that restarts a broker on the same
data directory and port needs a process it controls.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from medclear import stack
from medclear.infra.settings import BrokerKind
from medclear.v1 import pos_pb2_grpc, registry_pb2_grpc

READY_TIMEOUT_S = 30.0

# Tests kill, stop and restart components on purpose and check what follows; the stack's
# watcher (which restarts what exits) would race them. Its own test turns it on.
os.environ.setdefault("MEDCLEAR_RESTART_ON_EXIT", "false")


@functools.cache
def docker_problem() -> str | None:
    """None if a Docker engine answers `docker info` within 5 s, else why not."""
    try:
        result = subprocess.run(
            ["docker", "info"], capture_output=True, text=True, timeout=5, check=False
        )
    except FileNotFoundError:
        return "no docker CLI on PATH"
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 5 s"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"`docker info` failed: {lines[-1] if lines else result.returncode}"
    return None


def use_docker() -> bool:
    return os.environ.get("MEDCLEAR_TEST_DOCKER") == "1" and docker_problem() is None


def broker_kind() -> BrokerKind:
    value = os.environ.get("MEDCLEAR_TEST_BROKER") or os.environ.get("MEDCLEAR_BROKER")
    return BrokerKind(value) if value else BrokerKind.NOIDA


@dataclass
class Broker:
    """One embedded broker: a data directory and a port that survive restarts."""

    kind: BrokerKind
    data_dir: Path
    port: int
    log: Path
    process: stack.Process | None = None
    starts: int = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> Broker:
        if self.process is not None and self.process.alive():
            raise RuntimeError(f"broker on {self.bootstrap} is already running")
        self.process = stack.start_broker(self.kind, self.data_dir, self.port, self.log)
        self.starts += 1
        try:
            stack.wait_kafka_ready(self.bootstrap, timeout_s, proc=self.process)
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        """Graceful: SIGTERM (noida-db writes its data then), SIGKILL after 10 s."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self, timeout_s: float = READY_TIMEOUT_S) -> Broker:
        self.stop()
        return self.start(timeout_s)


@dataclass
class BrokerFactory:
    base: Path
    kind: BrokerKind
    brokers: list[Broker] = field(default_factory=list)

    def start(self, data_dir: Path | None = None, port: int | None = None) -> Broker:
        n = len(self.brokers)
        broker = Broker(
            kind=self.kind,
            data_dir=data_dir or self.base / f"broker-{n}",
            port=port or stack.free_port(),
            log=self.base / f"broker-{n}.log",
        )
        self.brokers.append(broker)
        return broker.start()

    def stop_all(self) -> None:
        for broker in reversed(self.brokers):
            broker.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start/stop/restart embedded brokers on a chosen data dir + port (stopped at the end)."""
    factory = BrokerFactory(tmp_path, broker_kind())
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def session_broker() -> BrokerKind | None:
    """The embedded broker behind `kafka_bootstrap`; None on the testcontainers path."""
    return None if use_docker() else broker_kind()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ "127.0.0.1:PORT" of a broker shared by the whole session."""
    if use_docker():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as container:
            bootstrap = container.get_bootstrap_server()
            stack.wait_kafka_ready(bootstrap, READY_TIMEOUT_S)
            yield bootstrap
        return
    factory = BrokerFactory(tmp_path_factory.mktemp("kafka"), broker_kind())
    try:
        yield factory.start().bootstrap
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """ "clickhouse://127.0.0.1:PORT/default" (native protocol) of a server for the session."""
    if use_docker():
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer(dbname="default") as container:
            yield container.get_connection_url()
        return
    base = tmp_path_factory.mktemp("clickhouse")
    tcp_port, http_port = stack.free_port(), stack.free_port()
    proc = stack.start_clickhouse(base / "data", tcp_port, http_port, base / "clickhouse.log")
    try:
        stack.wait_http_ok(f"http://127.0.0.1:{http_port}/ping", READY_TIMEOUT_S, "Ok.", proc=proc)
        yield f"clickhouse://127.0.0.1:{tcp_port}/default"
    finally:
        proc.stop()


@pytest.fixture
def docker_engine() -> None:
    """Skips the test unless the testcontainers path is in use."""
    problem = docker_problem()
    if problem is not None:
        pytest.skip(f"needs a Docker engine for testcontainers: {problem}")
    if not use_docker():
        pytest.skip("a Docker engine is reachable, but MEDCLEAR_TEST_DOCKER=1 is not set")


# Plain (no TLS) stubs of the stack a test module starts: each of those modules defines its
# own `endpoints` fixture, which these use.
@pytest.fixture(scope="module")
def registry(endpoints: stack.Endpoints) -> Iterator[registry_pb2_grpc.CardRegistryServiceStub]:
    with grpc.insecure_channel(endpoints.registry) as channel:
        yield registry_pb2_grpc.CardRegistryServiceStub(channel)


@pytest.fixture(scope="module")
def pos(endpoints: stack.Endpoints) -> Iterator[pos_pb2_grpc.PosServiceStub]:
    with grpc.insecure_channel(endpoints.gateway) as channel:
        yield pos_pb2_grpc.PosServiceStub(channel)
