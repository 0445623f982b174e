"""`medclear hsm ...`: the operator's console of the HSM (through its gRPC service).

Lists and makes keys by type, algorithm, KCV and version: never key material. A
terminal is provisioned with a PIN key and a MAC key, printed wrapped under a
key-encryption key (KEK) with their check values, as a key ceremony would hand them over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsm_sim.crypto import KeyAlgorithm
from hsm_sim.keystore import KeyType
from medclear.bench import hsm as hsm_bench
from medclear.infra import status
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel, pb_enum
from medclear.infra.settings import get_settings
from medclear.infra.stack_state import client_pki_dir, load_endpoints
from medclear.infra.terminals import provision_terminal_keys
from medclear.v1 import hsm_pb2, hsm_pb2_grpc

hsm_app = typer.Typer(
    help="Keys of the HSM (加密机): list, generate, rotate, provision "
    "terminals. Key material is never shown.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

AlgorithmOpt = Annotated[str, typer.Option(help="TDES | AES_128 | AES_256 | SM4")]


def _hsm() -> tuple[str, Path | None]:
    """The running stack's HSM and the PKI to reach it with."""
    settings = get_settings()
    return load_endpoints(settings).hsm, client_pki_dir(settings)


def _call(method: str, request: Any) -> Any:
    address, pki = _hsm()

    async def call() -> Any:
        async with aio_channel(address, Role.OPERATOR, pki) as channel:
            call_method = getattr(hsm_pb2_grpc.HsmServiceStub(channel), method)
            return await call_method(request, timeout=CALL_TIMEOUT_S)

    try:
        return asyncio.run(call())
    except grpc.RpcError as exc:
        err.print(f"[bold red]error:[/] hsm: {escape(status.describe(exc))}")
        raise typer.Exit(1) from exc


def _keys_table(keys: list[Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("key id", "version", "type", "algorithm", "KCV", "created"):
        table.add_column(column)
    for k in keys:
        table.add_row(
            k.key_id,
            str(k.version),
            KeyType(k.type).name,
            KeyAlgorithm(k.algorithm).name,
            k.kcv,
            k.created_at,
        )
    return table


@hsm_app.command("keys")
def keys() -> None:
    """Every key version in the HSM: id, version, type, algorithm, KCV."""
    reply = _call("ListKeys", hsm_pb2.ListKeysRequest())
    console.print(_keys_table(list(reply.keys), "HSM keys"))


@hsm_app.command("generate")
def generate(
    key_id: Annotated[str, typer.Argument(help="key id, e.g. pvk-2026")],
    key_type: Annotated[
        str, typer.Option("--type", help=", ".join(t.name for t in KeyType if t))
    ] = "KEY_ENCRYPTION_KEY",
    algorithm: AlgorithmOpt = "AES_256",
) -> None:
    """Generate a key inside the HSM. For an existing id this is a rotation: a new version
    becomes current and the old one verifies for the grace period."""
    info = _call(
        "GenerateKey",
        hsm_pb2.GenerateKeyRequest(
            key_id=key_id,
            type=pb_enum(KeyType[key_type.upper()]),
            algorithm=pb_enum(KeyAlgorithm[algorithm.upper()]),
        ),
    )
    console.print(_keys_table([info], "generated"))


@hsm_app.command("rotate")
def rotate(key_id: Annotated[str, typer.Argument(help="the key to rotate")]) -> None:
    """A new version of a key, same type and algorithm."""
    current = [k for k in _call("ListKeys", hsm_pb2.ListKeysRequest()).keys if k.key_id == key_id]
    if not current:
        err.print(f"[bold red]error:[/] no key {key_id}")
        raise typer.Exit(1)
    latest = max(current, key=lambda k: k.version)
    info = _call(
        "GenerateKey",
        hsm_pb2.GenerateKeyRequest(key_id=key_id, type=latest.type, algorithm=latest.algorithm),
    )
    console.print(_keys_table([info], f"rotated: version {latest.version} → {info.version}"))


@hsm_app.command("provision-terminal")
def provision_terminal(
    terminal: Annotated[str, typer.Argument(help="terminal id")],
    kek: Annotated[str, typer.Option(help="the terminal's key-encryption key id")],
    algorithm: AlgorithmOpt = "AES_128",
) -> None:
    """Make the terminal's PIN key (TPK) and MAC key (TAK) and print each wrapped under
    its KEK with its KCV, for loading into the terminal."""
    address, pki = _hsm()

    async def provision() -> dict[str, Any]:
        async with aio_channel(address, Role.OPERATOR, pki) as channel:
            return await provision_terminal_keys(
                hsm_pb2_grpc.HsmServiceStub(channel), terminal, kek, KeyAlgorithm[algorithm.upper()]
            )

    try:
        exported = asyncio.run(provision())
    except grpc.RpcError as exc:
        err.print(f"[bold red]error:[/] hsm: {escape(status.describe(exc))}")
        raise typer.Exit(1) from exc
    table = Table(title=f"terminal {terminal}: keys under KEK {kek}")
    for column in ("key", "id", "version", "wrapped under KEK (hex)", "KCV"):
        table.add_column(column)
    for name, out in exported.items():
        table.add_row(
            name.upper(), out.key.key_id, str(out.key.version), out.wrapped.hex().upper(), out.kcv
        )
    console.print(table)


@hsm_app.command("bench")
def bench(
    count: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="operations of each kind")
    ] = 3000,
    concurrency: Annotated[str, typer.Option(help="comma-separated calls in flight")] = "1,16",
) -> None:
    """PIN verifications/s and MAC verifications/s of the running HSM over gRPC, with
    p50/p99 per call, at each concurrency. Forms its own keys (bench-*); asserts nothing."""
    address, pki = _hsm()
    table = Table(title=f"HSM over gRPC ({address}), {count:,} calls per row")
    for column in ("operation", "in flight", "ops/s", "p50 ms", "p99 ms", "results"):
        table.add_column(column, justify="right")
    for level in (int(x) for x in concurrency.split(",")):
        for label, stats in asyncio.run(hsm_bench.run(address, count, level, pki)).items():
            results = ", ".join(f"{k}: {v}" for k, v in stats.results.items())
            table.add_row(
                label,
                str(level),
                f"{stats.rate_per_s:,.0f}",
                f"{stats.percentile(0.5):.2f}",
                f"{stats.percentile(0.99):.2f}",
                results,
            )
    console.print(table)
