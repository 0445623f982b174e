"""The servers the stack runs beside medclear, each started on loopback in its own
session: ClickHouse and Prometheus here; Apache Kafka in medclear/stack/kafka.py (and the
topics medclear creates on it, `create_topics`).
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import TopicError, ensure_topics
from medclear.infra.stack_state import (
    StackError,
)
from medclear.stack.probes import (
    run_sync,
)
from medclear.stack.process import (
    HOST,
    Process,
)

# --------------------------------------------------------------------------------------
# Kafka


def create_topics(kafka: KafkaAccess, partitions: dict[str, int]) -> None:
    """Create each topic with its partition count (and the access's replication factor);
    idempotent. An existing topic with the same count is fine; with another count it is an
    error.
    """
    try:
        run_sync(ensure_topics(kafka, partitions))
    except TopicError as exc:
        raise StackError(str(exc)) from exc


# --------------------------------------------------------------------------------------
# ClickHouse

CLICKHOUSE_BIN = Path("/usr/sbin/clickhouse-server")


def _clickhouse_config(data_dir: Path, tcp_port: int, http_port: int) -> str:
    def p(path: Path) -> str:
        return xml_escape(str(path))

    return f"""<?xml version="1.0"?>
<!-- written by medclear.stack.start_clickhouse; rewritten at every start -->
<yandex>
    <logger>
        <level>information</level>
        <log>{p(data_dir / "log" / "clickhouse-server.log")}</log>
        <errorlog>{p(data_dir / "log" / "clickhouse-server.err.log")}</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>{HOST}</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <!-- no interserver_http_port, https_port, tcp_port_secure: nothing else listens -->
    <path>{p(data_dir / "data")}/</path>
    <tmp_path>{p(data_dir / "tmp")}/</tmp_path>
    <user_files_path>{p(data_dir / "user_files")}/</user_files_path>
    <format_schema_path>{p(data_dir / "format_schemas")}/</format_schema_path>
    <users_config>{p(data_dir / "users.xml")}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <keep_alive_timeout>3</keep_alive_timeout>
</yandex>
"""


_CLICKHOUSE_USERS = """<?xml version="1.0"?>
<!-- written by medclear.stack.start_clickhouse -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def start_clickhouse(data_dir: Path, tcp_port: int, http_port: int, log: Path) -> Process:
    """Start clickhouse-server with its own config.xml + users.xml written under `data_dir`.

    Its own logs go to `data_dir`/log/ (shown with `log`'s tail when it fails).
    """
    if not CLICKHOUSE_BIN.is_file():
        raise StackError(f"{CLICKHOUSE_BIN} not found (apt-get install clickhouse-server)")
    data_dir = data_dir.resolve()
    for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    config = data_dir / "config.xml"
    config.write_text(_clickhouse_config(data_dir, tcp_port, http_port))
    (data_dir / "users.xml").write_text(_CLICKHOUSE_USERS)
    return Process(
        name="clickhouse",
        argv=[
            str(CLICKHOUSE_BIN),
            f"--config-file={config}",
            "--",
            f"--tcp_port={tcp_port}",
            f"--http_port={http_port}",
        ],
        log=log.resolve(),
        cwd=data_dir,
        extra_logs=(data_dir / "log" / "clickhouse-server.err.log",),
    ).start()


def _admin_url(url: str, **query: str) -> str:
    """The same server and credentials, database `default` (which always exists)."""
    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query)) | query
    return urllib.parse.urlunsplit(
        parts._replace(path="/default", query=urllib.parse.urlencode(params))
    )


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _client(url: str) -> Any:
    """A ClickHouse client for `url`. clickhouse_driver is imported here, when a stack
    command first talks to ClickHouse: it takes ~0.1 s to import, and every command whose
    module reaches medclear.stack (seed, demo, bench, …) paid it, --help included."""
    from clickhouse_driver import Client

    return Client.from_url(url)


def create_database(url: str, database: str) -> None:
    if not _IDENTIFIER.match(database):
        raise StackError(f"invalid ClickHouse database name {database!r}", "clickhouse")
    client = _client(_admin_url(url, connect_timeout="5"))
    try:
        client.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    finally:
        client.disconnect()


def clickhouse_probe(url: str) -> str | None:
    """None if `SELECT 1` succeeds over the native protocol (for an external server)."""
    client = _client(_admin_url(url, connect_timeout="2", send_receive_timeout="5"))
    try:
        client.execute("SELECT 1")
    except Exception as exc:  # any failure means "not healthy"
        return f"SELECT 1 failed: {type(exc).__name__}: {exc}"
    finally:
        client.disconnect()
    return None


# --------------------------------------------------------------------------------------
# Prometheus

PROMETHEUS_BIN = "prometheus"


MONITORING_DIR = Path(__file__).resolve().parents[2] / "monitoring"
CONSOLES_DIR = MONITORING_DIR / "consoles"
CONSOLE_LIBRARIES_DIR = MONITORING_DIR / "console_libraries"


def start_prometheus(
    data_dir: Path,
    port: int,
    scrape_targets: dict[str, list[str]],
    log: Path,
    *,
    rule_files: Sequence[Path] = (),
) -> Process:
    """Start Prometheus on 127.0.0.1:`port`, scraping job -> ["127.0.0.1:PORT", ...] every 5 s.

    The config is written to `data_dir`/prometheus.yml (JSON, which is YAML), the TSDB
    to `data_dir`/tsdb.
    """
    binary = shutil.which(PROMETHEUS_BIN)
    if binary is None:
        raise StackError("prometheus not found (apt-get install prometheus)", "prometheus")
    data_dir = data_dir.resolve()
    (data_dir / "tsdb").mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s", "scrape_timeout": "4s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in scrape_targets.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    config_file = data_dir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return Process(
        name="prometheus",
        argv=[
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}",
            # the operator console: /consoles/medclear.html (monitoring/consoles/)
            f"--web.console.templates={CONSOLES_DIR}",
            f"--web.console.libraries={CONSOLE_LIBRARIES_DIR}",
        ],
        log=log.resolve(),
        cwd=data_dir,
    ).start()
