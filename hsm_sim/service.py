"""The HSM as a gRPC service: thin translation between HsmService and hsm_sim.crypto /
hsm_sim.keystore. Clear PINs and clear keys exist only inside this process, only for
the duration of one call; nothing here logs, returns or raises them.

Results: a check that fails is a result code (PIN_WRONG, MAC_INVALID, PIN_BLOCK_INVALID,
CRYPTOGRAM_INVALID); a request the HSM cannot serve is a gRPC status (NOT_FOUND for an
unknown key, INVALID_ARGUMENT for a key of the wrong type or a malformed field) with
google.rpc.Status details: the reason, the key id, the field (medclear/infra/status.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeAlias

import grpc
import structlog

from clearing.codes import ResultCode
from clearing.validate import mask_card
from hsm_sim import crypto
from hsm_sim.crypto import CryptoError, KeyAlgorithm, PinBlockError, PinBlockFormat
from hsm_sim.keystore import (
    KeyInfo,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    KeyType,
    load_lmk,
    wrap_key,
)
from medclear.infra import bounds, status
from medclear.infra.rpc import (
    create_server,
    pb_enum,
    result_pb,
    serve_until_stopped,
    shanghai_iso,
    system_clock_ms,
)
from medclear.infra.settings import Settings, key_store_file, lmk_file, pki_dir
from medclear.v1 import hsm_pb2, hsm_pb2_grpc
from monitoring import metrics

log = structlog.get_logger(process="hsm")
Ctx: TypeAlias = grpc.aio.ServicerContext
DATA_BYTES_MAX = 64 * 1024  # MAC / digest input per call


def key_info_pb(info: KeyInfo) -> hsm_pb2.KeyInfo:
    return hsm_pb2.KeyInfo(
        key_id=info.key_id,
        version=info.version,
        type=pb_enum(info.type),
        algorithm=pb_enum(info.algorithm),
        kcv=info.kcv,
        created_at=shanghai_iso(info.created_at_ms),
    )


async def _refuse(context: Ctx, exc: Exception, bad_field: str = "", key_id: str = "") -> NoReturn:
    """A request the HSM cannot serve: NOT_FOUND for an unknown key, INVALID_ARGUMENT for
    the rest (a key of the wrong type, a malformed field), with google.rpc.Status details
    naming the field and the key id (medclear/infra/status.py). Never carries key
    material."""
    metadata = {"key_id": key_id} if key_id else {}
    if isinstance(exc, KeyNotFound):
        await status.abort(
            context,
            grpc.StatusCode.NOT_FOUND,
            str(exc),
            status.Reason.KEY_NOT_FOUND,
            metadata=metadata,
        )
    reason = status.Reason.FIELD_INVALID if bad_field else status.Reason.REQUEST_REFUSED
    await status.abort(
        context,
        grpc.StatusCode.INVALID_ARGUMENT,
        str(exc),
        reason,
        metadata=metadata,
        bad_field=bad_field,
    )


def _decrypted(alg: KeyAlgorithm, key: bytes, block: bytes, fmt: int, pan: str) -> str | ResultCode:
    """The clear PIN of a block, or PIN_BLOCK_INVALID for one that does not decrypt."""
    try:
        return crypto.decrypt_pin_block(PinBlockFormat(fmt), block, pan, alg, key)
    except (PinBlockError, CryptoError, ValueError):
        return ResultCode.PIN_BLOCK_INVALID


class Hsm(hsm_pb2_grpc.HsmServiceServicer):
    def __init__(self, store: KeyStore, rng: Callable[[int], bytes] = secrets.token_bytes):
        self.store = store
        self.rng = rng

    async def _key(
        self, context: Ctx, ref: hsm_pb2.KeyRef, key_type: KeyType, bad_field: str
    ) -> tuple[KeyAlgorithm, bytes]:
        """The key `ref` names, of `key_type`; `bad_field` is the request field holding
        `ref`, named in the error when it cannot be used."""
        try:
            info, key = self.store.key(ref.key_id, ref.version, key_type)
        except (KeyStoreError, ValueError) as exc:
            await _refuse(context, exc, bad_field, ref.key_id)
        return info.algorithm, key

    @staticmethod
    def _observe(operation: str, started: float, result: ResultCode) -> None:
        metrics.HSM_SECONDS.labels(operation).observe(time.perf_counter() - started)
        metrics.HSM_RESULTS.labels(operation, result.name).inc()

    async def TranslatePin(
        self,
        request: hsm_pb2.TranslatePinRequest,
        context: Ctx,
    ) -> hsm_pb2.TranslatePinReply:
        started = time.perf_counter()
        src_alg, src = await self._key(
            context, request.source_key, KeyType.TERMINAL_PIN_KEY, "source_key"
        )
        dst_alg, dst = await self._key(
            context, request.target_key, KeyType.ZONE_PIN_KEY, "target_key"
        )
        try:
            block = crypto.translate_pin_block(
                request.pin_block,
                request.pan,
                PinBlockFormat(request.source_format),
                src_alg,
                src,
                PinBlockFormat(request.target_format),
                dst_alg,
                dst,
                self.rng,
            )
        except (CryptoError, ValueError):
            self._observe("TranslatePin", started, ResultCode.PIN_BLOCK_INVALID)
            return hsm_pb2.TranslatePinReply(result=result_pb(ResultCode.PIN_BLOCK_INVALID))
        self._observe("TranslatePin", started, ResultCode.OK)
        return hsm_pb2.TranslatePinReply(result=result_pb(ResultCode.OK), pin_block=block)

    async def _clear_pin(
        self, context: Ctx, ref: hsm_pb2.KeyRef, block: bytes, fmt: int, pan: str
    ) -> str | ResultCode:
        alg, key = await self._key(context, ref, KeyType.TERMINAL_PIN_KEY, "pin_key")
        return _decrypted(alg, key, block, fmt, pan)

    async def VerifyPin(
        self,
        request: hsm_pb2.VerifyPinRequest,
        context: Ctx,
    ) -> hsm_pb2.HsmReply:
        started = time.perf_counter()
        pin = await self._clear_pin(
            context, request.pin_key, request.pin_block, request.format, request.pan
        )
        result = pin if isinstance(pin, ResultCode) else ResultCode.OK
        if not isinstance(pin, ResultCode):
            alg, pvk = await self._key(
                context, request.verification_key, KeyType.PIN_VERIFICATION_KEY, "verification_key"
            )
            if not crypto.verify_pin(alg, pvk, request.pan, pin, request.pin_verification_value):
                result = ResultCode.PIN_WRONG
        self._observe("VerifyPin", started, result)
        return hsm_pb2.HsmReply(result=result_pb(result))

    async def CheckPinBlock(
        self,
        request: hsm_pb2.CheckPinBlockRequest,
        context: Ctx,
    ) -> hsm_pb2.HsmReply:
        """OK when the block decrypts under the PIN key to a well-formed block for this PAN;
        PIN_BLOCK_INVALID otherwise. The PIN is checked against nothing and never leaves."""
        started = time.perf_counter()
        pin = await self._clear_pin(
            context, request.pin_key, request.pin_block, request.format, request.pan
        )
        result = pin if isinstance(pin, ResultCode) else ResultCode.OK
        self._observe("CheckPinBlock", started, result)
        return hsm_pb2.HsmReply(result=result_pb(result))

    async def SetPin(
        self,
        request: hsm_pb2.SetPinRequest,
        context: Ctx,
    ) -> hsm_pb2.SetPinReply:
        started = time.perf_counter()
        pin = await self._clear_pin(
            context, request.pin_key, request.pin_block, request.format, request.pan
        )
        if isinstance(pin, ResultCode):
            self._observe("SetPin", started, pin)
            return hsm_pb2.SetPinReply(result=result_pb(pin))
        alg, pvk = await self._key(
            context, request.verification_key, KeyType.PIN_VERIFICATION_KEY, "verification_key"
        )
        pvv = crypto.pin_verification_value(alg, pvk, request.pan, pin)
        self._observe("SetPin", started, ResultCode.OK)
        return hsm_pb2.SetPinReply(result=result_pb(ResultCode.OK), pin_verification_value=pvv)

    async def SetPins(self, request: hsm_pb2.SetPinsRequest, context: Ctx) -> hsm_pb2.SetPinsReply:
        """SetPin for each request, in order (bulk enrolment). Each request's keys are
        looked up once per call; a key that is missing or of the wrong type is that
        request's result, not an error of the call."""
        started = time.perf_counter()
        if len(request.requests) > bounds.SET_PINS_MAX:
            await status.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {bounds.SET_PINS_MAX} requests in one call",
                status.Reason.FIELD_INVALID,
                bad_field="requests",
            )
        keys: dict[tuple[str, int, KeyType], tuple[KeyAlgorithm, bytes] | ResultCode] = {}
        replies = [self._set_pin_item(item, keys) for item in request.requests]
        for reply in replies:
            metrics.HSM_RESULTS.labels("SetPins", ResultCode(reply.result).name).inc()
        metrics.HSM_SECONDS.labels("SetPins").observe(time.perf_counter() - started)
        return hsm_pb2.SetPinsReply(replies=replies)

    def _set_pin_item(
        self,
        item: hsm_pb2.SetPinRequest,
        keys: dict[tuple[str, int, KeyType], tuple[KeyAlgorithm, bytes] | ResultCode],
    ) -> hsm_pb2.SetPinReply:
        """One request of SetPins, as SetPin decides it; `keys` caches this call's keys."""
        found: list[tuple[KeyAlgorithm, bytes]] = []
        for ref, key_type in (
            (item.pin_key, KeyType.TERMINAL_PIN_KEY),
            (item.verification_key, KeyType.PIN_VERIFICATION_KEY),
        ):
            slot = (ref.key_id, ref.version, key_type)
            if slot not in keys:
                try:
                    info, key = self.store.key(ref.key_id, ref.version, key_type)
                    keys[slot] = (info.algorithm, key)
                except KeyNotFound:
                    keys[slot] = ResultCode.TERMINAL_UNKNOWN
                except (KeyStoreError, ValueError):
                    keys[slot] = ResultCode.MALFORMED_REQUEST
            usable = keys[slot]
            if isinstance(usable, ResultCode):
                return hsm_pb2.SetPinReply(result=result_pb(usable))
            found.append(usable)
        (pin_alg, pin_key), (pvk_alg, pvk) = found
        pin = _decrypted(pin_alg, pin_key, item.pin_block, item.format, item.pan)
        if isinstance(pin, ResultCode):
            return hsm_pb2.SetPinReply(result=result_pb(pin))
        pvv = crypto.pin_verification_value(pvk_alg, pvk, item.pan, pin)
        return hsm_pb2.SetPinReply(result=result_pb(ResultCode.OK), pin_verification_value=pvv)

    async def _mac_data(self, context: Ctx, data: bytes) -> None:
        if len(data) > DATA_BYTES_MAX:
            await status.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"data longer than {DATA_BYTES_MAX} bytes",
                status.Reason.FIELD_INVALID,
                bad_field="data",
            )

    async def GenerateMac(
        self,
        request: hsm_pb2.MacRequest,
        context: Ctx,
    ) -> hsm_pb2.MacReply:
        started = time.perf_counter()
        await self._mac_data(context, request.data)
        alg, key = await self._key(context, request.key, KeyType.TERMINAL_MAC_KEY, "key")
        mac = crypto.generate_mac(alg, key, request.data)
        self._observe("GenerateMac", started, ResultCode.OK)
        return hsm_pb2.MacReply(result=result_pb(ResultCode.OK), mac=mac)

    async def VerifyMac(
        self,
        request: hsm_pb2.MacRequest,
        context: Ctx,
    ) -> hsm_pb2.HsmReply:
        started = time.perf_counter()
        await self._mac_data(context, request.data)
        alg, key = await self._key(context, request.key, KeyType.TERMINAL_MAC_KEY, "key")
        ok = crypto.verify_mac(alg, key, request.data, request.mac)
        result = ResultCode.OK if ok else ResultCode.MAC_INVALID
        self._observe("VerifyMac", started, result)
        return hsm_pb2.HsmReply(result=result_pb(result))

    async def VerifyCardCryptogram(
        self,
        request: hsm_pb2.CryptogramRequest,
        context: Ctx,
    ) -> hsm_pb2.HsmReply:
        started = time.perf_counter()
        alg, master = await self._key(
            context, request.master_key, KeyType.CARD_MASTER_KEY, "master_key"
        )
        try:
            card_key = crypto.derive_card_key(alg, master, request.card_no)
            ok = crypto.verify_card_cryptogram(
                alg,
                card_key,
                request.challenge,
                request.amount_fen,
                request.terminal_id,
                request.counter,
                request.cryptogram,
            )
        except (CryptoError, ValueError):
            ok = False
        result = ResultCode.OK if ok else ResultCode.CRYPTOGRAM_INVALID
        self._observe("VerifyCardCryptogram", started, result)
        return hsm_pb2.HsmReply(result=result_pb(result))

    async def Digest(
        self,
        request: hsm_pb2.DigestRequest,
        context: Ctx,
    ) -> hsm_pb2.DigestReply:
        await self._mac_data(context, request.data)
        return hsm_pb2.DigestReply(digest=crypto.sm3(request.data))

    async def GenerateKey(
        self,
        request: hsm_pb2.GenerateKeyRequest,
        context: Ctx,
    ) -> hsm_pb2.KeyInfo:
        try:
            info = self.store.generate(
                request.key_id, KeyType(request.type), KeyAlgorithm(request.algorithm)
            )
        except (KeyStoreError, ValueError) as exc:
            await _refuse(context, exc, key_id=request.key_id)
        log.info("key generated", key_id=info.key_id, version=info.version, kcv=info.kcv)
        return key_info_pb(info)

    async def ExportKey(
        self, request: hsm_pb2.ExportKeyRequest, context: Ctx
    ) -> hsm_pb2.ExportKeyReply:
        try:
            info, wrapped = self.store.export(
                request.key.key_id, request.key.version, request.kek.key_id
            )
        except (KeyStoreError, ValueError) as exc:
            await _refuse(context, exc, key_id=request.key.key_id)
        log.info("key exported", key_id=info.key_id, kek=request.kek.key_id, kcv=info.kcv)
        return hsm_pb2.ExportKeyReply(wrapped=wrapped, kcv=info.kcv, key=key_info_pb(info))

    async def ExportCardKey(
        self, request: hsm_pb2.ExportCardKeyRequest, context: Ctx
    ) -> hsm_pb2.ExportKeyReply:
        """Personalisation: the per-card key derived from the card master key, wrapped
        under a KEK for the personalisation machine. The master key never leaves."""
        try:
            kek_info, kek = self.store.key(
                request.kek.key_id, request.kek.version, KeyType.KEY_ENCRYPTION_KEY
            )
            info, master = self.store.key(
                request.master_key.key_id, request.master_key.version, KeyType.CARD_MASTER_KEY
            )
            card_key = crypto.derive_card_key(info.algorithm, master, request.card_no)
        except (KeyStoreError, ValueError) as exc:
            await _refuse(context, exc, key_id=request.master_key.key_id)
        log.info(
            "card key exported",
            master=info.key_id,
            version=info.version,
            kek=kek_info.key_id,
            card=mask_card(request.card_no),
        )
        return hsm_pb2.ExportKeyReply(
            wrapped=wrap_key(kek_info.algorithm, kek, card_key),
            kcv=crypto.kcv(info.algorithm, card_key),
            key=key_info_pb(info),
        )

    async def ImportKey(self, request: hsm_pb2.ImportKeyRequest, context: Ctx) -> hsm_pb2.KeyInfo:
        try:
            info = self.store.import_wrapped(
                request.key_id,
                KeyType(request.type),
                KeyAlgorithm(request.algorithm),
                request.kek.key_id,
                request.wrapped,
                request.kcv,
            )
        except (KeyStoreError, ValueError) as exc:
            await _refuse(context, exc, key_id=request.key_id)
        log.info("key imported", key_id=info.key_id, version=info.version, kcv=info.kcv)
        return key_info_pb(info)

    async def FormKey(self, request: hsm_pb2.FormKeyRequest, context: Ctx) -> hsm_pb2.KeyInfo:
        try:
            info = self.store.form_kek(
                request.key_id,
                KeyAlgorithm(request.algorithm),
                list(request.components),
                list(request.component_kcvs),
            )
        except (KeyStoreError, ValueError) as exc:
            await _refuse(context, exc, key_id=request.key_id)
        log.info(
            "key formed from components",
            key_id=info.key_id,
            kcv=info.kcv,
            components=len(request.components),
        )
        return key_info_pb(info)

    async def ListKeys(
        self,
        request: hsm_pb2.ListKeysRequest,
        context: Ctx,
    ) -> hsm_pb2.ListKeysReply:
        return hsm_pb2.ListKeysReply(keys=[key_info_pb(i) for i in self.store.list_keys()])


