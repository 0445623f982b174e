"""One way to build medclear's faust apps: the settings every stream job shares."""

from __future__ import annotations

from typing import Any

import faust

from medclear.settings import Settings
from monitoring import metrics


def make_app(
    app_id: str, member_id: str, settings: Settings, bootstrap: str, partitions: int, **extra: Any
) -> faust.App:
    """A faust app with raw bytes in and out (records are clearing.codec's), acks=all,
    its data under the state directory, and static group membership: a restarted
    process takes its partitions back at once. noida-db never evicts a member killed
    with -9, so a dynamic member would wait forever (docs/ARCHITECTURE.md)."""
    datadir = settings.state_dir.resolve() / "data" / member_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        consumer_group_instance_id=member_id,
        datadir=str(datadir),
        broker=f"kafka://{bootstrap}",
        store="memory://",
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
