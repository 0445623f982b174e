"""The HSM key store: keys under the LMK, versions and their grace period, export and
import under a KEK, and no key material anywhere it could leak."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from hsm_sim.crypto import KeyAlgorithm
from hsm_sim.keystore import (
    KEY_VERSION_GRACE_MS,
    KeyNotFound,
    KeyStore,
    KeyStoreError,
    KeyType,
    load_lmk,
    new_lmk_file,
)

LMK = bytes(range(32))
T0 = 1_795_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def counting_rng() -> object:
    counter = itertools.count(1)
    return lambda n: bytes((next(counter) + i) % 256 for i in range(n))


def store(path: Path, clock: Clock | None = None, lmk: bytes = LMK) -> KeyStore:
    return KeyStore(path / "keys.json", lmk, clock or Clock())


def test_keys_survive_a_restart_and_the_file_holds_no_clear_key(tmp_path: Path) -> None:
    s = store(tmp_path)
    info = s.generate("pvk-1", KeyType.PIN_VERIFICATION_KEY, KeyAlgorithm.AES_128)
    _, key = s.key("pvk-1")
    assert len(info.kcv) == 6 and info.version == 1
    reopened = store(tmp_path)
    assert reopened.key("pvk-1") == (info, key)
    text = (tmp_path / "keys.json").read_text()
    assert key.hex() not in text.lower() and key.hex().upper() not in text
    assert "kcv" in json.loads(text)["keys"][0] and "key" not in json.loads(text)["keys"][0]
    assert key.hex() not in repr(info) and key.hex() not in repr(reopened.list_keys())


def test_another_lmk_is_refused_at_once(tmp_path: Path) -> None:
    store(tmp_path).generate("k", KeyType.KEY_ENCRYPTION_KEY, KeyAlgorithm.AES_256)
    with pytest.raises(KeyStoreError, match="LMK does not match"):
        store(tmp_path, lmk=bytes(32))


def test_rotation_keeps_the_old_version_for_the_grace_period(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    v1 = s.generate("tak-T1", KeyType.TERMINAL_MAC_KEY, KeyAlgorithm.AES_128)
    clock.now += 1000
    v2 = s.generate("tak-T1", KeyType.TERMINAL_MAC_KEY, KeyAlgorithm.AES_128)
    assert (v1.version, v2.version) == (1, 2) and s.key("tak-T1")[0].version == 2
    clock.now += KEY_VERSION_GRACE_MS - 1
    assert s.key("tak-T1", version=1)[0].version == 1
    clock.now += 2
    with pytest.raises(KeyStoreError, match="grace period is over"):
        s.key("tak-T1", version=1)
    with pytest.raises(KeyNotFound):
        s.key("tak-T1", version=9)


def test_a_key_is_used_only_as_its_type(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.generate("tpk-T1", KeyType.TERMINAL_PIN_KEY, KeyAlgorithm.TDES)
    with pytest.raises(KeyStoreError, match="not a TERMINAL_MAC_KEY"):
        s.key("tpk-T1", key_type=KeyType.TERMINAL_MAC_KEY)
    with pytest.raises(KeyStoreError, match="is a TERMINAL_PIN_KEY"):
        s.generate("tpk-T1", KeyType.TERMINAL_MAC_KEY, KeyAlgorithm.TDES)


@pytest.mark.parametrize("kek_alg", [KeyAlgorithm.AES_256, KeyAlgorithm.TDES, KeyAlgorithm.SM4])
@pytest.mark.parametrize("key_alg", [KeyAlgorithm.AES_128, KeyAlgorithm.TDES, KeyAlgorithm.SM4])
def test_export_and_import_under_a_kek(
    tmp_path: Path, kek_alg: KeyAlgorithm, key_alg: KeyAlgorithm
) -> None:
    ours, theirs = store(tmp_path / "a"), store(tmp_path / "b")
    kek_info = ours.generate("kek-zone", KeyType.KEY_ENCRYPTION_KEY, kek_alg)
    _, kek = ours.key("kek-zone")
    theirs.add("kek-zone", KeyType.KEY_ENCRYPTION_KEY, kek_alg, kek)  # the key ceremony
    info = ours.generate("zpk-1", KeyType.ZONE_PIN_KEY, key_alg)
    exported, wrapped = ours.export("zpk-1", 0, "kek-zone")
    _, clear = ours.key("zpk-1")
    assert wrapped != clear and exported.kcv == info.kcv and kek_info.kcv
    imported = theirs.import_wrapped(
        "zpk-1", KeyType.ZONE_PIN_KEY, key_alg, "kek-zone", wrapped, info.kcv
    )
    assert imported.kcv == info.kcv and theirs.key("zpk-1")[1] == clear
    with pytest.raises(KeyStoreError, match="check value"):
        theirs.import_wrapped("zpk-2", KeyType.ZONE_PIN_KEY, key_alg, "kek-zone", wrapped, "000000")


def test_the_lmk_comes_from_hex_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "lmk.hex"
    new_lmk_file(path)
    assert len(load_lmk(path=path)) == 32 and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(KeyStoreError):
        load_lmk(hex_value="abcd")
    with pytest.raises(KeyStoreError):
        load_lmk(hex_value=LMK.hex(), path=path)
