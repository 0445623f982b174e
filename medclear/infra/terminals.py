"""Simulated terminals' secure storage and the POS side of terminal security.

A real terminal holds its PIN key (TPK) and MAC key (TAK) in a secure element, loaded
from under a key-encryption key at provisioning. The simulated fleet (CLI, tests,
traffic) keeps them in one keyring file readable by its owner only
(`<state_dir>/terminals/keyring.json`), which stands in for that secure element.
Provisioning: a fleet KEK is formed in the HSM at a key ceremony from components this
module holds; each terminal's TPK and TAK are generated in the HSM, exported under that
KEK and unwrapped here. Clear PINs exist here only long enough to build a PIN block.

Service windows take new PINs under a TPK too. `medclear up` provisions the keys of
`window-1` (the window of `medclear card ...`) and `window-seed` (where `medclear seed`
enrols the city), so a PIN change works at once (`WINDOWS_MADE_AT_UP`). `medclear card
change-pin` and `card issue --temporary` take `--pin`, or ask for it hidden on a terminal
(in a script, its absence is an error).

The MAC covers the request's deterministic protobuf serialization with the `mac` field
empty: every field the terminal sent, nothing left out by a hand-written list. A reply
is checked the same way; one without a valid MAC is no answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm
from hsm_sim.keystore import KeyType, unwrap_key
from medclear.infra.hsm_client import (
    FLEET_KEK,
    PIN_BLOCK_FORMAT,
    PVK_ID,
    TERMINAL_KEY_ALGORITHM,
    tak_id,
    tpk_id,
)
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel, mac_input, pb_enum
from medclear.infra.settings import Settings, keyring_file
from medclear.infra.stack_state import client_pki_dir, load_endpoints
from medclear.v1 import hsm_pb2, hsm_pb2_grpc

DEFAULT_WINDOW = "window-1"  # the service window of `medclear card ...`
SEED_WINDOW = "window-seed"  # the window `medclear seed` enrols the city at
WINDOWS_MADE_AT_UP = (DEFAULT_WINDOW, SEED_WINDOW)  # their PIN and MAC keys exist from `up`


class Keyring:
    """Clear terminal keys of the simulated fleet, in one owner-only JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.keys, f)

    def has(self, terminal_id: str) -> bool:
        return terminal_id in self.keys

    def sign(self, terminal_id: str, request: Any) -> Any:
        """Set the request's MAC under the terminal's TAK; returns the request."""
        tak = bytes.fromhex(self.keys[terminal_id]["tak"])
        request.mac = crypto.generate_mac(TERMINAL_KEY_ALGORITHM, tak, mac_input(request))
        return request

    def reply_is_genuine(self, terminal_id: str, reply: Any) -> bool:
        """The gateway's reply carries a MAC under this terminal's TAK that verifies. A
        reply without one, or with a wrong one, is no answer: a swipe is then reversed."""
        tak = bytes.fromhex(self.keys[terminal_id]["tak"])
        return bool(reply.mac) and crypto.verify_mac(
            TERMINAL_KEY_ALGORITHM, tak, mac_input(reply), reply.mac
        )

    def pin_block(self, terminal_id: str, pin: str, card_no: str) -> bytes:
        tpk = bytes.fromhex(self.keys[terminal_id]["tpk"])
        return crypto.encrypt_pin_block(
            PIN_BLOCK_FORMAT, pin, card_no, TERMINAL_KEY_ALGORITHM, tpk, secrets.token_bytes
        )

    async def provision(
        self, hsm_address: str, terminal_ids: list[str], pki_dir: Path | None = None
    ) -> list[str]:
        """Give each new terminal a TPK and a TAK (in the HSM and here); returns the new."""
        new = [t for t in terminal_ids if t not in self.keys]
        if not new:
            return []
        async with aio_channel(hsm_address, Role.OPERATOR, pki_dir) as channel:
            hsm = hsm_pb2_grpc.HsmServiceStub(channel)
            kek = await self._fleet_kek(hsm)
            for terminal in new:
                exported = await provision_terminal_keys(
                    hsm, terminal, FLEET_KEK, TERMINAL_KEY_ALGORITHM
                )
                entry = {
                    name: unwrap_key(KeyAlgorithm.AES_256, kek, out.wrapped).hex()
                    for name, out in exported.items()
                }
                self.keys[terminal] = entry
        self._save()
        return new

    async def _fleet_kek(self, hsm: Any) -> bytes:
        if "@kek" in self.keys:
            return bytes.fromhex(self.keys["@kek"]["clear"])
        parts = [secrets.token_bytes(32) for _ in range(2)]
        await hsm.FormKey(
            hsm_pb2.FormKeyRequest(
                key_id=FLEET_KEK,
                algorithm=pb_enum(KeyAlgorithm.AES_256),
                components=parts,
                component_kcvs=[crypto.kcv(KeyAlgorithm.AES_256, p) for p in parts],
            ),
            timeout=CALL_TIMEOUT_S,
        )
        kek = bytes(a ^ b for a, b in zip(*parts, strict=True))
        self.keys["@kek"] = {"clear": kek.hex()}
        self._save()
        return kek