async def serve(store: KeyStore, address: str, pki_dir: Path | None = None) -> None:
    hsm = Hsm(store)
    server, bound, health_servicer = await create_server(
        address,
        lambda s: hsm_pb2_grpc.add_HsmServiceServicer_to_server(hsm, s),
        [hsm_pb2.DESCRIPTOR.services_by_name["HsmService"].full_name],
        pki_dir,
    )
    metrics.READY.set(1)
    log.info("hsm serving", port=bound, keys=len(store.list_keys()))
    try:
        await serve_until_stopped(server, health_servicer, lambda: metrics.READY.set(0))
    finally:
        metrics.READY.set(0)


def run(store: KeyStore, address: str, pki_dir: Path | None = None) -> None:
    asyncio.run(serve(store, address, pki_dir))


def run_with_settings(settings: Settings, port: int) -> None:
    """The HSM process: the LMK (from the setting, else its file), the key store under it,
    served on settings.host. KeyStoreError or OSError if either cannot be read."""
    secret = settings.hsm_lmk.get_secret_value()
    lmk = load_lmk(hex_value=secret) if secret else load_lmk(path=lmk_file(settings))
    store = KeyStore(key_store_file(settings), lmk, system_clock_ms)
    run(store, f"{settings.host}:{port}", pki_dir(settings))
