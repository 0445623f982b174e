"""structlog set-up shared by every process: one JSON line per event on stderr."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(process: str, level: int = logging.INFO) -> structlog.stdlib.BoundLogger:
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    for name in ("aiokafka", "kafka"):  # their debug records cost a busy process ~8 %
        logging.getLogger(name).setLevel(logging.WARNING)
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(process=process)
    return logger
