"""Every bound of the domain, named. Units are the last word of each name."""

from __future__ import annotations

PHARMACY_SWIPES_PER_DAY_DEFAULT = 2  # per card per Asia/Shanghai calendar day
PHARMACY_SWIPES_PER_DAY_MAX = 20  # what a service point may set a card to
PIN_TRIES_MAX = 3  # consecutive wrong PINs that lock a card

AMOUNT_FEN_MAX = 10_000_000  # one swipe or credit: 100,000.00 yuan
BALANCE_FEN_MAX = 1_000_000_000  # 10,000,000.00 yuan: far above any real account

REQUEST_IDS_REMEMBERED_MAX = 64  # replies kept per person for idempotent repeats
REQUEST_ID_MEMORY_MS = 7 * 24 * 3600 * 1000  # ... and for at most this long
SWIPES_REMEMBERED_MAX = 256  # approved swipes kept per person for reversal and refund
CREDIT_SOURCES_REMEMBERED_MAX = 64  # allocation source ids kept per person
CARDS_PER_PERSON_MAX = 16
TEMPORARY_CARD_VALIDITY_MS = 365 * 24 * 3600 * 1000  # a temporary card is valid one year

ID_CHARS_MAX = 64  # request, terminal, institution, window and source ids
NAME_CHARS_MAX = 30  # EF06 tag 09
PHONE_CHARS = 11  # a mainland mobile number, without the country code
REASON_CHARS_MAX = 200  # why a window operation was done (recorded with it)
REGION_CHARS_MAX = 32  # a region code (selects the pre-loss policy)
CARD_NO_CHARS = 9  # EF05 tag 07
SSN_CHARS = 18  # EF06 tag 08
PVV_BYTES = 8  # a PIN verification value from the HSM (hsm_sim/crypto.py)

SHANGHAI_UTC_OFFSET_MS = 8 * 3600 * 1000  # China keeps UTC+8 all year (no DST since 1991)
DAY_MS = 24 * 3600 * 1000
