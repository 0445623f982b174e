"""The Prometheus metrics medclear's processes export, defined once.

Names follow Prometheus conventions: a `medclear_` prefix, units last, `_total` on
counters. Each process calls `serve(port)` to expose /metrics.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

BUILD = Info("medclear_build", "The running medclear: version, Python and the process's role")
READY = Gauge("medclear_ready", "1 once this process can serve (partitions assigned, caught up)")
CARD_INDEX_FULL = Gauge(
    "medclear_card_index_full", "1 once the card index holds its bound of cards and takes no more"
)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

DECISIONS = Counter(
    "medclear_decisions_total",
    "Commands decided by the clearing worker, by command kind and result code",
    ["command", "result"],
)
SWIPES = Counter(
    "medclear_swipes_total",
    "Swipe (Authorize) decisions by result code and institution type",
    ["result", "institution_type"],
)
INSTITUTION_SWIPES = Counter(
    "medclear_institution_swipes_total",
    'Swipe decisions per designated institution ("unknown" for any other id): approved or '
    "declined. Bounded: the designated institutions × 2; the result codes are in "
    "medclear_swipes_total",
    ["institution", "outcome"],
)
INSTITUTION_PAID_FEN = Counter(
    "medclear_institution_paid_fen_total",
    "Fen paid from personal accounts at each institution (approved swipes)",
    ["institution"],
)
INSTITUTION_RETURNED_FEN = Counter(
    "medclear_institution_returned_fen_total",
    "Fen returned to personal accounts by reversals and refunds, per institution",
    ["institution"],
)
DECIDE_SECONDS = Histogram(
    "medclear_worker_decide_seconds",
    "Worker time from taking a command to handing its reply to the producer",
    buckets=LATENCY_BUCKETS_S,
)
WORKER_STEP_SECONDS = Histogram(
    "medclear_worker_step_seconds",
    "Worker time per step of one command: decide (decode, core, encode), events (until the "
    "broker has them), state (table write), reply (handing it to the producer)",
    ["step"],
    buckets=LATENCY_BUCKETS_S,
)
WORKER_BATCH_SIZE = Histogram(
    "medclear_worker_batch_commands",
    "Commands the worker decided together in one micro-batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INGRESS_LAG_SECONDS = Histogram(
    "medclear_worker_ingress_lag_seconds",
    "From the ingress stamp of a command (gateway clock) to the worker taking it",
    buckets=LATENCY_BUCKETS_S,
)
GATEWAY_SECONDS = Histogram(
    "medclear_gateway_request_seconds",
    "gRPC request time at the POS gateway / registry, end to end, by method",
    ["method"],
    buckets=LATENCY_BUCKETS_S,
)
GATEWAY_RESULTS = Counter(
    "medclear_gateway_results_total",
    "Replies given at the gRPC boundary, by method and result code",
    ["method", "result"],
)
HSM_SECONDS = Histogram(
    "medclear_hsm_operation_seconds",
    "Time inside the HSM per operation (PIN verify, MAC verify, ...)",
    ["operation"],
    buckets=LATENCY_BUCKETS_S,
)
HSM_RESULTS = Counter(
    "medclear_hsm_results_total", "HSM operations by result code", ["operation", "result"]
)
HSM_UNAVAILABLE = Counter(
    "medclear_worker_hsm_unavailable_total",
    "PIN checks (worker or gateway) the HSM did not answer, each ask counted",
)
PRE_LOSS_EXPIRIES = Counter(
    "medclear_pre_loss_expiries_sent_total", "Expiry commands sent by the pre-loss timer"
)
PRE_LOSSES_PENDING = Gauge(
    "medclear_pre_losses_pending", "Pre-loss reports the timer job is waiting on"
)
UNDECODABLE = Counter(
    "medclear_undecodable_records_total", "Kafka records that could not be decoded", ["topic"]
)
STREAM_BATCH_RECORDS = Histogram(
    "medclear_stream_batch_records",
    "Input records a stream job handled together in one batch (stream_runtime)",
    ["stream_job"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
STREAM_STEP_SECONDS = Histogram(
    "medclear_stream_step_seconds",
    "Time per step of a stream job's batch: decide (the handler), outputs (until the broker "
    "has them), state (changelog acknowledged and store written), replies, commit",
    ["stream_job", "step"],
    buckets=LATENCY_BUCKETS_S,
)
STREAM_RESTORED_RECORDS = Counter(
    "medclear_stream_restored_records_total",
    "Changelog records applied to a stream job's stores while restoring them",
    ["stream_job", "table"],
)
STREAM_RESTORE_REMAINING = Gauge(
    "medclear_stream_restore_remaining_records",
    "Changelog records a stream job still has to read before it handles its input",
    ["stream_job", "table"],
)
STREAM_REBALANCES = Counter(
    "medclear_stream_rebalances_total",
    "Partitions assigned to or revoked from a stream job, by rebalance",
    ["stream_job", "kind"],
)
STREAM_CHANGELOG_BEHIND_STORE = Counter(
    "medclear_stream_changelog_behind_store_records_total",
    "Changelog records a store had applied that the broker no longer had when it restarted "
    "(an acknowledged write lost by the broker); the store was kept",
    ["topic"],
)
CONSUMER_LAG = Gauge(
    "medclear_consumer_lag_records",
    "Records on the broker a stream job has not read yet",
    ["stream_job", "topic", "partition"],
)
CARD_BLOCK_TO_REFUSAL_SECONDS = Histogram(
    "medclear_card_block_to_first_refusal_seconds",
    "From a card's loss report / freeze / lock to the first swipe of it refused",
    buckets=(0.01, 0.1, 1, 10, 60, 600, 3600, 86400),
)
ABNORMAL_ALERTS = Counter(
    "medclear_abnormal_alerts_total", "Abnormal transactions flagged (异常交易)", ["kind"]
)


def serve(port: int, host: str = "127.0.0.1", role: str = "") -> None:
    """/metrics on `port`, with `medclear_build_info{version, python, role}` = 1."""
    try:
        medclear_version = version("medclear")
    except PackageNotFoundError:  # run from a source tree that was never installed
        medclear_version = "unknown"
    BUILD.info({"version": medclear_version, "python": platform.python_version(), "role": role})
    start_http_server(port, addr=host)


# ClickHouse sink (stream_jobs/clickhouse_sink.py)
CLICKHOUSE_SINK_ROWS = Counter(
    "medclear_clickhouse_sink_rows_total",
    "Event rows inserted into ClickHouse (a redelivered event is inserted, and counted, again)",
)
CLICKHOUSE_SINK_BATCHES = Counter(
    "medclear_clickhouse_sink_batches_total", "Batches inserted into ClickHouse"
)
CLICKHOUSE_SINK_INSERT_SECONDS = Histogram(
    "medclear_clickhouse_sink_insert_seconds",
    "Time of one successful batch insert",
    buckets=LATENCY_BUCKETS_S,
)
CLICKHOUSE_SINK_RETRIES = Counter(
    "medclear_clickhouse_sink_retries_total", "Failed batch inserts, retried after a back-off"
)
CLICKHOUSE_SINK_SKIPPED = Counter(
    "medclear_clickhouse_sink_skipped_total",
    "Records of the events topic not written (undecodable, or not an event)",
    ["reason"],
)
CLICKHOUSE_SINK_LAG_SECONDS = Gauge(
    "medclear_clickhouse_sink_lag_seconds",
    "Age of the oldest event the sink has read but ClickHouse does not have yet (0: caught up)",
)
CLICKHOUSE_SINK_LAG_RECORDS = Gauge(
    "medclear_clickhouse_sink_lag_records",
    "Records of the events topic not yet in ClickHouse (end offsets minus inserted)",
)


# Consumption SMS (stream_jobs/sms.py)
SMS_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
SMS_SENT = Counter(
    "medclear_sms_sent_total", "SMS the SMSC accepted (every part answered OK), by kind", ["kind"]
)
SMS_FAILED = Counter(
    "medclear_sms_failed_total",
    "SMS the SMSC refused for good (not retried), by SMPP command_status",
    ["status"],
)
SMS_RETRIES = Counter(
    "medclear_sms_retries_total",
    "Submit attempts repeated after the SMSC was unreachable, dropped the link or was busy",
)
SMS_SUPPRESSED = Counter(
    "medclear_sms_suppressed_total",
    "Events that would send an SMS but did not (no_phone, stale, rate_limited, duplicate)",
    ["reason"],
)
SMS_RESENT_UNCERTAIN = Counter(
    "medclear_sms_resent_uncertain_total",
    "SMS in flight when the job stopped, sent again on restart (each may be a duplicate)",
)
SMS_SUBMIT_SECONDS = Histogram(
    "medclear_sms_submit_seconds",
    "From the event's at_ms (ingress stamp) to the SMSC's submit_sm_resp for its last part",
    buckets=SMS_SECONDS_BUCKETS,
)
SMS_RECEIPTS = Counter(
    "medclear_sms_receipts_total", "Delivery receipts from the SMSC, by stat", ["stat"]
)
SMSC_BOUND = Gauge("medclear_smsc_bound", "1 while the sms job holds a bound SMPP session")
SETTLEMENT_EVENTS = Counter(
    "medclear_settlement_events_total",
    "Events read by the settlement job, by kind and outcome (applied, late: into an "
    "adjustment line of the next open day, redelivered: already applied, no effect)",
    ["kind", "outcome"],
)
SETTLEMENT_DAYS_CLOSED = Counter(
    "medclear_settlement_days_closed_total", "Institution-days closed at the cut-off"
)
SETTLEMENT_OPEN_INSTITUTIONS = Gauge(
    "medclear_settlement_open_institutions", "Institutions with at least one open day"
)

# The stack's watcher (medclear/stack/watch.py)
COMPONENT_UP = Gauge(
    "medclear_component_up", "1 while a component the watcher follows is running", ["component"]
)
COMPONENT_RESTARTS = Counter(
    "medclear_component_restarts_total",
    "Restarts by the watcher of a component that exited on its own",
    ["component"],
)
COMPONENT_GAVE_UP = Gauge(
    "medclear_component_gave_up",
    "1 once the watcher stopped restarting a component (too many restarts in a window)",
    ["component"],
)
