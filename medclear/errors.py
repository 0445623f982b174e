"""The root of every error the application package raises (`MedclearError`): the
infrastructure, the stream runtime, the stack, the simulation, drills and benches. The
CLI turns it into a one-line message and exit status 1 (medclear/infra/exits.py)."""

from __future__ import annotations


class MedclearError(Exception):
    """Raised by medclear/ only; the message names what failed and what to do."""
