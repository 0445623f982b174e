"""Real servers for the integration tests, on 127.0.0.1 only.

By default the fixtures start embedded servers with the same building blocks `medclear up`
uses (medclear.stack): Apache Kafka (one KRaft node with TLS on every listener; the tests
act as its operator, a super user, unless they check the ACLs) and the Debian ClickHouse
server. With a reachable Docker engine (`docker info` answers within 5 s) AND
MEDCLEAR_TEST_DOCKER=1, `kafka` and `clickhouse_url` come from testcontainers instead (a
plaintext Apache Kafka, a current ClickHouse).

`kafka_cluster` always starts embedded nodes: a test that stops, kills and restarts a
broker on the same storage and ports needs processes it controls.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from medclear import stack
from medclear.infra.kafka_access import OPERATOR, KafkaAccess
from medclear.infra.pki import ensure_kafka_pki
from medclear.stack.acls import CLIENT_PRINCIPALS
from medclear.stack.kafka import Cluster
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


def tls_dir(base: Path) -> Path:
    """Certificates of the stack's principals (and the broker's) under a CA of `base`."""
    return ensure_kafka_pki(base / "pki", [OPERATOR, *CLIENT_PRINCIPALS])


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def kafka_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Start embedded clusters (`size` nodes, TLS unless tls=False) that a test may stop,
    kill and restart on their storage and ports; every node is stopped at the end."""
    started: list[Cluster] = []

    def start(size: int = 1, tls: bool = True) -> Cluster:
        base = tmp_path / f"kafka-{len(started)}"
        cluster = Cluster(base, size, tls_dir(base) if tls else None)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in reversed(started):
            cluster.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaAccess]:
    """A broker shared by the whole session, as its operator."""
    if use_docker():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as container:
            access = KafkaAccess(container.get_bootstrap_server())
            stack.wait_kafka_ready(access, READY_TIMEOUT_S)
            yield access
        return
    base = tmp_path_factory.mktemp("kafka")
    cluster = Cluster(base, 1, tls_dir(base)).start()
    try:
        yield cluster.access
    finally:
        cluster.stop()


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
