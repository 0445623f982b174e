"""The HSM's cryptography: PIN blocks, PIN verification values, MACs, card keys, SM3.

Pure functions: no I/O, no clock, no global randomness. Where randomness is needed (PIN-block
fill) it comes from an injected ``rng(n) -> n bytes``. Primitives come from ``cryptography``
only (DES/TDES, AES, SM4, CMAC, SM3); everything else here is composition. No exception
message and no repr ever carries a clear PIN or a clear key.

Design choices
--------------

Card number -> PAN (``card_pan``)
    Social-security cards carry a 9-character number (``[A-Z0-9]{9}``, e.g. ``S26000001``),
    not a bank PAN, but ISO 9564 PIN blocks bind the PIN to PAN digits. The card number is
    read as a base-36 integer (digits 0-9, then A=10 ... Z=35; 36**9 - 1 has 15 decimal
    digits), written as 15 decimal digits with leading zeros, and a Luhn check digit is
    appended: a 16-digit PAN substitute (``S26000001`` -> ``0791608664309773``). The map is
    injective (no two card numbers share a PAN, unlike letter-to-two-digits schemes such as
    ISO 13616's where ``1A...`` and ``B...`` collide) and deterministic, and the result obeys
    every PAN rule of ISO 9564: formats 0 and 3 use its 12 rightmost digits excluding the
    check digit (= the base-36 value modulo 10**12), format 4 uses all 16 digits (M = 4), so
    format 4 binds the whole card number. Every ``pan`` parameter also accepts a genuine
    numeric PAN of 12 to 19 digits, used as is; 9-character strings are always card numbers.

SM4 with formats 0, 1 and 3
    The 8-byte ISO blocks do not fit SM4's 16-byte block. Chinese practice (UnionPay-style
    PIN pads doing "SM4 + ANSI X9.8", e.g. the worked example at
    https://blog.csdn.net/M_Kerry/article/details/104625499) widens each field to 32 nibbles:
    the plain-text PIN field keeps ``C N PIN`` and continues its fill to nibble 32, the
    account field is 20 zero nibbles then the same 12 PAN digits; the two are XORed and
    enciphered in one SM4-ECB operation. This module does exactly that for formats 0, 1
    and 3 under SM4 (format 1: random fill, format 3: random A-F fill, to 32 nibbles).
    SM4 also takes ISO format 4 (same construction as with AES: SM4 is a 128-bit block
    cipher too). Allowed pairs: TDES with 0/1/3 (8-byte blocks); SM4 with 0/1/3 (16-byte
    widened) and 4; AES-128/256 with 4 only (ISO 9564-1:2017 makes format 4 the AES format;
    AES with 8-byte formats has no standard widening, so it is refused). Any other pair
    raises ``PinBlockError('unsupported')``.

Translation
    ``translate_pin_block`` refuses to move a PIN from a PAN-bound format (0, 3, 4) to
    format 1 (``'unsupported'``): that would strip the PAN binding, a downgrade ISO 9564-1
    and the PCI PIN requirements restrict (we simply never allow it).

Decryption failures (``PinBlockError.reason``)
    ``'length'`` block size wrong for format+algorithm; ``'format'`` control nibble is not
    this format's; ``'pin_length'`` length nibble outside 4..12; ``'pin_digits'`` a PIN
    nibble above 9; ``'padding'`` fill nibbles not what the format requires (F for format 0,
    A-F for format 3, A for the first half of format 4); ``'pan_mismatch'`` (formats 0 and 3)
    the block is well formed for *some* account field but not for the one given: every
    nibble outside the PAN area is valid and every nibble inside it would become valid with
    some decimal PAN digit; ``'pan'`` the PAN/card number itself is malformed;
    ``'unsupported'`` the format/algorithm pair is not allowed. Format 1 carries no PAN and
    ignores ``pan``. In format 4 the PAN is chained between the two encipherments, so a
    wrong PAN, a wrong key and a damaged block all decrypt to noise; the reason is then
    whichever check the noise fails first (almost always ``'format'``).

PIN verification value (``pin_verification_value``)
    A keyed MAC, not IBM 3624 / Visa PVV: ``PVV = MAC_PVK("medclear-pvv-v1" || len || PAN
    digits || len || PIN)[:8]`` with ``generate_mac`` (retail MAC for TDES, CMAC for
    AES/SM4). Reasons: IBM 3624 offsets and Visa PVVs are defined over DES only (64-bit
    block, decimalisation table) whereas our PVKs may be SM4 or AES; they yield 4 decimal
    digits, so roughly one wrong PIN in 10**4 verifies, while 64 MAC bits make a false accept
    negligible; and decimalisation tables are the classic attack surface against 3624
    (Bond & Zielinski, 2003). The PVV is useless without the PVK, which never leaves the HSM.
    It binds the full PAN digits (for card numbers: the 16-digit substitute), so a
    replacement card needs its PIN set again.

Key check value (``kcv``: 6 upper-case hex digits = leftmost 3 bytes)
    TDES: encrypt one all-zero 8-byte block (the classic method, ANSI X9.24-1 / PCI PIN
    requirement 15-1). AES and SM4: AES-/SM4-CMAC (NIST SP 800-38B) of one all-zero 16-byte
    block, the method ANSI X9.24-1:2017 and PCI PIN require for AES. Rationale, which holds
    for SM4 as much as for AES: the zero-block ECB value E_K(0) is exactly CMAC's subkey seed
    L, so publishing it leaks part of the subkeys of a key that is (here) also used for CMAC.
    Terminals that sign on with an SM4-ECB check value (common Chinese practice) can be
    compared with ``legacy_kcv``.

MACs (``generate_mac`` / ``verify_mac``)
    TDES: ISO/IEC 9797-1 MAC algorithm 3 ("retail MAC", ANSI X9.19) with padding method 2
    (append 0x80, then zeros to a multiple of 8; always at least one byte added), zero IV,
    8-byte MAC. Blocks 1..q-1 are CBC-DES under K1 and the last block goes through full TDES
    (E_K1, D_K2, E_K1 for a double-length key; for a triple-length key E_K3 D_K2 E_K1, the
    natural extension). AES and SM4: CMAC (NIST SP 800-38B), full 16-byte tag.
    ``verify_mac`` accepts the full MAC or its leftmost bytes truncated to no fewer than 8
    (64 bits, the length SP 800-38B recommends as the floor absent special analysis; also
    the ISO 8583 MAC field size). 4-byte MACs are refused: 2**-32 per forgery attempt is
    too weak for a system that verifies millions of messages. Comparisons are constant time.

Card keys (``derive_card_key``) and cryptograms (``card_cryptogram``)
    EMV Book 2 A1.4.1 "Option A" style: Y = the rightmost 16 digits of the PAN (for a card
    number, its 16-digit substitute) packed as 8 BCD bytes, ~Y its complement. TDES: key =
    TDES_MK(Y) || TDES_MK(~Y), adjusted to odd parity (a double-length key even under a
    triple-length master). 128-bit-block ciphers: AES-128 / SM4 key = E_MK(Y || ~Y);
    AES-256 key = E_MK(Y || ~Y) || E_MK(~Y || Y). The cryptogram is the leftmost 8 bytes
    (the size of an EMV ARQC) of ``generate_mac`` under the card key over the canonical
    encoding ``"MCAC" 01 || len(challenge) || challenge || amount_fen (8 bytes, big
    endian, >= 0) || len(terminal_id) || terminal_id (UTF-8) || counter (4 bytes)``; each
    length is one byte, so challenge and terminal id are 1..255 bytes. It is the
    anti-cloning check of chip swipes: the card computes it (reader_agent/card.py) and
    the gateway has the HSM verify it (``VerifyCardCryptogram``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Final

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes

from hsm_sim.errors import HsmError

__all__ = [
    "MAC_MIN_BYTES",
    "CryptoError",
    "KeyAlgorithm",
    "PinBlockError",
    "PinBlockFormat",
    "card_cryptogram",
    "card_pan",
    "decrypt_pin_block",
    "derive_card_key",
    "ecb_decrypt",
    "ecb_encrypt",
    "encode_pin_block",
    "encode_pin_block_for",
    "encrypt_pin_block",
    "generate_mac",
    "kcv",
    "key_length_ok",
    "legacy_kcv",
    "luhn_check_digit",
    "pan_digits",
    "pin_verification_value",
    "retail_mac",
    "sm3",
    "translate_pin_block",
    "verify_card_cryptogram",
    "verify_mac",
    "verify_pin",
]


class KeyAlgorithm(IntEnum):
    """Numbers as in proto/medclear/v1/hsm.proto."""

    TDES = 1
    AES_128 = 2
    AES_256 = 3
    SM4 = 4


class PinBlockFormat(IntEnum):
    """Numbers as in proto/medclear/v1/hsm.proto (ISO 9564-1 formats 0, 1, 3, 4)."""

    ISO_0 = 1
    ISO_1 = 2
    ISO_3 = 3
    ISO_4 = 4


class CryptoError(HsmError, ValueError):
    """Base of every error raised here. Messages never carry PINs or key material."""


_REASONS: Final[dict[str, str]] = {
    "length": "wrong length for this format and algorithm",
    "format": "control field is not this format's",
    "pin_length": "PIN length outside 4..12",
    "pin_digits": "PIN contains a non-decimal digit",
    "padding": "fill digits are not what the format requires",
    "pan_mismatch": "PIN block was built for another PAN",
    "pan": "PAN or card number is malformed",
    "unsupported": "format not allowed with this algorithm or translation",
}


class PinBlockError(CryptoError):
    """A PIN block could not be built or read; ``reason`` is one of ``_REASONS``' keys."""

    reason: str

    def __init__(self, reason: str) -> None:
        if reason not in _REASONS:
            raise ValueError(f"unknown PIN block error reason {reason!r}")
        self.reason = reason
        super().__init__(f"PIN block rejected ({reason}): {_REASONS[reason]}")


