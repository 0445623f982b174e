"""The HSM's key store: every key encrypted under the local master key (LMK), in one file.

The HSM is a separate process with a gRPC service (hsm_sim/service.py): clear PINs and
clear keys exist only inside it, for one call at a time.

- The LMK is 32 bytes (AES-256), given at start from a file or the environment; it is
  never written into the store. `medclear up` generates the embedded stack's LMK at
  `.medclear/hsm/lmk.hex` (`new_lmk_file`), readable by its owner only. Each key is
  wrapped with AES-256-GCM under the LMK, with its identity (id, version, type,
  algorithm) as associated data, so a wrapped key moved to another entry does not
  decrypt.
- The store file also holds a check value of the LMK: opening it with another LMK fails
  at once with a clear error, not later with garbage keys.
- Keys have versions. Rotation makes a new current version; an older version keeps
  verifying for KEY_VERSION_GRACE_MS (30 days) after it was replaced, then is refused.
- Keys move under a key-encryption key (KEK): RFC 3394 key wrap for an AES KEK, ECB for
  a TDES or SM4 KEK (`wrap_key`). A KEK is formed at a key ceremony (`FormKey`) from 2 or
  3 clear components, XORed, each checked against its KCV.
- Writes are atomic (temporary file, fsync, rename): a crash leaves the old or the new
  store, never half of one.

`KeyInfo` (what is listed and logged) has no key material, only the key check value
(KCV).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from hsm_sim.crypto import CryptoError, KeyAlgorithm, ecb_decrypt, ecb_encrypt, kcv, key_length_ok
from hsm_sim.errors import HsmError

LMK_BYTES = 32
KEY_VERSION_GRACE_MS = 30 * 24 * 3600 * 1000  # a replaced key version still verifies
KEYS_MAX = 100_000  # entries (all versions) in one store
STORE_FORMAT = 1
_LMK_CHECK = b"medclear-hsm-lmk-check"
KEY_BYTES = {
    KeyAlgorithm.TDES: 16,
    KeyAlgorithm.AES_128: 16,
    KeyAlgorithm.AES_256: 32,
    KeyAlgorithm.SM4: 16,
}


class KeyType(IntEnum):
    """As proto/medclear/v1/hsm.proto KeyType."""

    KEY_TYPE_UNSPECIFIED = 0
    TERMINAL_PIN_KEY = 1
    ZONE_PIN_KEY = 2
    TERMINAL_MAC_KEY = 3
    PIN_VERIFICATION_KEY = 4
    CARD_MASTER_KEY = 5
    KEY_ENCRYPTION_KEY = 6


class KeyStoreError(HsmError):
    """A key store problem a caller can act on; never carries key material."""


class KeyNotFound(KeyStoreError):
    pass


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never the key itself."""

    key_id: str
    version: int
    type: KeyType
    algorithm: KeyAlgorithm
    kcv: str
    created_at_ms: int
    replaced_at_ms: int = 0  # 0: the current version

    def usable_at(self, now_ms: int) -> bool:
        return self.replaced_at_ms == 0 or now_ms < self.replaced_at_ms + KEY_VERSION_GRACE_MS


@dataclass(frozen=True, slots=True)
class _Entry:
    info: KeyInfo
    nonce: bytes
    wrapped: bytes


def load_lmk(hex_value: str | None = None, path: Path | None = None) -> bytes:
    """The LMK from a hex string (env) or a file holding hex; exactly one must be given."""
    if (hex_value is None) == (path is None):
        raise KeyStoreError("give the LMK either as hex or as a file, not both or neither")
    text = hex_value if hex_value is not None else path.read_text().strip()  # type: ignore[union-attr]
    try:
        lmk = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyStoreError("the LMK is not hex") from exc
    if len(lmk) != LMK_BYTES:
        raise KeyStoreError(f"the LMK must be {LMK_BYTES} bytes, not {len(lmk)}")
    return lmk


