"""docs/PERFORMANCE.md's generated sections: each benchmark command owns the text between
its two markers and replaces only that."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "PERFORMANCE.md"


def replace_section(doc: Path, begin: str, end: str, section: str, heading: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the text
    between the markers, or append it under `heading` when the markers are not there."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section + tail
    else:
        text = f"{text.rstrip()}\n\n## {heading}\n\n{section}"
    doc.write_text(text.rstrip() + "\n")
