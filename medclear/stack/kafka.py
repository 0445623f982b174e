"""Apache Kafka for the embedded stack: KRaft nodes on 127.0.0.1, each a broker and a
controller in one JVM (combined mode), run from the jars `make setup` resolved from Maven
Central into .kafka/lib (kafka/pom.xml, every jar pinned by kafka/jars.sha256).

One node by default; `medclear up --brokers 3` starts three, and every topic then has
three replicas, min.insync.replicas 2 and no unclean leader election, so a broker killed
with -9 loses no write acknowledged with acks=all and the cluster goes on with two.

Each node has three listeners, all TLS with a client certificate required (with the
default MEDCLEAR_KAFKA_SECURITY=ssl):
- CLIENT: medclear's processes, each with the certificate of its principal; what a
  principal may do is in its ACLs (medclear/stack/acls.py), anything else is refused
  (`StandardAuthorizer`, allow.everyone.if.no.acl.found=false);
- INTERNAL: replication between brokers;
- CONTROLLER: the KRaft quorum.
The brokers and controllers present the brokers' certificate (CN=medclear-broker), a
super user; so does nobody else. INTERNAL and CONTROLLER are secured rather than hidden:
on one host any local process reaches any loopback port, so a port nobody is told about
protects nothing. With MEDCLEAR_KAFKA_SECURITY=plaintext every listener is PLAINTEXT and
nothing is authorised or refused (for a comparison, never for data that matters).

A node's storage is formatted on its first start (`kafka.tools.StorageTool format`, the
cluster id made once per state directory) and kept by `down`; `down --wipe` deletes it.
A node stops gracefully on SIGTERM (controlled shutdown: it hands its leaderships over
first).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from medclear.infra.kafka_access import BROKER, OPERATOR, KafkaAccess, user
from medclear.infra.pki import ensure_kafka_pki
from medclear.infra.settings import KAFKA_HEAP_MB_DEFAULT
from medclear.infra.stack_state import StackError
from medclear.stack.probes import wait_kafka_ready
from medclear.stack.process import HOST, Process, free_port

REPO = Path(__file__).resolve().parents[2]
KAFKA_LIB = REPO / ".kafka" / "lib"
# The classes a node loads, archived once by `make setup` (`medclear kafka class-archive`,
# JDK AppCDS): a node then starts in ~3.5 s instead of ~5.5 s. A stale or missing archive
# only costs that time: the JVM then loads the classes from the jars.
CLASS_ARCHIVE = REPO / ".kafka" / "kafka.jsa"
JAVA = "java"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
FORMAT_TIMEOUT_S = 60.0
HEAP_START_MB = 128  # the heap grows to MEDCLEAR_KAFKA_HEAP_MB as it needs
READY_TIMEOUT_S = 60.0
ARCHIVE_STOP_TIMEOUT_S = 60.0  # the JVM writes the archive as it exits
MIN_INSYNC_MAX = 2  # with 3 replicas: a write is acknowledged by 2, one broker may be down
INTERNAL_TOPIC_PARTITIONS = 8  # __consumer_offsets, __transaction_state: a small stack's
# A broker that stops heartbeating is fenced after this, and its partitions' leadership
# moves then: on loopback a heartbeat is never late, so 3 s instead of Kafka's 9 s (the
# time a swipe waits after a broker dies).
BROKER_HEARTBEAT_MS = 500
BROKER_SESSION_MS = 3_000
# An idle controller appends a no-op record to the metadata log this often (Kafka: 500 ms),
# each written and replicated: an idle node's CPU 4.3 -> 2.2 % of a core at 5 s.
METADATA_IDLE_MS = 5_000
# The certificate's CN is the principal (CN=medclear-worker -> User:medclear-worker).
PRINCIPAL_RULE = "RULE:^CN=([^,]+)(,.*)?$/$1/,DEFAULT"

LOG4J2 = """\
# written by medclear.stack.kafka: the node's log goes to its component log (stdout)
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
# one line per request otherwise
logger.request.name = kafka.request.logger
logger.request.level = warn
# every refusal of an ACL check, with the principal, operation and resource
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = info
"""


@dataclass(frozen=True)
class Node:
    """One KRaft node: its id and the ports of its three listeners."""

    node_id: int
    client_port: int
    internal_port: int
    controller_port: int

    @property
    def name(self) -> str:
        return f"broker-{self.node_id}"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.client_port}"


def plan(count: int) -> list[Node]:
    """`count` nodes on free loopback ports."""
    return [Node(i, free_port(), free_port(), free_port()) for i in range(count)]


def bootstrap_of(nodes: list[Node]) -> str:
    return ",".join(node.bootstrap for node in nodes)


def installed() -> str | None:
    """None if the broker's jars are in place, else what to do."""
    if not any(KAFKA_LIB.glob("kafka_2.13-*.jar")):
        return f"Apache Kafka is not installed in {KAFKA_LIB} (run `make setup`)"
    return None