Rng = Callable[[int], bytes]
MAC_MIN_BYTES: Final = 8
_DIGITS: Final = frozenset("0123456789")
_CARD_CHARS: Final = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CARD_NO_CHARS: Final = 9
_PAN_FIELD_DIGITS: Final = 12
_PVV_TAG: Final = b"medclear-pvv-v1"
_CRYPTOGRAM_TAG: Final = b"MCAC\x01"
_PVV_BYTES: Final = 8
_CRYPTOGRAM_BYTES: Final = 8
_KEY_LENGTHS: Final[dict[KeyAlgorithm, tuple[int, ...]]] = {
    KeyAlgorithm.TDES: (16, 24),
    KeyAlgorithm.AES_128: (16,),
    KeyAlgorithm.AES_256: (32,),
    KeyAlgorithm.SM4: (16,),
}
_PAN_BOUND: Final = frozenset({PinBlockFormat.ISO_0, PinBlockFormat.ISO_3, PinBlockFormat.ISO_4})
_CONTROL: Final[dict[PinBlockFormat, int]] = {
    PinBlockFormat.ISO_0: 0x0,
    PinBlockFormat.ISO_1: 0x1,
    PinBlockFormat.ISO_3: 0x3,
    PinBlockFormat.ISO_4: 0x4,
}


