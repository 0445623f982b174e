"""Who may do what on the broker: the ACLs of medclear's principals, derived from the topic
names (medclear/infra/topics.py) and what each job declares it reads and writes
(stream_jobs/jobs.py), and applied with Kafka's Admin API (confluent-kafka, whose
admin client has ACLs; aiokafka's has none).

Every process authenticates with a certificate of its own (medclear/infra/kafka_access.py)
and gets only what it needs:
- gateway, registry: write the commands; read the card index; create and read their own
  reply topics (`medclear.replies.gw-*`, `medclear.replies.reg-*`);
- worker: read the commands; write the events, the card index and any reply topic; own
  its consumer group and changelog (`medclear-clearing*`);
- each stream job: read what it consumes, write its own topics, own its groups and
  changelogs (`<its prefix>*`);
- recon: read the events and the settlements, see how far the settlement job and the
  ClickHouse sink are;
- analyst: read the events, nothing else (the commands and the changelogs hold the ssn,
  name, phone and card number in clear);
- operator and broker: super users (server.properties), so no ACL is listed for them.
Anyone else (no certificate of the stack's CA, or one with no ACL, such as a terminal's)
reads and writes nothing: allow.everyone.if.no.acl.found=false.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from medclear.infra import topics
from medclear.infra.kafka_access import ANALYST, RECON, KafkaAccess, user
from medclear.infra.kafka_admin import new_reader
from medclear.infra.stack_state import StackError
from medclear.stack.probes import run_sync
from stream_jobs.jobs import KAFKA, WORKER_KAFKA, KafkaNeeds

APPLY_TIMEOUT_S = 30.0
EFFECTIVE_WAIT_S = 30.0  # until the brokers enforce ACLs just created
EFFECTIVE_POLL_S = 0.1
ANALYST_GROUP = "medclear-analyst"  # an analyst's consumer groups start with this
GATEWAY, REGISTRY, WORKER = "gateway", "registry", "worker"
# principals that run as medclear's own processes (the jobs are named in stream_jobs/jobs.py)
PROCESS_PRINCIPALS = (GATEWAY, REGISTRY, WORKER, *KAFKA)
CLIENT_PRINCIPALS = (*PROCESS_PRINCIPALS, RECON, ANALYST)  # every certificate `up` issues


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule: `principal` may `operation` on the `resource` named `name` (or every
    one whose name starts with it, `prefixed`)."""

    principal: str  # medclear's short name: gateway, worker, sms, …
    resource: str  # topic, group
    name: str
    prefixed: bool
    operation: str  # read, write, create, describe

    @property
    def pattern(self) -> str:
        return f"{self.name}*" if self.prefixed else self.name


def _topic(principal: str, name: str, *operations: str, prefixed: bool = False) -> list[Acl]:
    return [Acl(principal, "topic", name, prefixed, op) for op in operations]


def _group(principal: str, name: str, operation: str = "read", prefixed: bool = True) -> Acl:
    return Acl(principal, "group", name, prefixed, operation)


def _owns(principal: str, needs: KafkaNeeds) -> list[Acl]:
    """What a stream runtime needs: its inputs, its outputs, and its own consumer groups
    and changelog topics (created by itself at its first start)."""
    acls = [_group(principal, needs.prefix)]
    acls += _topic(principal, needs.prefix, "create", "read", "write", prefixed=True)
    for name in needs.reads:
        acls += _topic(principal, name, "read")
    for name in needs.writes:
        acls += _topic(principal, name, "write")
    return acls


def _front(principal: str, instance_prefix: str) -> list[Acl]:
    """A gRPC front of the command topic: it writes commands, follows the card index, and
    creates and reads its own reply topic."""
    replies = topics.REPLY_PREFIX + instance_prefix
    return [
        *_topic(principal, topics.COMMANDS.name, "write"),
        *_topic(principal, topics.CARD_INDEX.name, "read"),
        *_topic(principal, replies, "create", "read", prefixed=True),
    ]


