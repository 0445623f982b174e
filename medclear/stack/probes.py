"""Waiting for a server to be ready: Kafka metadata, HTTP, /metrics READY, TCP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiokafka import AIOKafkaClient

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.stack_state import (
    StackError,
)
from medclear.stack.process import (
    HOST,
    Process,
)

READY_LINE = "medclear_ready 1.0"

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------
# waiting


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """aiokafka logs every refused connection at ERROR; probing is expected to fail."""
    logger = logging.getLogger("aiokafka")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]") or HOST, int(port)


def _tcp_open(address: str, timeout: float = 0.5) -> bool:
    try:
        host, port = _split_hostport(address)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


async def _kafka_metadata(kafka: KafkaAccess, timeout_s: float) -> int:
    client = AIOKafkaClient(
        **kafka.options(),
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
        retry_backoff_ms=50,
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        metadata = await asyncio.wait_for(client.fetch_all_metadata(), timeout_s)
        return len(metadata.brokers())
    finally:
        await client.close()


def kafka_probe(kafka: KafkaAccess, timeout_s: float = 3.0, brokers_min: int = 1) -> str | None:
    """None if a metadata request gets an answer listing at least `brokers_min` brokers."""
    hosts = [h.strip() for h in kafka.bootstrap.split(",") if h.strip()]
    if not any(_tcp_open(h) for h in hosts):
        return f"nothing accepts connections on {kafka.bootstrap}"
    try:
        with _quiet_aiokafka():
            brokers = run_sync(_kafka_metadata(kafka, timeout_s))
    except Exception as exc:  # any failure here means "not ready yet"
        return f"metadata request failed: {type(exc).__name__}: {exc}"
    if brokers < brokers_min:
        return f"metadata lists {brokers} of {brokers_min} brokers"
    return None


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    with _NO_PROXY.open(url, timeout=timeout_s) as resp:
        return int(resp.status), resp.read(1 << 20).decode("utf-8", "replace")


def tcp_probe(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return None
    except (OSError, ValueError) as exc:
        return f"connect {address}: {exc}"


def _fetch(url: str) -> tuple[int, str] | str:
    """(status, body), or what went wrong as a probe's answer."""
    try:
        return http_get(url)
    except urllib.error.HTTPError as exc:
        return f"GET {url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"GET {url}: {exc}"


def http_probe(url: str, expect: str | None = None) -> str | None:
    fetched = _fetch(url)
    if isinstance(fetched, str):
        return fetched
    code, body = fetched
    if code != 200:
        return f"GET {url}: HTTP {code}"
    if expect is not None and expect not in body:
        return f"GET {url}: {expect!r} not in {body[:80]!r}"
    return None


def metrics_probe(url: str) -> str | None:
    fetched = _fetch(url)
    if isinstance(fetched, str):
        return fetched
    code, body = fetched
    if code == 200 and any(line.startswith(READY_LINE) for line in body.splitlines()):
        return None
    ready = [ln for ln in body.splitlines() if ln.startswith("medclear_ready")]
    return f"GET {url}: {ready[0] if ready else 'no medclear_ready metric yet'}"


def wait_until(
    what: str, probe: Callable[[], str | None], timeout_s: float, proc: Process | None = None
) -> float:
    """Poll `probe` until it returns None; fail early if `proc` exits. Returns seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    delay = 0.02
    last = "not probed yet"
    while True:
        if proc is not None and not proc.alive():
            code = proc.exit_code()
            how = f"with code {code}" if code is not None else ""
            raise StackError(
                f"{proc.name} exited {how} before it was ready ({last})".replace("  ", " "),
                proc.name,
                proc.log_tail(),
            )
        result = probe()
        if result is None:
            return time.monotonic() - t0
        last = result
        if time.monotonic() >= deadline:
            name = proc.name if proc is not None else what
            raise StackError(
                f"{name} not ready after {timeout_s:g} s: {last}",
                name,
                proc.log_tail() if proc is not None else "",
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def wait_kafka_ready(
    kafka: KafkaAccess, timeout_s: float, *, proc: Process | None = None, brokers_min: int = 1
) -> None:
    """Wait until a real metadata round trip (aiokafka) succeeds against the servers of
    `kafka` and lists at least `brokers_min` brokers.

    With `proc`, fail at once (with its log tail) if that process exits meanwhile.
    """
    wait_until(
        f"kafka at {kafka.bootstrap}",
        lambda: kafka_probe(kafka, brokers_min=brokers_min),
        timeout_s,
        proc,
    )


def wait_http_ok(
    url: str, timeout_s: float, expect: str | None = None, *, proc: Process | None = None
) -> None:
    """Wait until GET `url` answers 200 (and its body contains `expect`, if given).

    With `proc`, fail at once (with its log tail) if that process exits meanwhile.
    """
    wait_until(url, lambda: http_probe(url, expect), timeout_s, proc)
