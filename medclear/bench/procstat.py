"""What /proc says about the stack's processes and this machine: a process's RSS, peak
RSS and CPU seconds, the bytes of a directory tree, a one-line description of the
machine for the generated doc sections, and byte counts for people (`human`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def proc_memory(pid: int | None) -> tuple[int, int]:
    """(RSS, peak RSS) of a process in bytes, from /proc; (0, 0) if it is gone."""
    if pid is None:
        return 0, 0
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values["VmRSS"], values["VmHWM"]


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used, from /proc; 0 if it is gone. Unlike
    wall time it hardly depends on what else the shared machine runs."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


STAT_BLOCK_BYTES = 512  # st_blocks counts 512-byte units (POSIX)


def tree_bytes(path: Path) -> int:
    """Bytes the files under a directory take on disk (what the broker or RocksDB keep
    there), as `du` counts them: allocated blocks, not lengths. Kafka preallocates each
    segment's offset and time indexes (10 MiB each, sparse): their lengths would count
    20 MiB for every partition, however few records it holds."""
    if not path.exists():
        return 0
    total = 0
    for child in path.rglob("*"):
        try:
            if child.is_file():
                total += child.stat().st_blocks * STAT_BLOCK_BYTES
        except OSError:
            continue
    return total


def human(n: float) -> str:
    """A byte count for people: B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"


def describe_machine() -> str:
    """vCPUs, CPU model, memory, Python and the load average now: the "Machine:" line of
    the generated sections of docs/PERFORMANCE.md."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} vCPU {cpu}{memory}, Python {platform.python_version()}, "
        f"load average {load:.1f} at the start"
    )
