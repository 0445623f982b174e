"""Card personalisation (个人化), simulated: what the issuer's card bureau writes into a chip.

The card's data come from medclear's issuance records, so a virtual card and the
registry agree: GetPerson gives the holder's name and the card's issue and expiry dates
(`CardInfo.issued_at`, `expires_at`); the social security number comes from the issuer's
own records (the seeded city, or `--ssn`); sex, birth date and birthplace follow from it.

The card's key: the card master key (`CMK_ID`, `cmk-cards`, SM4, made on the first
personalisation) lives in the HSM and never leaves it. An operator-only HSM call,
`ExportCardKey`, derives the card's key (EMV option A, `hsm_sim.crypto.derive_card_key`)
and returns only that, wrapped under the personalisation KEK `kek-perso`, with its KCV;
this module unwraps it, checks the KCV and writes it into the card image, as a
personalisation machine loads it into the chip. The image (`<state_dir>/cards/<card>.json`,
owner-only) stands in for the chip. The personalisation KEK is formed at a key ceremony
from two components, like the fleet KEK; the simulated bureau keeps its clear value in an
owner-only file, as the simulated terminals keep theirs (medclear.infra.terminals).

Rejected alternative: exporting the CMK to the bureau (every card's key outside the HSM).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from clearing.codes import ResultCode
from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm
from hsm_sim.keystore import KeyType, unwrap_key
from medclear.infra.hsm_client import CMK_ID
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel, pb_enum
from medclear.v1 import common_pb2, hsm_pb2, hsm_pb2_grpc, registry_pb2, registry_pb2_grpc
from reader_agent.card import NO_EXPIRY, CardImage
from reader_agent.errors import ReaderAgentError

PERSO_KEK = "kek-perso"
CARD_KEY_ALGORITHM = KeyAlgorithm.SM4
KEK_ALGORITHM = KeyAlgorithm.AES_256
ETHNICITY_HAN = 1  # GB 3304


class PersonalisationError(ReaderAgentError):
    """The card cannot be personalised; the message says why (masked numbers only)."""


def card_id_of(card_no: str, ssn: str) -> str:
    """The 16-byte card identification code: region of issue (6 digits), the issuer
    identifier D156000005 and 8 bytes bound to the card number."""
    return ssn[:6] + "D156000005" + crypto.sm3(card_no.encode("ascii"))[:8].hex().upper()


def _date(iso: str) -> str:
    """'2026-11-23T10:00:00.000+08:00' -> '20261123'; '' -> NO_EXPIRY."""
    return iso[:10].replace("-", "") if iso else NO_EXPIRY


def image_of(
    card_no: str, ssn: str, name: str, issued_at: str, expires_at: str, card_key: bytes
) -> CardImage:
    return CardImage(
        card_no=card_no,
        card_id=card_id_of(card_no, ssn),
        issue_date=_date(issued_at),
        expiry_date=_date(expires_at),
        ssn=ssn,
        name=name,
        sex="1" if int(ssn[16]) % 2 else "2",
        ethnicity=ETHNICITY_HAN,
        birthplace=ssn[:6],
        birth_date=ssn[6:14],
        key_algorithm=int(CARD_KEY_ALGORITHM),
        card_key=card_key.hex(),
    )


def clone_of(image: CardImage) -> CardImage:
    """A copy of EF05/EF06 onto a blank chip: the data are right, the key cannot be."""
    return replace(image, card_key=secrets.token_bytes(len(bytes.fromhex(image.card_key))).hex())


class Personaliser:
    """The card bureau: its KEK, the card master key in the HSM, card images on disk."""

    def __init__(
        self, hsm_address: str, registry_address: str, pki_dir: Path | None, cards_dir: Path
    ) -> None:
        self.hsm_address = hsm_address
        self.registry_address = registry_address
        self.pki_dir = pki_dir
        self.cards_dir = cards_dir
        self._kek: bytes | None = None

    def image_path(self, card_no: str) -> Path:
        return self.cards_dir / f"{card_no}.json"

    async def personalise(self, ssn: str, card_no: str) -> CardImage:
        """Read the issuance record, get the card key from the HSM, write the image."""
        async with aio_channel(self.registry_address, Role.OPERATOR, self.pki_dir) as channel:
            registry = registry_pb2_grpc.CardRegistryServiceStub(channel)
            view = await registry.GetPerson(
                registry_pb2.GetPersonRequest(
                    window=common_pb2.WindowContext(
                        window_id="card-bureau",
                        operator_id="perso",
                        request_id=f"perso-{card_no}-{time.time_ns()}",
                    ),
                    ssn=ssn,
                    card_no=card_no,
                ),
                timeout=CALL_TIMEOUT_S,
            )
        if view.result != ResultCode.OK:
            raise PersonalisationError(
                f"no issuance record for this card: {ResultCode(view.result).name}"
            )
        card = next((c for c in view.cards if c.card_no == card_no), None)
        if card is None:
            raise PersonalisationError("the card was not issued to this person")
        async with aio_channel(self.hsm_address, Role.OPERATOR, self.pki_dir) as channel:
            hsm = hsm_pb2_grpc.HsmServiceStub(channel)
            await self._ensure_keys(hsm)
            exported = await hsm.ExportCardKey(
                hsm_pb2.ExportCardKeyRequest(
                    master_key=hsm_pb2.KeyRef(key_id=CMK_ID),
                    card_no=card_no,
                    kek=hsm_pb2.KeyRef(key_id=PERSO_KEK),
                ),
                timeout=CALL_TIMEOUT_S,
            )
        assert self._kek is not None
        card_key = unwrap_key(KEK_ALGORITHM, self._kek, exported.wrapped)
        if crypto.kcv(CARD_KEY_ALGORITHM, card_key) != exported.kcv:
            raise PersonalisationError("the card key's check value does not match")
        image = image_of(card_no, ssn, view.name, card.issued_at, card.expires_at, card_key)
        image.save(self.image_path(card_no))
        return image

    async def _ensure_keys(self, hsm: Any) -> None:
        """The card master key and the personalisation KEK exist (made once)."""
        if self._kek is not None:
            return
        keys = {k.key_id for k in (await hsm.ListKeys(hsm_pb2.ListKeysRequest())).keys}
        if CMK_ID not in keys:
            await _generate(hsm, CMK_ID, KeyType.CARD_MASTER_KEY, CARD_KEY_ALGORITHM)
        kek_file = self.cards_dir / "perso-kek.json"
        if kek_file.exists() and PERSO_KEK in keys:
            self._kek = bytes.fromhex(json.loads(kek_file.read_text())["clear"])
            return
        parts = [secrets.token_bytes(32) for _ in range(2)]
        await hsm.FormKey(
            hsm_pb2.FormKeyRequest(
                key_id=PERSO_KEK,
                algorithm=pb_enum(KEK_ALGORITHM),
                components=parts,
                component_kcvs=[crypto.kcv(KEK_ALGORITHM, p) for p in parts],
            ),
            timeout=CALL_TIMEOUT_S,
        )
        self._kek = bytes(a ^ b for a, b in zip(*parts, strict=True))
        kek_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(kek_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"clear": self._kek.hex()}, f)


async def _generate(hsm: Any, key_id: str, key_type: KeyType, algorithm: KeyAlgorithm) -> None:
    try:
        await hsm.GenerateKey(
            hsm_pb2.GenerateKeyRequest(
                key_id=key_id, type=pb_enum(key_type), algorithm=pb_enum(algorithm)
            ),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as exc:
        raise PersonalisationError(f"HSM refused {key_id}: {exc.details()}") from exc
