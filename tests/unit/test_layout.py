"""The shape of the house (docs/ARCHITECTURE.md, "Layout"): imports point one way, the pure
core imports nothing of the application, and the HSM and the reader agent load no Kafka
client. Read from the source (every import, function-local ones included), or in a fresh
interpreter where what a process loads is the question."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = (
    "clearing",
    "pos_gateway",
    "stream_runtime",
    "stream_jobs",
    "card_registry",
    "hsm_sim",
    "reader_agent",
    "monitoring",
    "medclear",
)
GENERATED = ("medclear/v1/",)
PURE_LIBRARIES = frozenset({"cryptography", "chinese_calendar", "orjson"})  # pinned, no I/O
KAFKA_CLIENTS = ("aiokafka", "kafka", "faust")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            relative = path.relative_to(REPO).as_posix()
            if relative.startswith(GENERATED):
                continue
            name = relative.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            found[name] = path
    return found


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """Every module `path` imports, at any depth of the file (function-local too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from package import module` names a module
                both = f"{node.module}.{alias.name}"
                yield both if both in known else node.module


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        name: {m for m in imported(path, known) if m in known and m != name}
        for name, path in found.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_pure_core_imports_only_itself_the_standard_library_and_pure_libraries() -> None:
    found = modules()
    outside: dict[str, set[str]] = {}
    for name, path in found.items():
        if not name.startswith("clearing"):
            continue
        for module in imported(path, set(found)):
            top = module.split(".")[0]
            if top == "clearing" or top in sys.stdlib_module_names or top in PURE_LIBRARIES:
                continue
            outside.setdefault(name, set()).add(module)
    assert outside == {}


# The serving path and the tools (docs/ARCHITECTURE.md, "Layout"): a newcomer reads the
# first without the second.
SERVING = (
    "clearing",
    "pos_gateway",
    "card_registry",
    "stream_runtime",
    "stream_jobs",
    "hsm_sim",
    "reader_agent",
    "monitoring",
    "medclear.infra",
    "medclear.errors",
)
TOOLS = ("medclear.cli", "medclear.stack", "medclear.sim", "medclear.drills", "medclear.bench")


def test_the_serving_path_imports_none_of_the_tools() -> None:
    known = set(modules())
    found = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if name.startswith(SERVING)
        for target in imported(path, known)
        if target.startswith(TOOLS)
    ]
    assert found == []


def test_the_hsm_and_the_reader_agent_load_no_kafka_client() -> None:
    """What `medclear up` runs as the HSM (medclear.cli.serve + hsm_sim.service) and what
    a POS PC runs as the agent (`python -m medclear.cli.agent`), in a fresh interpreter."""
    probe = (
        "import sys, importlib\n"
        "for name in sys.argv[1:]: importlib.import_module(name)\n"
        f"print(sorted({{m for m in sys.modules if m.split('.')[0] in {KAFKA_CLIENTS!r}}}))\n"
    )
    for process in (
        ["medclear.cli.serve", "hsm_sim.service", "hsm_sim.keystore"],
        ["medclear.cli.agent", "reader_agent.agent"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, *process],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.strip() == "[]", (process, done.stdout, done.stderr[-2000:])


FILE_LINES_MAX = 800
FUNCTION_LINES_MAX = 70  # from `def` to its last line, decorators excluded
ROOT_ERRORS = {
    "clearing": "clearing.errors:ClearingError",
    "stream_jobs": "stream_jobs.errors:StreamJobError",
    "hsm_sim": "hsm_sim.errors:HsmError",
    "reader_agent": "reader_agent.errors:ReaderAgentError",
    "medclear": "medclear.errors:MedclearError",
    "pos_gateway": "medclear.errors:MedclearError",  # the serving packages share the root
    "stream_runtime": "medclear.errors:MedclearError",
}


def over_limits(path: Path) -> list[str]:
    """The file if it is over FILE_LINES_MAX lines, and each function over
    FUNCTION_LINES_MAX (from `def` to its last line, decorators excluded)."""
    source = path.read_text()
    found = (
        [f"{path.name}: {source.count(chr(10))} lines"]
        if source.count("\n") > FILE_LINES_MAX
        else []
    )
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > FUNCTION_LINES_MAX:
                found.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_file_and_no_function_is_over_the_limits() -> None:
    """docs/ARCHITECTURE.md, "Layout": no exception is listed there, so none here."""
    assert [problem for path in modules().values() for problem in over_limits(path)] == []


def test_the_size_check_sees_a_long_function_and_a_long_file(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES_MAX))
    (tmp_path / "ok.py").write_text(f"def short():\n{body[: body.rindex(chr(10))]}\n")
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n" + "y = 1\n" * FILE_LINES_MAX)
    assert over_limits(tmp_path / "ok.py") == []
    assert over_limits(tmp_path / "long.py") == [
        f"long.py: {FILE_LINES_MAX + 71} lines",
        "long.py:1 long: 71 lines",
    ]


def test_every_error_a_package_defines_derives_from_its_root() -> None:
    """One root exception per package, so a caller can catch everything one package raises
    (card_registry and monitoring define none)."""
    strays: list[str] = []
    for name in sorted(modules()):
        package = name.split(".")[0]
        if package not in ROOT_ERRORS or name.endswith("__main__"):  # runs when imported
            continue
        module = importlib.import_module(name)
        root_module, root_name = ROOT_ERRORS[package].split(":")
        root = getattr(importlib.import_module(root_module), root_name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not issubclass(value, root)
            ):
                strays.append(f"{name}.{value.__name__}")
    assert strays == []
