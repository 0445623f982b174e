"""The root of every error the simulated HSM raises (`HsmError`). Messages never carry a
PIN or key material."""

from __future__ import annotations


class HsmError(Exception):
    """Raised by hsm_sim/ only."""