def new_lmk_file(path: Path) -> None:
    """Write a fresh random LMK (hex) readable by the owner only; for the embedded stack."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(LMK_BYTES) + "\n")


def _aad(info: KeyInfo) -> bytes:
    return f"{info.key_id}|{info.version}|{int(info.type)}|{int(info.algorithm)}".encode()


class KeyStore:
    def __init__(
        self,
        path: Path,
        lmk: bytes,
        clock_ms: Callable[[], int],
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if len(lmk) != LMK_BYTES:
            raise KeyStoreError(f"the LMK must be {LMK_BYTES} bytes")
        self._path = path
        self._aead = AESGCM(lmk)
        self._clock_ms = clock_ms
        self._rng = rng
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._check_nonce = b""
        self._check = b""
        if path.exists():
            self._load()
        else:
            self._check_nonce = rng(12)
            self._check = self._aead.encrypt(self._check_nonce, _LMK_CHECK, None)
            self._save()

    # ------------------------------------------------------------------ file
    def _load(self) -> None:
        try:
            data = json.loads(self._path.read_text())
            if data.get("format") != STORE_FORMAT:
                raise KeyStoreError(f"{self._path}: unknown key store format")
            self._check_nonce = bytes.fromhex(data["lmk_check_nonce"])
            self._check = bytes.fromhex(data["lmk_check"])
            entries = [
                _Entry(
                    KeyInfo(
                        e["key_id"],
                        e["version"],
                        KeyType(e["type"]),
                        KeyAlgorithm(e["algorithm"]),
                        e["kcv"],
                        e["created_at_ms"],
                        e["replaced_at_ms"],
                    ),
                    bytes.fromhex(e["nonce"]),
                    bytes.fromhex(e["wrapped"]),
                )
                for e in data["keys"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(
                f"{self._path}: unreadable key store ({type(exc).__name__})"
            ) from exc
        try:
            if self._aead.decrypt(self._check_nonce, self._check, None) != _LMK_CHECK:
                raise InvalidTag
        except InvalidTag as exc:
            raise KeyStoreError(f"{self._path}: the LMK does not match this key store") from exc
        self._entries = {(e.info.key_id, e.info.version): e for e in entries}

    def _save(self) -> None:
        data = {
            "format": STORE_FORMAT,
            "lmk_check_nonce": self._check_nonce.hex(),
            "lmk_check": self._check.hex(),
            "keys": [
                {
                    "key_id": e.info.key_id,
                    "version": e.info.version,
                    "type": int(e.info.type),
                    "algorithm": int(e.info.algorithm),
                    "kcv": e.info.kcv,
                    "created_at_ms": e.info.created_at_ms,
                    "replaced_at_ms": e.info.replaced_at_ms,
                    "nonce": e.nonce.hex(),
                    "wrapped": e.wrapped.hex(),
                }
                for e in sorted(
                    self._entries.values(), key=lambda e: (e.info.key_id, e.info.version)
                )
            ],
        }
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    # ------------------------------------------------------------------ keys
    def _store(self, info: KeyInfo, key: bytes) -> KeyInfo:
        if len(self._entries) >= KEYS_MAX:
            raise KeyStoreError(f"the key store holds {KEYS_MAX} keys already")
        nonce = self._rng(12)
        self._entries[(info.key_id, info.version)] = _Entry(
            info, nonce, self._aead.encrypt(nonce, key, _aad(info))
        )
        self._save()
        return info

    def current(self, key_id: str) -> KeyInfo | None:
        versions = [e.info for (kid, _v), e in self._entries.items() if kid == key_id]
        return max(versions, key=lambda i: i.version) if versions else None

    def add(self, key_id: str, key_type: KeyType, algorithm: KeyAlgorithm, key: bytes) -> KeyInfo:
        """Store a key (new id, or a new version of an id of the same type/algorithm)."""
        if not key_id or len(key_id) > 64 or not key_id.replace("-", "").replace("_", "").isalnum():
            raise KeyStoreError("a key id is 1-64 letters, digits, '-' or '_'")
        if not key_length_ok(algorithm, key):
            raise KeyStoreError(f"wrong key length for {algorithm.name}")
        now = self._clock_ms()
        previous = self.current(key_id)
        version = 1
        if previous is not None:
            if (previous.type, previous.algorithm) != (key_type, algorithm):
                raise KeyStoreError(
                    f"{key_id} is a {previous.type.name}/{previous.algorithm.name} key"
                )
            version = previous.version + 1
            old = self._entries[(key_id, previous.version)]
            self._entries[(key_id, previous.version)] = replace(
                old, info=replace(previous, replaced_at_ms=now)
            )
        return self._store(
            KeyInfo(key_id, version, key_type, algorithm, kcv(algorithm, key), now), key
        )

    def generate(self, key_id: str, key_type: KeyType, algorithm: KeyAlgorithm) -> KeyInfo:
        """A new random key (or the next version of `key_id`: rotation)."""
        return self.add(key_id, key_type, algorithm, self._rng(KEY_BYTES[algorithm]))

    def key(
        self, key_id: str, version: int = 0, key_type: KeyType | None = None
    ) -> tuple[KeyInfo, bytes]:
        """The clear key for use inside the HSM; version 0 is the current one. A replaced
        version works until its grace period ends; a key of another type is refused."""
        info = (
            self.current(key_id)
            if version == 0
            else (
                self._entries[(key_id, version)].info
                if (key_id, version) in self._entries
                else None
            )
        )
        if info is None:
            raise KeyNotFound(f"no key {key_id}" + (f" version {version}" if version else ""))
        if key_type is not None and info.type != key_type:
            raise KeyStoreError(f"{key_id} is a {info.type.name}, not a {key_type.name}")
        if not info.usable_at(self._clock_ms()):
            raise KeyStoreError(
                f"{key_id} version {info.version} was replaced and its grace period is over"
            )
        entry = self._entries[(info.key_id, info.version)]
        try:
            return info, self._aead.decrypt(entry.nonce, entry.wrapped, _aad(info))
        except InvalidTag as exc:
            raise KeyStoreError(f"{key_id} version {info.version} does not decrypt") from exc

    def export(self, key_id: str, version: int, kek_id: str) -> tuple[KeyInfo, bytes]:
        """The key wrapped under the key-encryption key `kek_id` (for a terminal or a
        zone partner), with its info (KCV of the clear key)."""
        kek_info, kek = self.key(kek_id, 0, KeyType.KEY_ENCRYPTION_KEY)
        info, key = self.key(key_id, version)
        return info, wrap_key(kek_info.algorithm, kek, key)

    def import_wrapped(
        self,
        key_id: str,
        key_type: KeyType,
        algorithm: KeyAlgorithm,
        kek_id: str,
        wrapped: bytes,
        expected_kcv: str,
    ) -> KeyInfo:
        """Store a key received under `kek_id`; its KCV must match the one sent with it."""
        kek_info, kek = self.key(kek_id, 0, KeyType.KEY_ENCRYPTION_KEY)
        key = unwrap_key(kek_info.algorithm, kek, wrapped)
        if not key_length_ok(algorithm, key) or kcv(algorithm, key) != expected_kcv.upper():
            raise KeyStoreError("the imported key's check value does not match")
        return self.add(key_id, key_type, algorithm, key)

    def form_kek(
        self,
        key_id: str,
        algorithm: KeyAlgorithm,
        components: list[bytes],
        component_kcvs: list[str],
    ) -> KeyInfo:
        """A key-encryption key from 2 or 3 clear components (XOR), each checked by its
        KCV: what custodians enter at a key ceremony."""
        if not 2 <= len(components) <= 3 or len(component_kcvs) != len(components):
            raise KeyStoreError("a key is formed from 2 or 3 components, each with its KCV")
        for i, (part, check) in enumerate(zip(components, component_kcvs, strict=True), 1):
            if not key_length_ok(algorithm, part) or kcv(algorithm, part) != check.upper():
                raise KeyStoreError(f"component {i} does not match its check value")
        key = bytes(len(components[0]))
        for part in components:
            key = bytes(a ^ b for a, b in zip(key, part, strict=True))
        return self.add(key_id, KeyType.KEY_ENCRYPTION_KEY, algorithm, key)

    def list_keys(self) -> list[KeyInfo]:
        return sorted((e.info for e in self._entries.values()), key=lambda i: (i.key_id, i.version))


def wrap_key(kek_algorithm: KeyAlgorithm, kek: bytes, key: bytes) -> bytes:
    """A key under a key-encryption key: RFC 3394 key wrap for an AES KEK; ECB for a
    TDES or SM4 KEK (the classic form; every key length is a multiple of the block)."""
    if kek_algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        return aes_key_wrap(kek, key)
    return ecb_encrypt(kek_algorithm, kek, key)


def unwrap_key(kek_algorithm: KeyAlgorithm, kek: bytes, wrapped: bytes) -> bytes:
    if kek_algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        try:
            return aes_key_unwrap(kek, wrapped)
        except InvalidUnwrap as exc:
            raise KeyStoreError("the wrapped key does not unwrap under this KEK") from exc
    try:
        return ecb_decrypt(kek_algorithm, kek, wrapped)
    except CryptoError as exc:
        raise KeyStoreError("the wrapped key does not unwrap under this KEK") from exc
