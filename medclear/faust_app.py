"""One way to build medclear's faust apps: the settings every stream job shares."""

from __future__ import annotations

from typing import Any

import faust

from clearing import codec
from medclear import topics
from medclear.settings import Settings
from monitoring import metrics


def make_app(
    app_id: str, member_id: str, settings: Settings, bootstrap: str, partitions: int, **extra: Any
) -> faust.App:
    """A faust app with raw bytes in and out (records are clearing.codec's), acks=all,
    its data under the state directory, and static group membership: a restarted
    process takes its partitions back at once. noida-db never evicts a member killed
    with -9, so a dynamic member would wait forever (docs/ARCHITECTURE.md)."""
    store = settings.table_store if app_id in TABLE_STORE_APPS else "memory"
    if store == "rocksdb":
        _bound_rocksdb_memory()
    datadir = settings.state_dir.resolve() / "data" / member_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        consumer_group_instance_id=member_id,
        datadir=str(datadir),
        broker=f"kafka://{bootstrap}",
        store=f"{store}://",  # rocksdb: one rocksdict DB per table partition
        topic_partitions=partitions,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        **extra,
    )
    _export_lag(app, app_id)
    return app


def run_worker(app: faust.App) -> None:
    """Run `app` in the foreground until SIGTERM, logging warnings and up.

    faust's worker, asked for WARNING, still sets the root logger to DEBUG and hangs a
    terminal spinner on it that turns once per record: every aiokafka debug line (one per
    fetch request) is then built and handled, and the spinner stays attached after start-up.
    py-spy of a recovering clearing worker: ~30 % of its main thread and ~70 % of the
    consumer thread's busy time in that logging (docs/PERFORMANCE.md). No spinner: the root
    logger keeps WARNING and debug records are dropped where they are made."""
    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()


# The apps MEDCLEAR_TABLE_STORE applies to: the clearing worker (its persons table is the
# state that must fit, issue 7). The others keep memory: faust's RocksDB store asserts a
# current event on every write, and the sms job writes its table after a batch, outside one.
TABLE_STORE_APPS = frozenset({"medclear-clearing"})

# faust opens one RocksDB per table partition with 64 MiB x 3 write buffers and a 2 GiB
# block cache each: 6 partitions could hold ~13 GiB. These bound a worker's store to
# ~0.6 GiB (docs/ARCHITECTURE.md decision 5); the files hold the rest.
ROCKSDB_WRITE_BUFFER_BYTES = 16 * 1024**2
ROCKSDB_WRITE_BUFFERS = 2
ROCKSDB_BLOCK_CACHE_BYTES = 64 * 1024**2


def _bound_rocksdb_memory() -> None:
    from faust.stores.rocksdb import RocksDBOptions

    RocksDBOptions.write_buffer_size = ROCKSDB_WRITE_BUFFER_BYTES
    RocksDBOptions.max_write_buffer_number = ROCKSDB_WRITE_BUFFERS
    RocksDBOptions.block_cache_size = ROCKSDB_BLOCK_CACHE_BYTES


READY_INTERVAL_S = 0.5


def export_readiness(app: faust.App) -> None:
    """`medclear_ready` 1 once the app's tables are recovered and no rebalance is under way
    (what `medclear up` and the restarts wait for)."""

    @app.timer(READY_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def readiness() -> None:
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        metrics.READY.set(1 if recovered and not app.rebalancing else 0)


LAG_INTERVAL_S = 2.0


def _export_lag(app: faust.App, job: str) -> None:
    """`medclear_consumer_lag_records{stream_job,topic,partition}`: records on the broker that
    this job has not yet read, per assigned partition (high-water mark − position)."""

    @app.timer(LAG_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def consumer_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            try:
                position = await consumer.position(tp)
                highwater = consumer.highwater(tp)
            except Exception:  # a partition mid-rebalance: the next tick
                continue
            if position is None or highwater is None:
                continue
            metrics.CONSUMER_LAG.labels(job, tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )


def events_topic(app: faust.App, settings: Settings) -> faust.TopicT:
    """`medclear.events` as the stream jobs read it: raw bytes, not created by faust."""
    return app.topic(topics.EVENTS.name, key_type=bytes, value_type=bytes,
                     partitions=settings.event_partitions, internal=False)  # fmt: skip


def decode_event(raw: bytes | None) -> Any | None:
    """A record of `medclear.events`, or None — counted in
    `medclear_undecodable_records_total` — when it does not decode."""
    try:
        return codec.decode(raw or b"")
    except codec.CodecError:
        metrics.UNDECODABLE.labels(topics.EVENTS.name).inc()
        return None
