"""A small job on the stream runtime, for its tests: a ledger.

Input `<prefix>.in` (key: an account, value: an amount in fen as text) → table `balances`
(account → JSON {"balance", "last"}: the balance and the offset of the last input applied
to it, which makes a redelivered input a no-op) → output `<prefix>.out` (key
"<partition>:<offset>" of the input, value "<account>:<balance after>") → reply
`<prefix>.replies` (the same). Run as a process for the kill -9 tests:

    python -m tests.integration.stream_job ACCESS PREFIX DATA_DIR MEMBER [IN_FLIGHT]

(ACCESS: the broker and identity, tests.integration.kafka_read.access_argument)
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from medclear.infra.kafka_access import KafkaAccess
from stream_runtime.batch import Batch
from stream_runtime.runtime import Runtime
from tests.integration.kafka_read import access_from

TABLE = "balances"


def ledger(prefix: str) -> object:
    async def handle(batch: Batch) -> None:
        for record in batch.records:
            account = record.key
            raw = batch.get(TABLE, record.partition, account)
            state = json.loads(raw) if raw else {"balance": 0, "last": -1}
            if record.offset <= state["last"]:
                continue  # applied before a crash, its commit lost: nothing again
            state = {"balance": state["balance"] + int(record.value), "last": record.offset}
            batch.put(TABLE, record.partition, account, json.dumps(state).encode())
            out_key = f"{record.partition}:{record.offset}".encode()
            value = f"{account.decode()}:{state['balance']}".encode()
            batch.send(f"{prefix}.out", value, key=out_key)
            batch.reply(f"{prefix}.replies", value, key=out_key)

    return handle


def runtime(
    kafka: KafkaAccess,
    prefix: str,
    data_dir: Path,
    member: str,
    in_flight: int = 2,
    batch_max: int = 64,
) -> Runtime:
    return Runtime(
        job=f"{prefix}-ledger",
        member_id=member,
        kafka=kafka,
        topic=f"{prefix}.in",
        handler=ledger(prefix),  # type: ignore[arg-type]
        data_dir=data_dir,
        tables=[TABLE],
        in_flight_max=in_flight,
        batch_max=batch_max,
    )


def main(argv: list[str]) -> None:
    access, prefix, data_dir, member = argv[:4]
    in_flight = int(argv[4]) if len(argv) > 4 else 2
    job = runtime(access_from(access), prefix, Path(data_dir), member, in_flight)

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        await job.run(stopping)

    asyncio.run(run())


if __name__ == "__main__":
    main(sys.argv[1:])
