"""Client-side remedies for the Kafka-protocol broker this machine can run.

noida-db 0.2.3 answers an empty fetch at once instead of holding it for fetch.max.wait.ms,
so every idle consumer re-fetches in a tight loop: measured 1,400-1,700 fetch requests/s
and about half a core per idle consumer, with `fetch_max_wait_ms` and `fetch_min_bytes`
both ignored (tests/integration/test_broker_conformance.py shows it). medclear's
processes hold several consumers each, so on 2 cores the busy polling starved the
clearing path.

`install_idle_fetch_backoff` makes aiokafka's fetcher (which faust uses too) wait a
little after a fetch that brought no records: a bounded, client-side long poll. The wait
doubles with each further empty fetch, up to a cap, and falls back to the first wait as
soon as a fetch brings records. The decision path (worker, gateway, registry) keeps the cap
at the first wait, since its latency is the product; the downstream stream jobs, which
only need to keep up, back off to DOWNSTREAM_BACKOFF_MAX_MS. With a broker that honours
fetch.max.wait.ms (Apache Kafka) the back-off only follows fetches that already waited, so
it is harmless there; set MEDCLEAR_KAFKA_IDLE_FETCH_BACKOFF_MS=0 to switch it off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.consumer import fetcher

IDLE_FETCH_BACKOFF_MS_MAX = 100.0
DOWNSTREAM_BACKOFF_MAX_MS = 50.0  # stream jobs after the decision: an idle one polls ~20/s
_original = fetcher.Fetcher._proc_fetch_request
_installed_ms = 0.0
_EMPTIES = "_medclear_empty_fetches"  # consecutive empty fetches, kept on the Fetcher


def install_idle_fetch_backoff(backoff_ms: float, max_ms: float | None = None) -> None:
    """Wait `backoff_ms` after a fetch that returned no records, doubling with each further
    empty one up to `max_ms` (default: `backoff_ms`, a flat wait); process-wide."""
    global _installed_ms
    cap_ms = backoff_ms if max_ms is None else max(backoff_ms, max_ms)
    if not 0 <= backoff_ms <= cap_ms <= IDLE_FETCH_BACKOFF_MS_MAX:
        raise ValueError(f"idle fetch back-off must be 0..{IDLE_FETCH_BACKOFF_MS_MAX} ms")
    _installed_ms = backoff_ms
    if backoff_ms == 0:
        fetcher.Fetcher._proc_fetch_request = _original
        return
    first_s, cap_s = backoff_ms / 1000, cap_ms / 1000

    async def proc_fetch_request(self: Any, assignment: Any, node_id: Any, request: Any) -> Any:
        got_records = await _original(self, assignment, node_id, request)
        if got_records:
            setattr(self, _EMPTIES, 0)
            return got_records
        empties = getattr(self, _EMPTIES, 0)
        setattr(self, _EMPTIES, empties + 1)
        try:
            await asyncio.sleep(min(cap_s, first_s * 2 ** min(empties, 16)))
        except asyncio.CancelledError:
            # As aiokafka's own method does: cancellation means the consumer is closing
            # or the partition was unassigned; its caller expects a result, not the error.
            return False
        return got_records

    fetcher.Fetcher._proc_fetch_request = proc_fetch_request


def installed_backoff_ms() -> float:
    return _installed_ms


def quiet_client_loggers() -> None:
    """aiokafka's debug records cost 8% of a worker's time when a framework enables them."""
    for name in ("aiokafka", "kafka"):
        logging.getLogger(name).setLevel(logging.WARNING)
