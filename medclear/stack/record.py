"""The record of a running stack (``<state_dir>/stack.json``): what was started, where,
since when, and how each part is probed; the lock that lets one `up`, `down`, `restart`
or watcher pass change it at a time. Clients read the endpoints through
medclear.infra.stack_state; this module is the supervisor's side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medclear.infra.kafka_access import OPERATOR, KafkaAccess
from medclear.infra.stack_state import Endpoints, StackError
from medclear.stack.probes import http_probe, kafka_probe, metrics_probe, tcp_probe
from medclear.stack.process import Process, proc_cmdline
from medclear.stack.servers import clickhouse_probe

STATE_VERSION = 1


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None  # None: not started by us (an external server)
    address: str
    healthy: bool
    detail: str
    log: str = ""
    ready_s: float | None = None  # seconds from its start to ready, as recorded by `up`
    restarts: int = 0


# --------------------------------------------------------------------------------------
# the stack and its record


ProbeKind = Literal["kafka", "http", "metrics", "clickhouse", "tcp"]


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    target: str
    expect: str | None = None
    ssl_dir: str = ""  # a Kafka probe's certificates (the operator's); "": no TLS

    def check(self) -> str | None:
        if self.kind == "kafka":
            ssl_dir = Path(self.ssl_dir) if self.ssl_dir else None
            return kafka_probe(KafkaAccess(self.target, OPERATOR, ssl_dir))
        if self.kind == "metrics":
            return metrics_probe(self.target)
        if self.kind == "clickhouse":
            return clickhouse_probe(self.target)
        if self.kind == "tcp":
            return tcp_probe(self.target)
        return http_probe(self.target, self.expect)


@dataclass
class Component:
    name: str
    kind: str
    address: str
    probe: Probe
    proc: Process | None = None  # None: an external server we only probe
    data_dir: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    ready_s: float | None = None
    restarts: int = 0  # after it had exited (by the watcher, `medclear restart`, a drill)
    gave_up: bool = False  # the watcher stopped restarting it (medclear/stack/restarts.py)

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "address": self.address,
            "probe": asdict(self.probe),
            "process": self.proc.to_record() if self.proc is not None else None,
            "data_dir": self.data_dir,
            "ports": dict(self.ports),
            "ready_s": self.ready_s,
            "restarts": self.restarts,
            "gave_up": self.gave_up,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Component:
        probe = rec["probe"]
        return cls(
            name=str(rec["name"]),
            kind=str(rec["kind"]),
            address=str(rec["address"]),
            probe=Probe(
                kind=probe["kind"],
                target=probe["target"],
                expect=probe.get("expect"),
                ssl_dir=str(probe.get("ssl_dir") or ""),
            ),
            proc=Process.from_record(rec["process"]) if rec.get("process") else None,
            data_dir=rec.get("data_dir"),
            ports={str(k): int(v) for k, v in (rec.get("ports") or {}).items()},
            ready_s=rec.get("ready_s"),
            restarts=int(rec.get("restarts") or 0),
            gave_up=bool(rec.get("gave_up")),
        )


@dataclass
class State:
    path: Path
    components: list[Component] = field(default_factory=list)
    endpoints: Endpoints | None = None
    complete: bool = False
    created_at: float = field(default_factory=time.time)
    ready_s: float | None = None
    settings_env: dict[str, str] = field(default_factory=dict)  # MEDCLEAR_* of `up`, no secrets

    def save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "complete": self.complete,
            "settings_env": self.settings_env,
            "created_at": self.created_at,
            "ready_s": self.ready_s,
            "endpoints": asdict(self.endpoints) if self.endpoints is not None else None,
            "components": [c.to_record() for c in self.components],
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StackError(f"cannot read {path}: {exc}") from exc
        endpoints = data.get("endpoints")
        return cls(
            path=path,
            components=[Component.from_record(c) for c in data.get("components", [])],
            endpoints=Endpoints(**endpoints) if endpoints else None,
            complete=bool(data.get("complete")),
            created_at=float(data.get("created_at") or 0.0),
            ready_s=data.get("ready_s"),
            settings_env=dict(data.get("settings_env") or {}),
        )


@contextlib.contextmanager
def locked(state_dir: Path, timeout_s: float = 5.0) -> Iterator[None]:
    """One `up`/`down` at a time per state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"another `medclear up/down` holds {state_dir / '.lock'}"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def component_status(comp: Component) -> ComponentStatus:
    log = str(comp.proc.log) if comp.proc is not None else ""
    pid = comp.proc.pid if comp.proc is not None else None
    if comp.proc is not None and not comp.proc.alive():
        if comp.proc.pid is not None and proc_cmdline(comp.proc.pid) is not None:
            detail = f"pid {comp.proc.pid} now belongs to another program"
        else:
            detail = "process not running"
        if comp.gave_up:
            detail += f"; not restarted again after {comp.restarts} restarts"
        return ComponentStatus(
            comp.name, pid, comp.address, False, detail, log, comp.ready_s, comp.restarts
        )
    problem = comp.probe.check()
    return ComponentStatus(
        comp.name,
        pid,
        comp.address,
        problem is None,
        "ready" if problem is None else problem,
        log,
        comp.ready_s,
        comp.restarts,
    )