def rules() -> list[Acl]:
    """Every ACL medclear's principals need, sorted."""
    acls = [
        *_front(GATEWAY, topics.GATEWAY_INSTANCE_PREFIX),
        *_front(REGISTRY, topics.REGISTRY_INSTANCE_PREFIX),
    ]
    acls += _owns(WORKER, WORKER_KAFKA)
    acls += _topic(WORKER, topics.REPLY_PREFIX, "write", prefixed=True)  # whoever asked
    for job, needs in KAFKA.items():
        acls += _owns(job, needs)
    # recon: the settlements and the events, and how far the jobs that count them are
    acls += [
        *_topic(RECON, topics.EVENTS.name, "read"),
        *_topic(RECON, topics.SETTLEMENTS.name, "read"),
        *_topic(RECON, topics.SETTLEMENT_INPUT.name, "describe"),
        _group(RECON, KAFKA["settlement"].prefix, "describe"),
        _group(RECON, KAFKA["clickhouse-sink"].prefix, "describe"),
    ]
    # an analyst: the events, read with a consumer group of its own
    acls += [*_topic(ANALYST, topics.EVENTS.name, "read"), _group(ANALYST, ANALYST_GROUP)]
    return sorted(set(acls))


def _binding(acl: Acl, user_format: str) -> AclBinding:
    return AclBinding(
        ResourceType.TOPIC if acl.resource == "topic" else ResourceType.GROUP,
        acl.name,
        ResourcePatternType.PREFIXED if acl.prefixed else ResourcePatternType.LITERAL,
        user_format.format(principal=acl.principal),
        "*",
        AclOperation[acl.operation.upper()],
        AclPermissionType.ALLOW,
    )


DEFAULT_USER_FORMAT = user("{principal}")  # User:medclear-<principal>


def admin_config(kafka: KafkaAccess) -> dict[str, str | int | float | bool]:
    """librdkafka's configuration for the same servers and identity as `kafka`."""
    config: dict[str, str | int | float | bool] = {"bootstrap.servers": kafka.bootstrap}
    files = kafka.files()
    if files:
        config |= {
            "security.protocol": "SSL",
            "ssl.ca.location": files["ca"],
            "ssl.certificate.location": files["certificate"],
            "ssl.key.location": files["key"],
        }
    return config


def apply(kafka: KafkaAccess, acls: Sequence[Acl], user_format: str = DEFAULT_USER_FORMAT) -> int:
    """Create the ACLs on the cluster as `kafka`'s principal (one that may alter the
    cluster's ACLs: the operator); creating one that exists changes nothing. Returns how
    many were asked for."""
    admin = AdminClient(admin_config(kafka))
    futures = admin.create_acls(
        [_binding(acl, user_format) for acl in acls], request_timeout=APPLY_TIMEOUT_S
    )
    failed = []
    for binding, future in futures.items():
        try:
            future.result(timeout=APPLY_TIMEOUT_S)
        except KafkaException as exc:
            failed.append(f"{binding}: {exc}")
    if failed:
        raise StackError(f"{len(failed)} ACLs not created: " + "; ".join(failed[:3]))
    return len(acls)


async def _visible_to(kafka: KafkaAccess, topic: str) -> bool:
    reader = new_reader(kafka)
    await reader.start()
    try:
        return topic in await reader.topics()
    finally:
        await reader.stop()


def wait_effective(kafka: KafkaAccess, timeout_s: float = EFFECTIVE_WAIT_S) -> None:
    """Wait until every broker enforces the ACLs just created (each learns them from the
    metadata log a moment after the controller took them): the analyst sees the events
    topic on each broker's own listener. On a cluster without medclear's topics yet there
    is nothing to see: by the time they are created, the ACLs are in force."""
    deadline = time.monotonic() + timeout_s
    if not run_sync(_visible_to(kafka, topics.EVENTS.name)):
        return
    for server in kafka.bootstrap.split(","):
        analyst = replace(kafka, bootstrap=server, principal=ANALYST)
        while not run_sync(_visible_to(analyst, topics.EVENTS.name)):
            if time.monotonic() > deadline:
                raise StackError(f"the ACLs are not in force on {server} after {timeout_s:g} s")
            time.sleep(EFFECTIVE_POLL_S)


def grouped(acls: Iterable[Acl]) -> dict[tuple[str, str, str], list[str]]:
    """(principal, resource, pattern) → its operations, for a table."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for acl in acls:
        out.setdefault((acl.principal, acl.resource, acl.pattern), []).append(acl.operation)
    return out
