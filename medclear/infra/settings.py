"""One settings object for every medclear process (env MEDCLEAR_*, embedded defaults).

Leaving kafka_bootstrap / clickhouse_url empty means "the embedded stack": `medclear up`
starts a broker and a ClickHouse server itself and writes where they listen into the
state directory. Setting them points the same code at external servers.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSecurity(StrEnum):
    SSL = "ssl"  # mutual TLS: each process a certificate of its own, ACLs (the default)
    PLAINTEXT = "plaintext"  # no authentication: any local process reads every topic


KAFKA_HEAP_MB_DEFAULT = 512  # an embedded node's JVM heap (RSS: docs/PERFORMANCE.md)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDCLEAR_", frozen=True, extra="ignore")

    state_dir: Path = Field(Path(".medclear"), description="PID files, logs, data, ports")
    host: str = Field("127.0.0.1", description="every embedded server binds here only")

    kafka_bootstrap: str = Field("", description="external brokers; empty: embedded")
    kafka_brokers: int = Field(
        1, ge=1, le=5, description="embedded: KRaft nodes `up` starts (`up --brokers 3`)"
    )
    kafka_security: KafkaSecurity = Field(
        KafkaSecurity.SSL, description="ssl: mutual TLS and ACLs; plaintext: no lock at all"
    )
    kafka_ssl_dir: Path | None = Field(
        None,
        description="the CA (ca.pem) and one certificate per principal (<name>.pem, "
        "<name>.key); default: <state_dir>/pki/kafka, made by `up`",
    )
    kafka_replication: int | None = Field(
        None,
        ge=1,
        le=7,
        description="replication factor of the topics medclear creates; unset: 3, or the "
        "embedded cluster's size up to 3",
    )
    kafka_heap_mb: int = Field(
        KAFKA_HEAP_MB_DEFAULT, ge=128, le=16_384, description="embedded: each node's heap"
    )
    clickhouse_url: str = Field("", description="clickhouse://host:port/db; empty: embedded")
    clickhouse_database: str = "medclear"

    command_partitions: int = Field(6, ge=1, le=1024)
    event_partitions: int = Field(6, ge=1, le=1024)
    workers: int = Field(1, ge=1, le=64)
    worker_mode: Literal["clear", "echo"] = Field(
        "clear", description="echo: the null pipeline for benchmarks (answers OK, decides nothing)"
    )

    gateway_port: int = Field(0, ge=0, le=65535, description="0: a free port")
    registry_port: int = Field(0, ge=0, le=65535)
    prometheus_port: int = Field(0, ge=0, le=65535)

    hsm_port: int = Field(0, ge=0, le=65535)
    hsm_address: str = Field("", description="host:port of the HSM (set by `up`)")
    tls: bool = Field(True, description="mutual TLS with role certificates on every gRPC server")
    terminal_security: bool = Field(
        True, description="MAC and PIN of every POS request checked through the HSM"
    )
    card_cryptogram_required: bool = Field(
        False, description="with terminal security: refuse swipes without a chip cryptogram"
    )
    hsm_lmk: SecretStr = Field(
        SecretStr(""),
        description="the HSM's local master key, hex (else the file); `up` writes it to the "
        "file and no process but the HSM reads it",
    )
    card_token_key: SecretStr = Field(
        SecretStr(""), description="hex key of the card tokens in published events (else a file)"
    )
    contact_data_key: SecretStr = Field(
        SecretStr(""), description="hex AES-256 key sealing names and phones (else a file)"
    )
    person_data_key: SecretStr = Field(
        SecretStr(""), description="hex AES-256 key sealing social security numbers (else a file)"
    )
    hsm_lmk_file: Path | None = Field(None, description="default: <state_dir>/hsm/lmk.hex")

    decision_deadline_ms: int = Field(3_000, ge=10, le=60_000)
    startup_timeout_s: float = Field(60.0, gt=0, le=3600)
    restart_on_exit: bool = Field(
        True,
        description="`up` starts a watcher that restarts a component which exits on its own, "
        "with back-off and a bound (medclear/stack/restarts.py)",
    )

    institutions_file: Path | None = Field(None, description="CSV of designated institutions")
    pre_loss_policy_file: Path | None = Field(None, description="CSV: region → pre-loss lifetime")
    jobs: str = Field(
        "", description="comma-separated stream jobs `up` starts (stream_jobs/jobs.py); empty: all"
    )
    jobs_in_one_process: bool = Field(
        True,
        description="`up` runs the stream jobs in one process, component `jobs` (false: one "
        "process per job, as in production, so one job's crash stops no other)",
    )
    pre_loss_timer_interval_s: float = Field(5.0, gt=0, le=3600, description="timer job tick")
    settlement_cutoff_s: int = Field(
        7200, ge=0, le=7 * 86400, description="a settlement day closes this long after its end"
    )
    clickhouse_sink_batch_rows: int = Field(5_000, ge=1, le=100_000, description="rows/insert")
    clickhouse_sink_batch_wait_ms: int = Field(200, ge=1, le=60_000, description="batch time bound")
    sms_enabled: bool = Field(True, description="the sms job submits SMS (else it only idles)")
    smsc_embedded: bool = Field(
        True,
        description="`up` starts a loopback SMSC (npm smpp) for the sms job; false: use smsc_host",
    )
    smsc_host: str = Field("127.0.0.1", description="SMPP 3.4 SMSC the sms job binds to")
    smsc_port: int = Field(2775, ge=1, le=65535)
    smsc_system_id: str = Field("medclear", max_length=15, description="SMPP bind system_id")
    smsc_password: SecretStr = Field(
        SecretStr(""), max_length=8, description="SMPP bind password (else the file, else medclear)"
    )
    smsc_source_addr: str = Field("12393", max_length=20, description="sender (医保 hotline)")
    sms_templates_file: Path | None = Field(None, description="default: stream_jobs/templates")

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def embedded_clickhouse(self) -> bool:
        return not self.clickhouse_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# Never in a child's environment: `up` writes each into a file
# (medclear.stack.secrets.write_secrets).
SECRET_FIELDS = (
    "hsm_lmk",
    "card_token_key",
    "contact_data_key",
    "person_data_key",
    "smsc_password",
)
SMSC_PASSWORD_DEFAULT = "medclear"  # the loopback SMSC's


def smsc_password_file(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve() / "keys" / "smsc-password"


def smsc_password(settings: Settings) -> str:
    """The SMPP bind password: the setting, else the file `up` wrote it to, else the
    loopback SMSC's default."""
    given = settings.smsc_password.get_secret_value()
    if given:
        return given
    path = smsc_password_file(settings)
    return path.read_text().strip() if path.exists() else SMSC_PASSWORD_DEFAULT


def lmk_file(settings: Settings) -> Path:
    return settings.hsm_lmk_file or settings.state_dir / "hsm" / "lmk.hex"


def key_store_file(settings: Settings) -> Path:
    return settings.state_dir / "data" / "hsm" / "keys.json"


def keyring_file(settings: Settings) -> Path:
    """The simulated terminals' keys (owner-readable only)."""
    return settings.state_dir / "terminals" / "keyring.json"


def pki_dir(settings: Settings) -> Path | None:
    """Where the local CA and role certificates live; None when TLS is off."""
    return settings.state_dir.resolve() / "pki" if settings.tls else None