# --- keys and block ciphers ------------------------------------------------------------


def key_length_ok(algorithm: KeyAlgorithm, key: bytes) -> bool:
    """TDES: 16 or 24 bytes (double/triple length); AES-128 16; AES-256 32; SM4 16."""
    return len(key) in _KEY_LENGTHS[KeyAlgorithm(algorithm)]


def _require_key(algorithm: KeyAlgorithm, key: bytes) -> None:
    if not key_length_ok(algorithm, key):
        lengths = " or ".join(str(n) for n in _KEY_LENGTHS[KeyAlgorithm(algorithm)])
        raise CryptoError(f"a {KeyAlgorithm(algorithm).name} key is {lengths} bytes")


def _block_size(algorithm: KeyAlgorithm) -> int:
    return 8 if algorithm == KeyAlgorithm.TDES else 16


def _cipher_algorithm(algorithm: KeyAlgorithm, key: bytes) -> BlockCipherAlgorithm:
    _require_key(algorithm, key)
    if algorithm == KeyAlgorithm.TDES:
        # K1K2 -> K1K2K1: the same keying option 2, without the two-key deprecation warning.
        return TripleDES(key + key[:8] if len(key) == 16 else key)
    if algorithm == KeyAlgorithm.SM4:
        return algorithms.SM4(key)
    return algorithms.AES(key)


