"""The root of every error the reader agent raises (`ReaderAgentError`): the message is
for the person at the counter or the one setting up the terminal."""

from __future__ import annotations


class ReaderAgentError(Exception):
    """Raised by reader_agent/ only."""
