"""Who a medclear process is to the broker, and how it reaches it: `KafkaAccess`.

Every Kafka client of medclear is made with `KafkaAccess.options()`: the bootstrap
servers and, with TLS (the default), the stack's CA and the principal's own certificate,
`<ssl_dir>/<principal>.pem` with its key `<principal>.key`. The certificate's common name
is `medclear-<principal>`; the broker maps it to the principal `User:medclear-<principal>`
(`ssl.principal.mapping.rules`, medclear/stack/kafka.py) and allows it only what
medclear/stack/acls.py grants. A process that runs several jobs (`medclear serve jobs`)
gives each job's clients the job's own certificate.

This module imports no Kafka client (the context is the standard library's), so the
stack's record can name an access without loading aiokafka.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from medclear.errors import MedclearError
from medclear.infra.settings import KafkaSecurity, Settings

CN_PREFIX = "medclear-"  # a principal's certificate: CN=medclear-<principal>
CA_FILE = "ca.pem"
OPERATOR = "operator"  # administers: `up`, the drills, the benchmarks, `medclear kafka`
ANALYST = "analyst"  # reads the events topic only
RECON = "recon"  # `medclear recon`: the settlements and events, the jobs' progress
BROKER = "broker"  # the brokers and controllers among themselves
EXTERNAL_REPLICATION = 3  # an external cluster's topics, unless MEDCLEAR_KAFKA_REPLICATION
REPLICATION_MAX = 3  # the embedded cluster's, at most (RF 3, min.insync.replicas 2)


class KafkaAccessError(MedclearError):
    """A principal's certificate or the CA is missing or unreadable."""


def user(principal: str) -> str:
    """The Kafka principal of a medclear principal: `User:medclear-<principal>`."""
    return f"User:{CN_PREFIX}{principal}"


@dataclass(frozen=True)
class KafkaAccess:
    """The servers, the identity to present (`principal`; no TLS when `ssl_dir` is None)
    and the replication factor of the topics this client creates."""

    bootstrap: str
    principal: str = OPERATOR
    ssl_dir: Path | None = None
    replication: int = 1

    def as_principal(self, principal: str) -> KafkaAccess:
        """The same servers, another identity."""
        return replace(self, principal=principal)

    @property
    def tls(self) -> bool:
        return self.ssl_dir is not None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client."""
        if self.ssl_dir is None:
            return {"bootstrap_servers": self.bootstrap}
        return {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": "SSL",
            "ssl_context": ssl_context(self.ssl_dir, self.principal),
        }

    def files(self) -> dict[str, str]:
        """The CA, certificate and key paths (for a third-party client such as kcat)."""
        if self.ssl_dir is None:
            return {}
        return {
            "ca": str(self.ssl_dir / CA_FILE),
            "certificate": str(self.ssl_dir / f"{self.principal}.pem"),
            "key": str(self.ssl_dir / f"{self.principal}.key"),
        }


@lru_cache(maxsize=64)
def ssl_context(ssl_dir: Path, principal: str) -> ssl.SSLContext:
    """A client context: the stack's CA, the principal's certificate and key, host names
    checked against the brokers' certificates."""
    ca, cert, key = ssl_dir / CA_FILE, ssl_dir / f"{principal}.pem", ssl_dir / f"{principal}.key"
    for path in (ca, cert, key):
        if not path.is_file():
            raise KafkaAccessError(
                f"no {path} for the Kafka principal {user(principal)} "
                "(made by `medclear up`, or set MEDCLEAR_KAFKA_SSL_DIR)"
            )
    context = ssl.create_default_context(cafile=str(ca))
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise KafkaAccessError(f"{cert}: {exc}") from exc
    return context


def default_ssl_dir(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve() / "pki" / "kafka"


def replication(settings: Settings) -> int:
    """The replication factor of the topics medclear creates."""
    if settings.kafka_replication is not None:
        return settings.kafka_replication
    if settings.kafka_bootstrap:
        return EXTERNAL_REPLICATION
    return min(settings.kafka_brokers, REPLICATION_MAX)


def from_settings(settings: Settings, principal: str) -> KafkaAccess:
    """The access of a process whose settings name the servers (MEDCLEAR_KAFKA_*: what
    `up` gives its processes, or an external cluster)."""
    ssl_dir = None
    if settings.kafka_security == KafkaSecurity.SSL:
        ssl_dir = (settings.kafka_ssl_dir or default_ssl_dir(settings)).expanduser().resolve()
    return KafkaAccess(settings.kafka_bootstrap, principal, ssl_dir, replication(settings))
