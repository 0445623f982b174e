"""The HSM service over real gRPC (a server on a loopback port, a key store in a
temporary directory): PIN verification and translation, MACs, cryptograms, key admin,
and that no clear PIN or key leaves it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clearing.codes import ResultCode
from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm, PinBlockFormat
from hsm_sim.keystore import KeyStore, KeyType
from hsm_sim.service import DATA_BYTES_MAX, Hsm
from medclear.infra import status
from medclear.infra.rpc import create_server, pb_enum, system_clock_ms
from medclear.v1 import hsm_pb2, hsm_pb2_grpc

pytestmark = [pytest.mark.timeout(60)]
PAN = "S26000001"
PIN = "271828"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    s = KeyStore(tmp_path / "keys.json", secrets.token_bytes(32), system_clock_ms)
    s.generate("tpk-T1", KeyType.TERMINAL_PIN_KEY, KeyAlgorithm.AES_128)
    s.generate("zpk-Z1", KeyType.ZONE_PIN_KEY, KeyAlgorithm.TDES)
    s.generate("pvk", KeyType.PIN_VERIFICATION_KEY, KeyAlgorithm.AES_128)
    s.generate("tak-T1", KeyType.TERMINAL_MAC_KEY, KeyAlgorithm.TDES)
    s.generate("cmk", KeyType.CARD_MASTER_KEY, KeyAlgorithm.SM4)
    s.generate("kek-T1", KeyType.KEY_ENCRYPTION_KEY, KeyAlgorithm.AES_256)
    return s


@pytest.fixture
def stub(store: KeyStore) -> Iterator[hsm_pb2_grpc.HsmServiceStub]:
    loop = asyncio.new_event_loop()

    async def start() -> grpc.aio.Server:
        server, port, _ = await create_server(
            "127.0.0.1:0",
            lambda s: hsm_pb2_grpc.add_HsmServiceServicer_to_server(Hsm(store), s),
            ["medclear.v1.HsmService"],
        )
        start.port = port  # type: ignore[attr-defined]
        return server

    server = loop.run_until_complete(start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with grpc.insecure_channel(f"127.0.0.1:{start.port}") as channel:  # type: ignore[attr-defined]
        yield hsm_pb2_grpc.HsmServiceStub(channel)
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def pin_block(
    store: KeyStore,
    pin: str = PIN,
    fmt: PinBlockFormat = PinBlockFormat.ISO_4,
    key_id: str = "tpk-T1",
) -> bytes:
    info, key = store.key(key_id)
    return crypto.encrypt_pin_block(fmt, pin, PAN, info.algorithm, key, secrets.token_bytes)


def test_set_then_verify_a_pin(store: KeyStore, stub: hsm_pb2_grpc.HsmServiceStub) -> None:
    set_reply = stub.SetPin(
        hsm_pb2.SetPinRequest(
            pin_key=hsm_pb2.KeyRef(key_id="tpk-T1"),
            verification_key=hsm_pb2.KeyRef(key_id="pvk"),
            pin_block=pin_block(store),
            format=pb_enum(PinBlockFormat.ISO_4),
            pan=PAN,
        )
    )
    assert ResultCode(set_reply.result) == ResultCode.OK and set_reply.pin_verification_value
    for pin, expected in ((PIN, ResultCode.OK), ("314159", ResultCode.PIN_WRONG)):
        reply = stub.VerifyPin(
            hsm_pb2.VerifyPinRequest(
                pin_key=hsm_pb2.KeyRef(key_id="tpk-T1"),
                verification_key=hsm_pb2.KeyRef(key_id="pvk"),
                pin_block=pin_block(store, pin),
                format=pb_enum(PinBlockFormat.ISO_4),
                pan=PAN,
                pin_verification_value=set_reply.pin_verification_value,
            )
        )
        assert ResultCode(reply.result) == expected
    garbage = stub.VerifyPin(
        hsm_pb2.VerifyPinRequest(
            pin_key=hsm_pb2.KeyRef(key_id="tpk-T1"),
            verification_key=hsm_pb2.KeyRef(key_id="pvk"),
            pin_block=b"\x00" * 16,
            format=pb_enum(PinBlockFormat.ISO_4),
            pan=PAN,
            pin_verification_value=set_reply.pin_verification_value,
        )
    )
    assert ResultCode(garbage.result) == ResultCode.PIN_BLOCK_INVALID


def test_translate_from_terminal_key_to_zone_key(
    store: KeyStore, stub: hsm_pb2_grpc.HsmServiceStub
) -> None:
    reply = stub.TranslatePin(
        hsm_pb2.TranslatePinRequest(
            source_key=hsm_pb2.KeyRef(key_id="tpk-T1"),
            target_key=hsm_pb2.KeyRef(key_id="zpk-Z1"),
            pin_block=pin_block(store),
            source_format=pb_enum(PinBlockFormat.ISO_4),
            target_format=pb_enum(PinBlockFormat.ISO_0),
            pan=PAN,
        )
    )
    assert ResultCode(reply.result) == ResultCode.OK
    _, zpk = store.key("zpk-Z1")
    assert (
        crypto.decrypt_pin_block(PinBlockFormat.ISO_0, reply.pin_block, PAN, KeyAlgorithm.TDES, zpk)
        == PIN
    )


def test_mac_and_cryptogram(store: KeyStore, stub: hsm_pb2_grpc.HsmServiceStub) -> None:
    data = b"T1|42|S26000001|1250"
    mac = stub.GenerateMac(hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id="tak-T1"), data=data))
    ok = stub.VerifyMac(
        hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id="tak-T1"), data=data, mac=mac.mac)
    )
    bad = stub.VerifyMac(
        hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id="tak-T1"), data=data + b"0", mac=mac.mac)
    )
    assert (ResultCode(ok.result), ResultCode(bad.result)) == (
        ResultCode.OK,
        ResultCode.MAC_INVALID,
    )
    _, cmk = store.key("cmk")
    card_key = crypto.derive_card_key(KeyAlgorithm.SM4, cmk, PAN)
    challenge = bytes(8)
    good = crypto.card_cryptogram(KeyAlgorithm.SM4, card_key, challenge, 1250, "T1", 7)
    request = hsm_pb2.CryptogramRequest(
        master_key=hsm_pb2.KeyRef(key_id="cmk"),
        card_no=PAN,
        challenge=challenge,
        amount_fen=1250,
        terminal_id="T1",
        counter=7,
        cryptogram=good,
    )
    assert ResultCode(stub.VerifyCardCryptogram(request).result) == ResultCode.OK
    request.counter = 8  # a replayed cryptogram with another counter
    assert ResultCode(stub.VerifyCardCryptogram(request).result) == ResultCode.CRYPTOGRAM_INVALID


def test_keys_are_listed_without_material_and_wrong_keys_are_refused(
    store: KeyStore, stub: hsm_pb2_grpc.HsmServiceStub
) -> None:
    listed = stub.ListKeys(hsm_pb2.ListKeysRequest())
    assert {k.key_id for k in listed.keys} >= {"tpk-T1", "pvk", "kek-T1"}
    for _key_id in ("tpk-T1", "pvk"):
        _, key = store.key(_key_id)
        assert key.hex() not in str(listed).lower()
    with pytest.raises(grpc.RpcError) as missing:
        stub.GenerateMac(hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id="nope"), data=b"x"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # google.rpc.Status details: why, and which key; for a field, which field
    assert status.details_of(missing.value) == status.ErrorDetails(
        "KEY_NOT_FOUND", status.DOMAIN, {"key_id": "nope"}
    )
    with pytest.raises(grpc.RpcError) as wrong_type:
        stub.GenerateMac(hsm_pb2.MacRequest(key=hsm_pb2.KeyRef(key_id="pvk"), data=b"x"))
    assert wrong_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong = status.details_of(wrong_type.value)
    assert wrong is not None and (wrong.reason, wrong.metadata) == (
        "FIELD_INVALID",
        {"key_id": "pvk"},
    )
    assert [name for name, _why in wrong.fields] == ["key"], wrong
    with pytest.raises(grpc.RpcError) as too_long:
        stub.GenerateMac(
            hsm_pb2.MacRequest(
                key=hsm_pb2.KeyRef(key_id="tak-T1"), data=b"x" * (DATA_BYTES_MAX + 1)
            )
        )
    long_data = status.details_of(too_long.value)
    assert long_data is not None and long_data.reason == "FIELD_INVALID"
    assert long_data.fields == ((("data", f"data longer than {DATA_BYTES_MAX} bytes"),))
    assert "field data: data longer than" in status.describe(too_long.value)
    rotated = stub.GenerateKey(
        hsm_pb2.GenerateKeyRequest(
            key_id="tak-T1",
            type=pb_enum(KeyType.TERMINAL_MAC_KEY),
            algorithm=pb_enum(KeyAlgorithm.TDES),
        )
    )
    assert rotated.version == 2
    exported = stub.ExportKey(
        hsm_pb2.ExportKeyRequest(
            key=hsm_pb2.KeyRef(key_id="tak-T1"), kek=hsm_pb2.KeyRef(key_id="kek-T1")
        )
    )
    assert exported.kcv == rotated.kcv and exported.wrapped


def test_a_kek_is_formed_from_checked_components(
    stub: hsm_pb2_grpc.HsmServiceStub, store: KeyStore
) -> None:
    parts = [secrets.token_bytes(16) for _ in range(3)]
    checks = [crypto.kcv(KeyAlgorithm.SM4, p) for p in parts]
    info = stub.FormKey(
        hsm_pb2.FormKeyRequest(
            key_id="kek-ceremony",
            algorithm=pb_enum(KeyAlgorithm.SM4),
            components=parts,
            component_kcvs=checks,
        )
    )
    formed = bytes(a ^ b ^ c for a, b, c in zip(*parts, strict=True))
    assert info.kcv == crypto.kcv(KeyAlgorithm.SM4, formed)
    assert store.key("kek-ceremony", key_type=KeyType.KEY_ENCRYPTION_KEY)[1] == formed
    with pytest.raises(grpc.RpcError) as refused:
        stub.FormKey(
            hsm_pb2.FormKeyRequest(
                key_id="kek-bad",
                algorithm=pb_enum(KeyAlgorithm.SM4),
                components=parts[:2],
                component_kcvs=[checks[0], "000000"],
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "component 2" in (refused.value.details() or "")
    formed_not = status.details_of(refused.value)
    assert formed_not is not None and formed_not.reason == "REQUEST_REFUSED"
    assert formed_not.metadata == {"key_id": "kek-bad"}
