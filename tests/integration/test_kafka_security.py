"""The log is locked (issue 24): on the stack `medclear up` starts, Apache Kafka takes only
TLS clients with a certificate of the stack's CA, and each principal may do only what
medclear/stack/acls.py grants it. Checked with aiokafka and with a third-party client,
kcat (librdkafka), as an outsider would try:

- no certificate (or one of another CA, or no TLS at all): nothing is read or written;
- the analyst reads medclear.events, and is refused on the commands and every changelog
  (they hold the ssn, name, phone and card number in clear) and on the card index;
- a terminal's certificate (the stack's CA, role terminal) is refused on every topic;
- each process only what it needs: the gateway writes commands but cannot read them, the
  worker writes events but cannot read them, a stream job cannot write the events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from medclear import stack
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import read_topic
from medclear.infra.pki import Role, ensure_pki
from medclear.infra.settings import Settings
from medclear.stack import acls
from tests.integration.running import running_stack

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.timeout(300)]

REFUSED = "refused"
SEEDED = 20


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.Endpoints]:
    settings = Settings(
        tls=False,
        terminal_security=False,
        state_dir=tmp_path_factory.mktemp("locked") / ".medclear",
        command_partitions=2,
        event_partitions=2,
    )
    with running_stack(settings) as endpoints:
        env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir)}
        seeded = subprocess.run(
            [sys.executable, "-m", "medclear", "seed", "--persons", str(SEEDED)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert seeded.returncode == 0, seeded.stdout[-2000:] + seeded.stderr[-2000:]
        yield endpoints


def changelogs(endpoints: stack.Endpoints) -> list[str]:
    async def names() -> list[str]:
        consumer = AIOKafkaConsumer(**endpoints.kafka().options())
        await consumer.start()
        try:
            return sorted(t for t in await consumer.topics() if t.endswith("-changelog"))
        finally:
            await consumer.stop()

    found = asyncio.run(names())
    assert "medclear-clearing-persons-changelog" in found, found
    return found


def read_or_refused(kafka: KafkaAccess, topic: str) -> int | str:
    """How many records `kafka`'s principal reads from partition 0 of `topic` (which holds
    some), or REFUSED: no connection, the topic hidden from it (no DESCRIBE), a fetch
    refused, or nothing read of what the partition holds."""

    async def read() -> int | str:
        consumer = AIOKafkaConsumer(
            **kafka.options(), enable_auto_commit=False, request_timeout_ms=10_000
        )
        try:
            await asyncio.wait_for(consumer.start(), 15)
        except (KafkaError, OSError, TimeoutError):
            return REFUSED
        try:
            if topic not in await consumer.topics():
                return REFUSED
            tp = TopicPartition(topic, 0)
            end = (await consumer.end_offsets([tp]))[tp]
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            got = 0
            deadline = time.monotonic() + 5
            while got < end and time.monotonic() < deadline:
                batches = await consumer.getmany(tp, timeout_ms=500)
                got += sum(len(batch) for batch in batches.values())
            return got if got or not end else REFUSED
        except KafkaError:
            return REFUSED
        finally:
            await consumer.stop()

    return asyncio.run(read())


def write_or_refused(kafka: KafkaAccess, topic: str) -> str:
    async def write() -> str:
        producer = AIOKafkaProducer(**kafka.options(), acks="all", request_timeout_ms=10_000)
        try:
            await asyncio.wait_for(producer.start(), 15)
        except (KafkaError, OSError, TimeoutError):
            return REFUSED
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, b"intruder", key=b"x"), 15)
            return "written"
        except (KafkaError, TimeoutError):
            return REFUSED
        finally:
            await producer.stop()

    return asyncio.run(write())


def kcat(args: list[str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kcat", *args, *command], capture_output=True, text=True, timeout=60, check=False
    )


def kcat_tls(kafka: KafkaAccess, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """kcat's options for the broker: the CA, and a client certificate if given."""
    assert kafka.ssl_dir is not None
    args = [
        "-b",
        kafka.bootstrap,
        "-X",
        "security.protocol=ssl",
        "-X",
        f"ssl.ca.location={kafka.ssl_dir / 'ca.pem'}",
        "-X",
        "socket.timeout.ms=5000",
        "-X",
        "message.timeout.ms=8000",
    ]
    if cert is not None and key is not None:
        args += ["-X", f"ssl.certificate.location={cert}", "-X", f"ssl.key.location={key}"]
    return args


def kcat_reads(args: list[str], topic: str) -> subprocess.CompletedProcess[str]:
    return kcat(args, "-C", "-t", topic, "-p", "0", "-o", "beginning", "-e", "-q")


def kcat_refused(done: subprocess.CompletedProcess[str]) -> bool:
    text = (done.stdout + done.stderr).lower()
    return done.returncode != 0 or "authorization failed" in text or "not authorized" in text


def principal_files(kafka: KafkaAccess, principal: str) -> tuple[Path, Path]:
    files = kafka.as_principal(principal).files()
    return Path(files["certificate"]), Path(files["key"])


# ---------------------------------------------------------------------------- outsiders