def node_config(node: Node, nodes: list[Node], data_dir: Path, ssl_dir: Path | None) -> str:
    """server.properties of one node of the cluster `nodes`."""
    replicas = min(len(nodes), 3)
    min_isr = min(replicas, MIN_INSYNC_MAX)
    protocol = "SSL" if ssl_dir is not None else "PLAINTEXT"
    voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in nodes)
    lines = [
        "# written by medclear.stack.kafka at every start",
        "process.roles=broker,controller",
        f"node.id={node.node_id}",
        f"controller.quorum.voters={voters}",
        f"listeners=CLIENT://{HOST}:{node.client_port},INTERNAL://{HOST}:{node.internal_port},"
        f"CONTROLLER://{HOST}:{node.controller_port}",
        f"advertised.listeners=CLIENT://{HOST}:{node.client_port},"
        f"INTERNAL://{HOST}:{node.internal_port}",
        "inter.broker.listener.name=INTERNAL",
        "controller.listener.names=CONTROLLER",
        f"listener.security.protocol.map=CLIENT:{protocol},INTERNAL:{protocol},"
        f"CONTROLLER:{protocol}",
        f"log.dirs={data_dir / 'log'}",
        "num.partitions=1",
        f"default.replication.factor={replicas}",
        f"min.insync.replicas={min_isr}",
        f"offsets.topic.replication.factor={replicas}",
        f"offsets.topic.num.partitions={INTERNAL_TOPIC_PARTITIONS}",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={min_isr}",
        f"transaction.state.log.num.partitions={INTERNAL_TOPIC_PARTITIONS}",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.min.isr={min_isr}",
        "unclean.leader.election.enable=false",
        "auto.create.topics.enable=false",  # a mistyped topic is an error, not a new topic
        "group.initial.rebalance.delay.ms=0",
        f"broker.heartbeat.interval.ms={BROKER_HEARTBEAT_MS}",
        f"metadata.max.idle.interval.ms={METADATA_IDLE_MS}",
        f"broker.session.timeout.ms={BROKER_SESSION_MS}",
        # sized for a 2-core machine: the defaults start 3 network and 8 I/O threads
        "num.network.threads=2",
        "num.io.threads=4",
        "background.threads=4",
        "num.replica.fetchers=1",
        "log.cleaner.threads=1",
        "num.recovery.threads.per.data.dir=1",
    ]
    if ssl_dir is not None:
        lines += [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={ssl_dir / (BROKER + '.keystore.pem')}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={ssl_dir / 'ca.pem'}",
            "ssl.client.auth=required",
            f"ssl.principal.mapping.rules={PRINCIPAL_RULE}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found=false",
            f"super.users={user(BROKER)};{user(OPERATOR)}",
        ]
    return "\n".join(lines) + "\n"


def java_argv(config: Path, heap_mb: int, archive_to: Path | None = None) -> list[str]:
    """The JVM of one node, sized for a small machine: a heap that starts small, G1 with
    short pauses, an exit on OutOfMemoryError (the watcher restarts it), and the class
    archive if there is one (or, `archive_to`, writing one when the node exits)."""
    if archive_to is not None:
        sharing = [f"-XX:ArchiveClassesAtExit={archive_to}"]
    else:
        sharing = [f"-XX:SharedArchiveFile={CLASS_ARCHIVE}"] if CLASS_ARCHIVE.exists() else []
    return [
        JAVA,
        *sharing,
        f"-Xms{min(HEAP_START_MB, heap_mb)}m",
        f"-Xmx{heap_mb}m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={config.parent / 'log4j2.properties'}",
        "-cp",
        f"{KAFKA_LIB}/*",
        MAIN_CLASS,
        str(config),
    ]


def cluster_id(base: Path) -> str:
    """The cluster's id (22 characters of URL-safe base64, as Kafka's), made once. The
    nodes of a new cluster ask for it at once, from threads of their own (start_nodes):
    the first id written wins, whole (written aside, then linked into place, which fails
    if the file exists), and every node reads that one. (Checked, then written, two nodes
    made two ids once, and the second never joined: INCONSISTENT_CLUSTER_ID.)"""
    path = base / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    value = "-"
    while value.startswith("-"):  # as Kafka's own ids: a leading "-" reads as an option
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    base.mkdir(parents=True, exist_ok=True)
    aside = base / f"cluster.id.{uuid.uuid4().hex}"
    aside.write_text(value + "\n")
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # another node's id won
    finally:
        aside.unlink()
    return path.read_text().strip()


def format_storage(config: Path, log_dir: Path, the_cluster: str, log: Path) -> None:
    """Format a node's storage on its first start (a node formatted before is left as is)."""
    if (log_dir / "meta.properties").exists():
        return
    # a short-lived JVM: the class archive, and the quick compiler only
    sharing = [f"-XX:SharedArchiveFile={CLASS_ARCHIVE}"] if CLASS_ARCHIVE.exists() else []
    argv = [
        JAVA,
        *sharing,
        "-XX:TieredStopAtLevel=1",
        "-Xmx256m",
        f"-Dlog4j2.configurationFile={config.parent / 'log4j2.properties'}",
        "-cp",
        f"{KAFKA_LIB}/*",
        STORAGE_TOOL,
        "format",
        "--cluster-id",
        the_cluster,
        "--config",
        str(config),
    ]
    with open(log, "ab") as out:
        out.write(f"=== formatting storage: {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=FORMAT_TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        raise StackError(
            f"formatting the storage of {config.parent.name} failed (exit {done.returncode})",
            "broker",
            _tail(log),
        )


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return ""


