"""A deterministic synthetic city: persons, cards and opening balances from a seed.

Used by `medclear seed`, the demo and the benchmarks. Identical seeds give identical
cities, so a run can be replayed.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass

from clearing.codes import COLOUR_OF_CATEGORY, InsuranceCategory
from clearing.validate import ssn_check_char

SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡"
    "余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯"
    "龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
GIVEN = (
    "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉兰萍建华红梅鑫波斌宇浩凯"
    "健俊帆帅旭宁欣怡佳琪雪晨阳"
)
REGION_CODE = "310101"  # a district code, the first six digits of an id (tests, drills)
CITY_REGION_PREFIX = "3102"  # a city's district is this and its seed mod 100: 310200-310299


@dataclass(frozen=True)
class Resident:
    ssn: str
    name: str
    category: InsuranceCategory
    phone: str
    card_no: str
    opening_balance_fen: int
    pin: str = "000000"  # what the cardholder types; only ever sent as a PIN block


def category_of(roll: float) -> InsuranceCategory:
    """The city's mix for a roll in [0, 1): 80 % employees, 15 % residents, 5 % special."""
    if roll < 0.80:
        return InsuranceCategory.EMPLOYEE
    return InsuranceCategory.RESIDENT if roll < 0.95 else InsuranceCategory.SPECIAL


def city_region(seed: int) -> str:
    """The district code of the city of `seed`. Cities whose seeds differ mod 100 share no
    ssn and no card number (cards are numbered S<seed mod 100><index>), so several can be
    seeded on one stack; none shares its district with the drills' and tests' persons."""
    return f"{CITY_REGION_PREFIX}{seed % 100:02d}"


def make_ssn(rng: random.Random, index: int, region: str = REGION_CODE) -> str:
    year = rng.randint(1940, 2005)
    month = rng.randint(1, 12)
    day = rng.randint(1, 28)
    seq = index % 1000
    first17 = f"{region}{year:04d}{month:02d}{day:02d}{seq:03d}"
    return first17 + ssn_check_char(first17)


def residents(count: int, seed: int = 2026) -> list[Resident]:
    """`count` residents; 80% employees (blue), 15% residents (green), 5% special (red)."""
    rng = random.Random(seed)
    result: list[Resident] = []
    seen: set[str] = set()
    region = city_region(seed)
    for index in range(count):
        ssn = make_ssn(rng, index, region)
        while ssn in seen:
            ssn = make_ssn(rng, index, region)
        seen.add(ssn)
        category = category_of(rng.random())
        name = rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.randint(1, 2)))
        phone = f"1{rng.choice('3456789')}{rng.randint(0, 999_999_999):09d}"
        card_no = f"S{seed % 100:02d}{index:06d}"
        balance = rng.randint(50_00, 5_000_00) if category == InsuranceCategory.EMPLOYEE else 0
        pin = f"{rng.randrange(10**6):06d}"
        result.append(Resident(ssn, name, category, phone, card_no, balance, pin))
    return result


CARDS_CSV_COLUMNS = (
    "card_no",
    "colour",
    "category",
    "pin",
    "opening_balance_yuan",
    "ssn",
    "name",
    "phone",
)


def cards_csv(residents: list[Resident]) -> str:
    """The city's cards as a CSV a person can try them with: card, colour (only BLUE pays
    from a personal account), the PIN, the opening balance, and whose card it is."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CARDS_CSV_COLUMNS)
    for r in residents:
        yuan = f"{r.opening_balance_fen // 100}.{r.opening_balance_fen % 100:02d}"
        writer.writerow(
            (
                r.card_no,
                COLOUR_OF_CATEGORY[r.category].name,
                r.category.name,
                r.pin,
                yuan,
                r.ssn,
                r.name,
                r.phone,
            )
        )
    return out.getvalue()
