"""`medclear hsm ...`: the operator's console of the HSM (through its gRPC service).

Lists and makes keys by type, algorithm, KCV and version: never key material. A
terminal is provisioned with a PIN key and a MAC key, printed wrapped under a
key-encryption key (KEK) with their check values, as a key ceremony would hand them over.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.table import Table

from hsm_sim.crypto import KeyAlgorithm
from hsm_sim.keystore import KeyType
from medclear.rpc import pb_enum
from medclear.v1 import hsm_pb2, hsm_pb2_grpc

hsm_app = typer.Typer(
    help="Keys of the HSM (加密机): list, generate, rotate, provision "
    "terminals. Key material is never shown.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

AlgorithmOpt = Annotated[str, typer.Option(help="TDES | AES_128 | AES_256 | SM4")]


def _call(method: str, request: Any) -> Any:
    from medclear import stack
    from medclear.settings import get_settings

    try:
        address = stack.load_endpoints(get_settings()).hsm
    except stack.StackError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc

    async def call() -> Any:
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(hsm_pb2_grpc.HsmServiceStub(channel), method)(request, timeout=10)

    try:
        return asyncio.run(call())
    except grpc.RpcError as exc:
        err.print(f"[bold red]error:[/] hsm: {exc.code().name} {exc.details()}")
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
    table = Table(title=f"terminal {terminal}: keys under KEK {kek}")
    for column in ("key", "id", "version", "wrapped under KEK (hex)", "KCV"):
        table.add_column(column)
    for label, key_type in (("TPK", KeyType.TERMINAL_PIN_KEY), ("TAK", KeyType.TERMINAL_MAC_KEY)):
        key_id = f"{label.lower()}-{terminal}"
        _call(
            "GenerateKey",
            hsm_pb2.GenerateKeyRequest(
                key_id=key_id,
                type=pb_enum(key_type),
                algorithm=pb_enum(KeyAlgorithm[algorithm.upper()]),
            ),
        )
        exported = _call(
            "ExportKey",
            hsm_pb2.ExportKeyRequest(
                key=hsm_pb2.KeyRef(key_id=key_id), kek=hsm_pb2.KeyRef(key_id=kek)
            ),
        )
        table.add_row(
            label, key_id, str(exported.key.version), exported.wrapped.hex().upper(), exported.kcv
        )
    console.print(table)