def ecb_encrypt(algorithm: KeyAlgorithm, key: bytes, data: bytes) -> bytes:
    """Raw block encryption (ECB, no padding); ``data`` is a whole number of blocks."""
    if not data or len(data) % _block_size(algorithm):
        raise CryptoError("ECB data must be a whole number of blocks")
    op = Cipher(_cipher_algorithm(algorithm, key), modes.ECB()).encryptor()
    return op.update(data) + op.finalize()


def ecb_decrypt(algorithm: KeyAlgorithm, key: bytes, data: bytes) -> bytes:
    """Raw block decryption (ECB, no padding); ``data`` is a whole number of blocks."""
    if not data or len(data) % _block_size(algorithm):
        raise CryptoError("ECB data must be a whole number of blocks")
    op = Cipher(_cipher_algorithm(algorithm, key), modes.ECB()).decryptor()
    return op.update(data) + op.finalize()


def _des_cbc_mac_prefix(k1: bytes, data: bytes) -> bytes:
    """Last CBC-DES(K1) block over ``data`` (zero IV); zero block for empty data."""
    if not data:
        return bytes(8)
    op = Cipher(TripleDES(k1 * 3), modes.CBC(bytes(8))).encryptor()
    return (op.update(data) + op.finalize())[-8:]


def _cmac(algorithm: KeyAlgorithm, key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(_cipher_algorithm(algorithm, key))
    mac.update(data)
    return mac.finalize()


def kcv(algorithm: KeyAlgorithm, key: bytes) -> str:
    """Key check value, 6 upper-case hex digits (leftmost 3 bytes).

    TDES: TDES-ECB of one all-zero 8-byte block. AES and SM4: CMAC (NIST SP 800-38B) of one
    all-zero 16-byte block, per ANSI X9.24-1:2017 / PCI PIN 15-1 (see the module docstring).
    """
    algorithm = KeyAlgorithm(algorithm)
    if algorithm == KeyAlgorithm.TDES:
        value = ecb_encrypt(algorithm, key, bytes(8))
    else:
        value = _cmac(algorithm, key, bytes(16))
    return value[:3].hex().upper()


def legacy_kcv(algorithm: KeyAlgorithm, key: bytes) -> str:
    """Zero-block ECB check value for any algorithm (6 hex digits), for comparing with
    terminals that report SM4/AES check values the legacy way. Equals ``kcv`` for TDES."""
    algorithm = KeyAlgorithm(algorithm)
    return ecb_encrypt(algorithm, key, bytes(_block_size(algorithm)))[:3].hex().upper()


# --- PANs and card numbers -------------------------------------------------------------


def luhn_check_digit(payload: str) -> str:
    """ISO/IEC 7812-1 (Luhn) check digit for a string of decimal digits."""
    if not payload or not set(payload) <= _DIGITS:
        raise PinBlockError("pan")
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # doubled: the digit next to the (future) check digit, then every 2nd
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def card_pan(card_no: str) -> str:
    """The 16-digit PAN substitute of a 9-character card number: base-36 value as 15
    decimal digits, then a Luhn check digit. Raises PinBlockError('pan') if malformed."""
    if len(card_no) != _CARD_NO_CHARS or not set(card_no) <= _CARD_CHARS:
        raise PinBlockError("pan")
    payload = f"{int(card_no, 36):015d}"
    return payload + luhn_check_digit(payload)


def pan_digits(pan: str) -> str:
    """Normalise a ``pan`` argument: a 9-character card number becomes its 16-digit
    substitute (``card_pan``); a numeric PAN of 12..19 digits is used as is."""
    if len(pan) == _CARD_NO_CHARS:
        return card_pan(pan)
    if 12 <= len(pan) <= 19 and set(pan) <= _DIGITS:
        return pan
    raise PinBlockError("pan")


def _pan_field_03(pan: str, nibbles: int) -> list[int]:
    """Account-number field of formats 0 and 3: zeros, then the 12 rightmost PAN digits
    excluding the check digit (zero-padded on the left if shorter)."""
    digits = pan_digits(pan)[:-1][-_PAN_FIELD_DIGITS:].rjust(_PAN_FIELD_DIGITS, "0")
    return [0] * (nibbles - _PAN_FIELD_DIGITS) + [int(c) for c in digits]


def _pan_field_4(pan: str) -> list[int]:
    """Format 4 PAN field: M (= length - 12, 0 if shorter), the PAN (left-padded to 12
    digits if shorter), zero nibbles to 32."""
    digits = pan_digits(pan)
    m = max(0, len(digits) - _PAN_FIELD_DIGITS)
    body = [m] + [int(c) for c in digits.rjust(_PAN_FIELD_DIGITS, "0")]
    return body + [0] * (32 - len(body))


# --- nibbles and randomness ------------------------------------------------------------


def _nibbles(data: bytes) -> list[int]:
    return [int(c, 16) for c in data.hex()]


def _pack(nibbles: Sequence[int]) -> bytes:
    return bytes.fromhex("".join(f"{n:X}" for n in nibbles))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _random(rng: Rng, n: int) -> bytes:
    out = bytes(rng(n))
    if len(out) != n:
        raise CryptoError("rng returned the wrong number of bytes")
    return out


def _random_nibbles(rng: Rng, count: int) -> list[int]:
    """``count`` nibbles 0-F: the hex digits of ceil(count/2) random bytes, in order."""
    return _nibbles(_random(rng, (count + 1) // 2))[:count]


def _random_a_to_f(rng: Rng, count: int) -> list[int]:
    """``count`` nibbles A-F, one random byte each: 0xA + byte % 6, bytes >= 252 rejected so
    the six values are equally likely."""
    out: list[int] = []
    for _ in range(64):
        if len(out) == count:
            return out
        out.extend(0xA + b % 6 for b in _random(rng, count - len(out)) if b < 252)
    if len(out) == count:
        return out
    raise CryptoError("rng keeps returning bytes that cannot be used")


def _check_pin(pin: str) -> None:
    if not set(pin) <= _DIGITS:
        raise PinBlockError("pin_digits")
    if not 4 <= len(pin) <= 12:
        raise PinBlockError("pin_length")


# --- PIN blocks --------------------------------------------------------------------------


def _clear_nibbles(algorithm: KeyAlgorithm | None, fmt: PinBlockFormat) -> int:
    """Nibbles in the clear block that gets enciphered for this pair (None: the ISO form)."""
    if fmt == PinBlockFormat.ISO_4:
        if algorithm in (None, KeyAlgorithm.AES_128, KeyAlgorithm.AES_256, KeyAlgorithm.SM4):
            return 32
        raise PinBlockError("unsupported")
    if algorithm in (None, KeyAlgorithm.TDES):
        return 16
    if algorithm == KeyAlgorithm.SM4:
        return 32
    raise PinBlockError("unsupported")


def _pin_field(fmt: PinBlockFormat, pin: str, nibbles: int, rng: Rng) -> list[int]:
    _check_pin(pin)
    head = [_CONTROL[fmt], len(pin)] + [int(c) for c in pin]
    if fmt == PinBlockFormat.ISO_0:
        return head + [0xF] * (nibbles - len(head))
    if fmt == PinBlockFormat.ISO_1:
        return head + _random_nibbles(rng, nibbles - len(head))
    if fmt == PinBlockFormat.ISO_3:
        return head + _random_a_to_f(rng, nibbles - len(head))
    # ISO 4: C N PIN, fill A to nibble 16, then 8 random bytes.
    return head + [0xA] * (16 - len(head)) + _nibbles(_random(rng, 8))


def _encode(fmt: PinBlockFormat, pin: str, pan: str, rng: Rng, nibbles: int) -> bytes:
    field = _pin_field(fmt, pin, nibbles, rng)
    if fmt in (PinBlockFormat.ISO_0, PinBlockFormat.ISO_3):
        field = [a ^ b for a, b in zip(field, _pan_field_03(pan, nibbles), strict=True)]
    return _pack(field)


def encode_pin_block(fmt: PinBlockFormat, pin: str, pan: str, rng: Rng) -> bytes:
    """The clear ISO 9564-1 block: 8 bytes for formats 0/1/3 (PIN field XOR account field
    for 0 and 3), and for format 4 the 16-byte plain-text PIN field only (the PAN enters
    format 4 between its two encipherments). ``pan`` is ignored by format 1."""
    fmt = PinBlockFormat(fmt)
    return _encode(fmt, pin, pan, rng, _clear_nibbles(None, fmt))


def encode_pin_block_for(
    algorithm: KeyAlgorithm, fmt: PinBlockFormat, pin: str, pan: str, rng: Rng
) -> bytes:
    """The clear block exactly as ``encrypt_pin_block`` enciphers it under ``algorithm``:
    ``encode_pin_block`` except that SM4 with formats 0/1/3 gives the 16-byte widened block."""
    algorithm, fmt = KeyAlgorithm(algorithm), PinBlockFormat(fmt)
    return _encode(fmt, pin, pan, rng, _clear_nibbles(algorithm, fmt))


def encrypt_pin_block(
    fmt: PinBlockFormat,
    pin: str,
    pan: str,
    algorithm: KeyAlgorithm,
    key: bytes,
    rng: Rng,
) -> bytes:
    """Encipher a PIN: ECB of the clear block for formats 0/1/3; for format 4 (ISO 9564-1:2017)
    A = E(PIN field), B = A XOR PAN field, block = E(B)."""
    algorithm, fmt = KeyAlgorithm(algorithm), PinBlockFormat(fmt)
    nibbles = _clear_nibbles(algorithm, fmt)
    _require_key(algorithm, key)
    clear = _encode(fmt, pin, pan, rng, nibbles)
    if fmt != PinBlockFormat.ISO_4:
        return ecb_encrypt(algorithm, key, clear)
    intermediate = _xor(ecb_encrypt(algorithm, key, clear), _pack(_pan_field_4(pan)))
    return ecb_encrypt(algorithm, key, intermediate)


def _nibble_ok(fmt: PinBlockFormat, position: int, pin_len: int, value: int) -> bool:
    """Is ``value`` legal at ``position`` of a plain-text PIN field of format 0/1/3?"""
    if position < 2 + pin_len:
        return value <= 9
    if fmt == PinBlockFormat.ISO_0:
        return value == 0xF
    if fmt == PinBlockFormat.ISO_3:
        return value >= 0xA
    return True  # format 1: any fill


def _fault(fmt: PinBlockFormat, field: Sequence[int], pin_len: int) -> str | None:
    for i in range(2, len(field)):
        if not _nibble_ok(fmt, i, pin_len, field[i]):
            return "pin_digits" if i < 2 + pin_len else "padding"
    return None


def _decode_013(fmt: PinBlockFormat, clear: bytes, pan: str) -> str:
    x = _nibbles(clear)
    if x[0] != _CONTROL[fmt]:
        raise PinBlockError("format")
    pin_len = x[1]
    if not 4 <= pin_len <= 12:
        raise PinBlockError("pin_length")
    if fmt == PinBlockFormat.ISO_1:
        field = x
    else:
        field = [a ^ b for a, b in zip(x, _pan_field_03(pan, len(x)), strict=True)]
    reason = _fault(fmt, field, pin_len)
    if reason is None:
        return "".join(str(d) for d in field[2 : 2 + pin_len])
    if fmt != PinBlockFormat.ISO_1:
        pan_start = len(x) - _PAN_FIELD_DIGITS
        outside = all(_nibble_ok(fmt, i, pin_len, x[i]) for i in range(2, pan_start))
        inside = all(
            any(_nibble_ok(fmt, i, pin_len, x[i] ^ d) for d in range(10))
            for i in range(pan_start, len(x))
        )
        if outside and inside:
            raise PinBlockError("pan_mismatch")
    raise PinBlockError(reason)


def _decode_4(field: bytes) -> str:
    x = _nibbles(field)
    if x[0] != _CONTROL[PinBlockFormat.ISO_4]:
        raise PinBlockError("format")
    pin_len = x[1]
    if not 4 <= pin_len <= 12:
        raise PinBlockError("pin_length")
    if any(d > 9 for d in x[2 : 2 + pin_len]):
        raise PinBlockError("pin_digits")
    if any(d != 0xA for d in x[2 + pin_len : 16]):
        raise PinBlockError("padding")
    return "".join(str(d) for d in x[2 : 2 + pin_len])


def decrypt_pin_block(
    fmt: PinBlockFormat,
    block: bytes,
    pan: str,
    algorithm: KeyAlgorithm,
    key: bytes,
) -> str:
    """Decipher and check a PIN block; returns the PIN. Raises PinBlockError whose
    ``reason`` says what is wrong (see the module docstring), CryptoError for a bad key."""
    algorithm, fmt = KeyAlgorithm(algorithm), PinBlockFormat(fmt)
    nibbles = _clear_nibbles(algorithm, fmt)
    _require_key(algorithm, key)
    if fmt in _PAN_BOUND:
        pan_digits(pan)  # a malformed PAN is 'pan', whatever the block holds
    if len(block) != nibbles // 2:
        raise PinBlockError("length")
    if fmt != PinBlockFormat.ISO_4:
        return _decode_013(fmt, ecb_decrypt(algorithm, key, block), pan)
    intermediate = _xor(ecb_decrypt(algorithm, key, block), _pack(_pan_field_4(pan)))
    return _decode_4(ecb_decrypt(algorithm, key, intermediate))


def translate_pin_block(
    block: bytes,
    pan: str,
    src_fmt: PinBlockFormat,
    src_alg: KeyAlgorithm,
    src_key: bytes,
    dst_fmt: PinBlockFormat,
    dst_alg: KeyAlgorithm,
    dst_key: bytes,
    rng: Rng,
) -> bytes:
    """Re-encipher a PIN block from one key/format to another (the PIN stays in here).
    A PAN-bound block (format 0, 3, 4) is never translated to format 1."""
    src_fmt, dst_fmt = PinBlockFormat(src_fmt), PinBlockFormat(dst_fmt)
    if src_fmt in _PAN_BOUND and dst_fmt not in _PAN_BOUND:
        raise PinBlockError("unsupported")
    _clear_nibbles(KeyAlgorithm(dst_alg), dst_fmt)  # refuse before deciphering anything
    pin = decrypt_pin_block(src_fmt, block, pan, src_alg, src_key)
    return encrypt_pin_block(dst_fmt, pin, pan, dst_alg, dst_key, rng)


# --- PIN verification --------------------------------------------------------------------


def _lv(value: bytes) -> bytes:
    if not 0 < len(value) <= 255:
        raise CryptoError("field must be 1..255 bytes")
    return bytes([len(value)]) + value


def pin_verification_value(algorithm: KeyAlgorithm, pvk: bytes, pan: str, pin: str) -> bytes:
    """8-byte PVV: leftmost 8 bytes of MAC_PVK("medclear-pvv-v1" || LV(PAN digits) ||
    LV(PIN)), MAC as ``generate_mac``. Why not IBM 3624 / Visa PVV: see the module docstring."""
    _check_pin(pin)
    message = _PVV_TAG + _lv(pan_digits(pan).encode("ascii")) + _lv(pin.encode("ascii"))
    return generate_mac(algorithm, pvk, message)[:_PVV_BYTES]


def verify_pin(algorithm: KeyAlgorithm, pvk: bytes, pan: str, pin: str, pvv: bytes) -> bool:
    """Constant-time comparison with a stored PVV. False (not an error) for a malformed PIN
    or PAN; CryptoError only for a PVK of the wrong length."""
    try:
        expected = pin_verification_value(algorithm, pvk, pan, pin)
    except PinBlockError:
        return False
    return hmac.compare_digest(expected, bytes(pvv))


# --- MACs ----------------------------------------------------------------------------------


def retail_mac(key: bytes, padded: bytes) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 3 core over already padded data (multiple of 8 bytes):
    CBC-DES under K1 (zero IV) for blocks 1..q-1, full TDES on block q XOR the chain."""
    _require_key(KeyAlgorithm.TDES, key)
    if not padded or len(padded) % 8:
        raise CryptoError("retail MAC input must be a non-empty multiple of 8 bytes")
    chain = _des_cbc_mac_prefix(key[:8], padded[:-8])
    return ecb_encrypt(KeyAlgorithm.TDES, key, _xor(padded[-8:], chain))


def _pad_method_2(data: bytes, block: int) -> bytes:
    padded = data + b"\x80"
    return padded + bytes(-len(padded) % block)


def generate_mac(algorithm: KeyAlgorithm, key: bytes, data: bytes) -> bytes:
    """TDES: ISO 9797-1 MAC algorithm 3 with padding method 2, 8 bytes. AES/SM4: CMAC
    (NIST SP 800-38B), 16 bytes."""
    algorithm = KeyAlgorithm(algorithm)
    if algorithm == KeyAlgorithm.TDES:
        return retail_mac(key, _pad_method_2(data, 8))
    return _cmac(algorithm, key, data)


def verify_mac(algorithm: KeyAlgorithm, key: bytes, data: bytes, mac: bytes) -> bool:
    """Constant-time check of a MAC or of its leftmost >= 8 bytes (shorter: False)."""
    expected = generate_mac(algorithm, key, data)
    if not MAC_MIN_BYTES <= len(mac) <= len(expected):
        return False
    return hmac.compare_digest(expected[: len(mac)], bytes(mac))


# --- card keys and cryptograms -------------------------------------------------------------


def _odd_parity(key: bytes) -> bytes:
    return bytes(b ^ 1 if bin(b).count("1") % 2 == 0 else b for b in key)


def derive_card_key(algorithm: KeyAlgorithm, master_key: bytes, card_no: str) -> bytes:
    """Per-card key from a card master key, EMV Option A style (see module docstring).
    ``card_no`` may also be a numeric PAN."""
    algorithm = KeyAlgorithm(algorithm)
    _require_key(algorithm, master_key)
    y = bytes.fromhex(pan_digits(card_no)[-16:].rjust(16, "0"))
    not_y = bytes(b ^ 0xFF for b in y)
    if algorithm == KeyAlgorithm.TDES:
        return _odd_parity(ecb_encrypt(algorithm, master_key, y + not_y))
    key = ecb_encrypt(algorithm, master_key, y + not_y)
    if algorithm == KeyAlgorithm.AES_256:
        key += ecb_encrypt(algorithm, master_key, not_y + y)
    return key


def _cryptogram_data(challenge: bytes, amount_fen: int, terminal_id: str, counter: int) -> bytes:
    if not 0 <= amount_fen < 2**63:
        raise CryptoError("amount must be 0 .. 2**63-1 fen")
    if not 0 <= counter < 2**32:
        raise CryptoError("counter must fit 32 bits")
    return (
        _CRYPTOGRAM_TAG
        + _lv(bytes(challenge))
        + amount_fen.to_bytes(8, "big")
        + _lv(terminal_id.encode("utf-8"))
        + counter.to_bytes(4, "big")
    )


def card_cryptogram(
    algorithm: KeyAlgorithm,
    card_key: bytes,
    challenge: bytes,
    amount_fen: int,
    terminal_id: str,
    counter: int,
) -> bytes:
    """8-byte cryptogram: leftmost 8 bytes of ``generate_mac`` under the card key over the
    canonical encoding of the fields (module docstring)."""
    data = _cryptogram_data(challenge, amount_fen, terminal_id, counter)
    return generate_mac(algorithm, card_key, data)[:_CRYPTOGRAM_BYTES]


def verify_card_cryptogram(
    algorithm: KeyAlgorithm,
    card_key: bytes,
    challenge: bytes,
    amount_fen: int,
    terminal_id: str,
    counter: int,
    cryptogram: bytes,
) -> bool:
    """Constant-time check; False for malformed fields."""
    try:
        expected = card_cryptogram(algorithm, card_key, challenge, amount_fen, terminal_id, counter)
    except CryptoError:
        if not key_length_ok(algorithm, card_key):
            raise
        return False
    return hmac.compare_digest(expected, bytes(cryptogram))


# --- digest --------------------------------------------------------------------------------


def sm3(data: bytes) -> bytes:
    """SM3 (GB/T 32905-2016), 32 bytes."""
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()
