"""The sms job on its own, with real parts: a broker, the loopback SMSC, the job as a
process. Used by tests/integration/test_sms.py and as a benchmark:

    .venv/bin/python -m medclear.bench.sms --rate 1000 --seconds 20

publishes synthetic published events (persons with phones, then approved swipes at a
fixed rate, each stamped with its send time as `at_ms`, like the gateway's ingress stamp)
straight to `medclear.events`, and reports consumption → submit_sm_resp latency from the
job's outcome records (`at_ms` of `submitted` minus the event's `at_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from clearing import codec
from clearing.codes import InstitutionType, InsuranceCategory
from clearing.model import Event, PersonRegistered, SwipeApproved
from clearing.redact import Redaction, published
from medclear import stack
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import ensure_topics, read_topic
from medclear.infra.settings import Settings
from medclear.infra.tokens import load_redaction
from medclear.stack.kafka import Cluster
from medclear.stack.smsc import Smsc, start_smsc

PARTITIONS = 3
READY_TIMEOUT_S = 60.0
PHARMACY = "310101P00002"
PRODUCE_CHUNK = 100  # events per produce burst


def ssn_of(n: int) -> str:
    return f"310101{n:011d}X"[:18]


def phone_of(n: int) -> str:
    return f"139{n:08d}"


def person(n: int, at_ms: int, phone: str | None = None) -> PersonRegistered:
    number = phone_of(n) if phone is None else phone
    return PersonRegistered(
        f"bench-reg-{n}#0", at_ms, ssn_of(n), "测试", InsuranceCategory.EMPLOYEE, number, "310101"
    )


def swipe(n: int, who: int, at_ms: int, institution: str = PHARMACY) -> SwipeApproved:
    request = f"bench-T1:{n:08d}"
    return SwipeApproved(
        f"{request}#0",
        at_ms,
        ssn_of(who),
        request,
        "",
        institution,
        InstitutionType.PHARMACY,
        3520,
        3520,
        0,
        1_000_000 - n,
        0,
        card_ref="ct_bench",
        card_masked=f"*****{who % 10_000:04d}",
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class SmsRig:
    """Broker + SMSC + sms job under `base`; the SMSC and the job can be stopped, killed
    and restarted on the same ports and data."""

    base: Path
    kafka: KafkaAccess | None = None
    institutions_file: Path | None = None
    broker: Cluster | None = None
    smsc: Smsc | None = None
    job: stack.Process | None = None
    smsc_port: int = field(default_factory=stack.free_port)
    metrics_port: int = field(default_factory=stack.free_port)
    job_starts: int = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def access(self) -> KafkaAccess:
        if self.kafka is None:
            raise RuntimeError("the rig is not started")
        return self.kafka

    def start(self, kafka: KafkaAccess | None = None) -> SmsRig:
        """On `kafka` (with no TLS), or a one-node cluster of its own."""
        self.base.mkdir(parents=True, exist_ok=True)
        if kafka is None:
            self.broker = Cluster(self.base / "kafka").start()
            kafka = self.broker.access
        self.kafka = kafka
        wanted = {topics.EVENTS.name: PARTITIONS, topics.SMS_OUTCOMES.name: PARTITIONS}
        asyncio.run(ensure_topics(kafka, wanted))
        self.start_smsc()
        self.start_job()
        return self

    def start_smsc(self) -> Smsc:
        self.smsc = start_smsc(self.smsc_port, self.base / "smsc.jsonl", self.base / "smsc.log")
        return self.smsc

    def stop_smsc(self) -> None:
        if self.smsc is not None:
            self.smsc.stop()

    def job_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MEDCLEAR_KAFKA_BOOTSTRAP=self.access.bootstrap,
            MEDCLEAR_KAFKA_SECURITY="plaintext",
            MEDCLEAR_KAFKA_REPLICATION=str(self.access.replication),
            MEDCLEAR_STATE_DIR=str(self.base / "state"),
            MEDCLEAR_EVENT_PARTITIONS=str(PARTITIONS),
            MEDCLEAR_SMSC_HOST="127.0.0.1",
            MEDCLEAR_SMSC_PORT=str(self.smsc_port),
        )
        if self.institutions_file is not None:
            env["MEDCLEAR_INSTITUTIONS_FILE"] = str(self.institutions_file)
        return env

    def start_job(self) -> None:
        medclear = Path(sys.executable).parent / "medclear"
        argv = [str(medclear), "serve", "sms", "--metrics-port", str(self.metrics_port)]
        self.job = stack.Process("sms", argv, self.base / "sms.log", env=self.job_env()).start()
        self.job_starts += 1
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        stack.wait_http_ok(url, READY_TIMEOUT_S, stack.READY_LINE, proc=self.job)

    def kill_job(self) -> None:
        """kill -9, no goodbye: what a crash looks like."""
        assert self.job is not None and self.job.pid is not None
        os.killpg(self.job.pid, signal.SIGKILL)
        self.job.stop(timeout=5)  # reaps it

    def stop(self) -> None:
        for process in (self.job, self.smsc.process if self.smsc else None):
            if process is not None:
                process.stop()
        if self.broker is not None:
            self.broker.stop()

    # ------------------------------------------------------------------ traffic

    def redaction(self) -> Redaction:
        """The keys the job's state directory holds: events are published with them, as
        the clearing worker publishes (no ssn, name or phone in clear)."""
        return load_redaction(Settings(state_dir=self.base / "state"))

    def publish(self, events: Iterable[Event]) -> None:
        asyncio.run(publish(self.access, [published(e, self.redaction()) for e in events]))

    def outcomes(self) -> list[dict[str, Any]]:
        return asyncio.run(read_json_topic(self.access, topics.SMS_OUTCOMES.name))

    def messages(self) -> list[dict[str, Any]]:
        return self.smsc.messages() if self.smsc is not None else []

    def wait_messages(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.messages()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def wait_destinations(self, wanted: set[str], timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Until every number in `wanted` got a message. Waiting for a count is not
        enough when messages can be doubled: the doubles fill the count early."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.messages()
            if wanted <= {m["destination"] for m in got} or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


async def publish(kafka: KafkaAccess, events: Sequence[Event]) -> None:
    producer = AIOKafkaProducer(**kafka.options(), acks="all", linger_ms=2)
    await producer.start()
    try:
        for start in range(0, len(events), PRODUCE_CHUNK):
            sends = [
                await producer.send(
                    topics.EVENTS.name, key=e.person_ref.encode(), value=codec.encode(e)
                )
                for e in events[start : start + PRODUCE_CHUNK]
            ]
            await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def publish_at_rate(
    kafka: KafkaAccess, events: Sequence[Event], rate: float, redaction: Redaction
) -> None:
    """Each event stamped with the time it is handed to the producer, `rate` a second."""
    producer = AIOKafkaProducer(**kafka.options(), acks="all", linger_ms=2)
    await producer.start()
    try:
        t0 = time.monotonic()
        pending = []
        for i, event in enumerate(events):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            stamped = published(replace(event, at_ms=now_ms()), redaction)
            pending.append(
                await producer.send(
                    topics.EVENTS.name, key=stamped.person_ref.encode(), value=codec.encode(stamped)
                )
            )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def read_json_topic(kafka: KafkaAccess, topic: str) -> list[dict[str, Any]]:
    """Every JSON record of `topic` now on the broker, read once from the beginning."""
    return [json.loads(value) for _key, value in await read_topic(kafka, topic) if value]


# ---------------------------------------------------------------------------- benchmark


def percentile(sorted_values: Sequence[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def bench(rate: float, seconds: float, persons: int, base: Path) -> dict[str, Any]:
    rig = SmsRig(base).start()
    try:
        t0 = now_ms()
        rig.publish(person(n, t0) for n in range(persons))
        rig.publish([swipe(0, 0, now_ms())])  # warm-up: the job has read the phone book
        if len(rig.wait_messages(1, 60)) < 1:
            raise RuntimeError(f"no SMS after the warm-up swipe; see {base}/sms.log")
        count = int(rate * seconds)
        events = [swipe(i, i % persons, 0) for i in range(1, count + 1)]
        started = time.monotonic()
        asyncio.run(publish_at_rate(rig.access, events, rate, rig.redaction()))
        published_s = time.monotonic() - started
        messages = rig.wait_messages(count + 1, timeout_s=120)
        drained_s = time.monotonic() - started
        deadline = time.monotonic() + 30
        while True:  # the outcome of the last window follows its submit_sm_resp
            submitted = [r for r in rig.outcomes() if r["outcome"] == "submitted"]
            if len(submitted) >= count + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ids = {e.event_id for e in events}
        latencies = sorted(r["at_ms"] - r["event_at_ms"] for r in submitted if r["event_id"] in ids)
        pairs = [(m["destination"], m["text"]) for m in messages]
        return {
            "rate_per_s": rate,
            "events": count,
            "persons": persons,
            "publish_s": round(published_s, 2),
            "all_submitted_after_s": round(drained_s, 2),
            "sms_received": len(messages) - 1,
            "submitted_outcomes": len(latencies),
            "duplicates": len(pairs) - len(set(pairs)),
            "latency_ms_p50": percentile(latencies, 0.50),
            "latency_ms_p99": percentile(latencies, 0.99),
            "latency_ms_max": latencies[-1] if latencies else 0,
        }
    finally:
        rig.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rate", type=float, default=1000.0, help="swipes a second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--persons", type=int, default=5000)
    parser.add_argument("--dir", type=Path, default=None, help="keep logs and data here")
    args = parser.parse_args(argv)
    base = args.dir or Path(tempfile.mkdtemp(prefix="medclear-sms-bench-"))
    result = bench(args.rate, args.seconds, args.persons, base)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
