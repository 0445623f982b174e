"""The Prometheus metrics medclear's processes export, defined once.

Names follow Prometheus conventions: a `medclear_` prefix, units last, `_total` on
counters. Each process calls `serve(port)` to expose /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

READY = Gauge("medclear_ready", "1 once this process can serve (partitions assigned, caught up)")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

DECISIONS = Counter(
    "medclear_decisions_total",
    "Commands decided by the clearing worker, by command kind and result code",
    ["command", "result"],
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
    "PIN checks the worker had to retry because the HSM did not answer",
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
CONSUMER_LAG = Gauge(
    "medclear_consumer_lag_records",
    "Records on the broker a stream job has not read yet",
    ["job", "topic", "partition"],
)
CARD_BLOCK_TO_REFUSAL_SECONDS = Histogram(
    "medclear_card_block_to_first_refusal_seconds",
    "From a card's loss report / freeze / lock to the first swipe of it refused",
    buckets=(0.01, 0.1, 1, 10, 60, 600, 3600, 86400),
)
ABNORMAL_ALERTS = Counter(
    "medclear_abnormal_alerts_total", "Abnormal transactions flagged (异常交易)", ["kind"]
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    start_http_server(port, addr=host)