def start_node(
    node: Node,
    nodes: list[Node],
    base: Path,
    ssl_dir: Path | None,
    heap_mb: int,
    log: Path,
    archive_to: Path | None = None,
) -> Process:
    """Write the node's configuration, format its storage if new, start it."""
    problem = installed()
    if problem is not None:
        raise StackError(problem, node.name)
    home = (base / node.name).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "server.properties"
    config.write_text(node_config(node, nodes, home, ssl_dir))
    (home / "log4j2.properties").write_text(LOG4J2)
    format_storage(config, home / "log", cluster_id(base), log)
    return Process(
        name=node.name, argv=java_argv(config, heap_mb, archive_to), log=log.resolve(), cwd=home
    ).start()


def start_nodes(
    nodes: list[Node], base: Path, ssl_dir: Path | None, heap_mb: int, logs: Path
) -> list[Process]:
    """Start every node of the cluster at once (each formats its storage first if new: a
    JVM each, run side by side). Whatever started is stopped if one fails."""
    cluster_id(base)  # made here, once, before the nodes ask for it side by side
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = [
            pool.submit(start_node, node, nodes, base, ssl_dir, heap_mb, logs / f"{node.name}.log")
            for node in nodes
        ]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for proc in started:
            proc.stop()
        raise failed[0]  # type: ignore[misc]
    return started


@dataclass
class Cluster:
    """An embedded cluster outside the stack's record (the tests, the benchmark rigs): its
    nodes keep their ports and storage across a stop and a start."""

    base: Path
    size: int = 1
    ssl_dir: Path | None = None
    heap_mb: int = KAFKA_HEAP_MB_DEFAULT
    nodes: list[Node] = field(default_factory=list)
    procs: dict[int, Process] = field(default_factory=dict)

    @property
    def access(self) -> KafkaAccess:
        return KafkaAccess(bootstrap_of(self.nodes), OPERATOR, self.ssl_dir, min(self.size, 3))

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> Cluster:
        """Every node (planned on the first start), then wait until all have met."""
        if not self.nodes:
            self.nodes = plan(self.size)
        procs = start_nodes(self.nodes, self.base, self.ssl_dir, self.heap_mb, self.base)
        self.procs = {node.node_id: proc for node, proc in zip(self.nodes, procs, strict=True)}
        try:
            wait_kafka_ready(self.access, timeout_s, proc=procs[0], brokers_min=self.size)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, node_id: int, timeout_s: float = READY_TIMEOUT_S) -> Process:
        """One node again (after `stop_node`), on its ports and storage."""
        node = self.nodes[node_id]
        proc = start_node(
            node, self.nodes, self.base, self.ssl_dir, self.heap_mb, self.base / f"{node.name}.log"
        )
        self.procs[node_id] = proc
        wait_kafka_ready(replace(self.access, bootstrap=node.bootstrap), timeout_s, proc=proc)
        return proc

    def stop_node(self, node_id: int) -> None:
        """Graceful: SIGTERM (a controlled shutdown), SIGKILL after STOP_TIMEOUT_S."""
        proc = self.procs.pop(node_id, None)
        if proc is not None:
            proc.stop()

    def kill_node(self, node_id: int) -> None:
        """kill -9: no controlled shutdown, nothing flushed by the broker itself."""
        proc = self.procs.pop(node_id, None)
        if proc is not None:
            proc.kill()

    def stop(self) -> None:
        for node_id in list(self.procs):
            self.stop_node(node_id)


def build_class_archive(timeout_s: float = READY_TIMEOUT_S) -> Path:
    """Start a throwaway TLS node, let it serve a moment, stop it: the JVM writes the
    classes it loaded to CLASS_ARCHIVE as it exits. Returns the archive."""
    with tempfile.TemporaryDirectory(prefix="medclear-kafka-cds-") as tmp:
        base = Path(tmp)
        ssl_dir = ensure_kafka_pki(base / "pki", [OPERATOR])
        node = plan(1)[0]
        written = base / "kafka.jsa"
        proc = start_node(
            node,
            [node],
            base,
            ssl_dir,
            KAFKA_HEAP_MB_DEFAULT,
            base / "node.log",
            archive_to=written,
        )
        try:
            wait_kafka_ready(KafkaAccess(node.bootstrap, OPERATOR, ssl_dir), timeout_s, proc=proc)
        finally:
            proc.stop(ARCHIVE_STOP_TIMEOUT_S)
        if not written.exists():
            raise StackError("the JVM wrote no class archive", node.name, _tail(base / "node.log"))
        CLASS_ARCHIVE.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(written, CLASS_ARCHIVE)
    return CLASS_ARCHIVE