async def provision_terminal_keys(
    hsm: Any, terminal_id: str, kek_id: str, algorithm: KeyAlgorithm
) -> dict[str, Any]:
    """Generate the terminal's PIN key and MAC key in the HSM and export each under the
    KEK `kek_id`: {"tpk": ExportKeyReply, "tak": ExportKeyReply} (wrapped key and KCV)."""
    exported: dict[str, Any] = {}
    for name, key_id, key_type in (
        ("tpk", tpk_id(terminal_id), KeyType.TERMINAL_PIN_KEY),
        ("tak", tak_id(terminal_id), KeyType.TERMINAL_MAC_KEY),
    ):
        await hsm.GenerateKey(
            hsm_pb2.GenerateKeyRequest(
                key_id=key_id, type=pb_enum(key_type), algorithm=pb_enum(algorithm)
            ),
            timeout=CALL_TIMEOUT_S,
        )
        exported[name] = await hsm.ExportKey(
            hsm_pb2.ExportKeyRequest(
                key=hsm_pb2.KeyRef(key_id=key_id), kek=hsm_pb2.KeyRef(key_id=kek_id)
            ),
            timeout=CALL_TIMEOUT_S,
        )
    return exported


async def ensure_pvk(hsm_address: str, pki_dir: Path | None = None) -> None:
    """The card PIN verification key exists (made once, by `up`, as the operator)."""
    async with aio_channel(hsm_address, Role.OPERATOR, pki_dir) as channel:
        hsm = hsm_pb2_grpc.HsmServiceStub(channel)
        keys = await hsm.ListKeys(hsm_pb2.ListKeysRequest(), timeout=CALL_TIMEOUT_S)
        if not any(k.key_id == PVK_ID for k in keys.keys):
            await hsm.GenerateKey(
                hsm_pb2.GenerateKeyRequest(
                    key_id=PVK_ID,
                    type=pb_enum(KeyType.PIN_VERIFICATION_KEY),
                    algorithm=pb_enum(KeyAlgorithm.AES_128),
                ),
                timeout=CALL_TIMEOUT_S,
            )


def keyring_for(settings: Settings, ids: list[str]) -> Keyring | None:
    """The simulated terminals' and windows' keys, provisioned through the running stack's
    HSM on first use; None when that stack runs with terminal security off (what it does,
    not what this process's settings say). StackError when no stack runs."""
    endpoints = load_endpoints(settings)
    if not endpoints.terminal_security:
        return None
    keyring = Keyring(keyring_file(settings))
    asyncio.run(keyring.provision(endpoints.hsm, ids, client_pki_dir(settings)))
    return keyring