def test_a_client_without_a_certificate_reads_and_writes_nothing(
    endpoints: stack.Endpoints,
) -> None:
    kafka = endpoints.kafka()
    assert kafka.ssl_dir is not None, "the stack's broker must be locked by default"
    commands_before = read_or_refused(kafka, topics.COMMANDS.name)
    plaintext = KafkaAccess(kafka.bootstrap)  # no TLS at all
    assert read_or_refused(plaintext, topics.EVENTS.name) == REFUSED
    assert write_or_refused(plaintext, topics.COMMANDS.name) == REFUSED
    anonymous = kcat_tls(kafka)  # TLS, the CA, no client certificate
    done = kcat_reads(anonymous, topics.EVENTS.name)
    assert done.returncode != 0 and not done.stdout, done.stderr[-500:]
    produced = subprocess.run(
        ["kcat", *anonymous, "-P", "-t", topics.COMMANDS.name],
        input="intruder\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert produced.returncode != 0, produced.stderr[-500:]
    # and nothing was written by those attempts
    assert read_or_refused(kafka, topics.COMMANDS.name) == commands_before


def test_a_certificate_of_another_ca_is_refused(endpoints: stack.Endpoints, tmp_path: Path) -> None:
    """A certificate that claims to be the analyst, signed by a CA of its own."""
    kafka = endpoints.kafka()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medclear-analyst")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "ca.pem").write_bytes((kafka.ssl_dir / "ca.pem").read_bytes())  # type: ignore[operator]
    (forged / "analyst.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (forged / "analyst.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    impostor = KafkaAccess(kafka.bootstrap, "analyst", forged)
    assert read_or_refused(impostor, topics.EVENTS.name) == REFUSED
    done = kcat_reads(
        kcat_tls(kafka, forged / "analyst.pem", forged / "analyst.key"), topics.EVENTS.name
    )
    assert done.returncode != 0 and not done.stdout, done.stderr[-500:]


def test_a_terminals_certificate_is_refused_on_the_broker(
    endpoints: stack.Endpoints, tmp_path: Path
) -> None:
    """A POS terminal's certificate is of the stack's CA (it calls the gateway), but the
    broker grants its principal nothing."""
    kafka = endpoints.kafka()
    assert kafka.ssl_dir is not None
    terminal_dir = tmp_path / "terminal"
    terminal_dir.mkdir()
    (terminal_dir / "ca.pem").write_bytes((kafka.ssl_dir / "ca.pem").read_bytes())
    grpc_pki = kafka.ssl_dir.parent
    ensure_pki(grpc_pki)  # the stack runs without gRPC TLS here: the role certificates
    for suffix in ("pem", "key"):
        (terminal_dir / f"terminal.{suffix}").write_bytes(
            (grpc_pki / f"{Role.TERMINAL.value}.{suffix}").read_bytes()
        )
    terminal = KafkaAccess(kafka.bootstrap, "terminal", terminal_dir)
    for topic in (topics.EVENTS.name, topics.COMMANDS.name, topics.CARD_INDEX.name):
        assert read_or_refused(terminal, topic) == REFUSED, topic
    assert write_or_refused(terminal, topics.COMMANDS.name) == REFUSED
    args = kcat_tls(kafka, terminal_dir / "terminal.pem", terminal_dir / "terminal.key")
    for topic in (topics.EVENTS.name, topics.COMMANDS.name):
        done = kcat_reads(args, topic)
        assert kcat_refused(done) and not done.stdout, (topic, done.stderr[-500:])


# ---------------------------------------------------------------------------- principals


def test_the_analyst_reads_the_events_and_nothing_else(endpoints: stack.Endpoints) -> None:
    kafka = endpoints.kafka()
    analyst = kafka.as_principal("analyst")
    events = asyncio.run(read_topic(analyst, topics.EVENTS.name))
    assert len(events) >= SEEDED, "the analyst reads the events"
    refused_on = [topics.COMMANDS.name, topics.CARD_INDEX.name, *changelogs(endpoints)]
    for topic in refused_on:
        assert read_or_refused(analyst, topic) == REFUSED, topic
    assert write_or_refused(analyst, topics.EVENTS.name) == REFUSED
    cert, key = principal_files(kafka, "analyst")
    args = kcat_tls(kafka, cert, key)
    done = kcat(args, "-C", "-t", topics.EVENTS.name, "-o", "beginning", "-e", "-q")
    assert done.returncode == 0 and len(done.stdout.splitlines()) >= SEEDED, done.stderr[-500:]
    for topic in refused_on:
        done = kcat_reads(args, topic)
        assert kcat_refused(done) and not done.stdout, (topic, done.stderr[-500:])


def test_each_process_may_do_only_what_it_needs(endpoints: stack.Endpoints) -> None:
    kafka = endpoints.kafka()
    gateway, worker, sink = (
        kafka.as_principal(p) for p in ("gateway", "worker", "clickhouse-sink")
    )
    assert read_or_refused(gateway, topics.COMMANDS.name) == REFUSED  # writes them only
    assert read_or_refused(worker, topics.COMMANDS.name) != REFUSED
    assert read_or_refused(worker, topics.EVENTS.name) == REFUSED  # writes them only
    assert read_or_refused(sink, topics.EVENTS.name) != REFUSED
    assert write_or_refused(sink, topics.EVENTS.name) == REFUSED
    assert read_or_refused(sink, "medclear-clearing-persons-changelog") == REFUSED
    assert read_or_refused(kafka.as_principal("sms"), topics.COMMANDS.name) == REFUSED


def test_the_acls_command_prints_and_applies_them(endpoints: stack.Endpoints) -> None:
    env = {**os.environ}
    printed = subprocess.run(
        [sys.executable, "-m", "medclear", "kafka", "acls", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr
    assert '"principal": "User:medclear-analyst"' in printed.stdout
    again = subprocess.run(
        [sys.executable, "-m", "medclear", "kafka", "acls", "--apply"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0 and f"{len(acls.rules())} ACLs created" in again.stdout, (
        again.stdout[-1000:] + again.stderr[-1000:]
    )
    client = subprocess.run(
        [sys.executable, "-m", "medclear", "kafka", "client", "analyst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert client.returncode == 0 and "analyst.pem" in client.stdout
    done = kcat(
        client.stdout.split(), "-C", "-t", topics.EVENTS.name, "-o", "beginning", "-e", "-q"
    )
    assert done.returncode == 0 and done.stdout, done.stderr[-500:]
