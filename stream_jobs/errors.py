"""The root of every error the stream jobs raise (`StreamJobError`)."""

from __future__ import annotations


class StreamJobError(Exception):
    """Raised by stream_jobs/ only; the message names what to fix."""
