"""The synthetic city of `medclear seed`: deterministic, and cities of different seeds can
share one stack."""

from __future__ import annotations

from clearing.validate import is_ssn
from medclear.sim.city import REGION_CODE, city_region, residents


def test_the_same_seed_gives_the_same_city() -> None:
    assert residents(300, seed=7) == residents(300, seed=7)


def test_cities_of_different_seeds_share_no_ssn_and_no_card() -> None:
    first, second = residents(3_000, seed=2026), residents(3_000, seed=7)
    assert not {r.ssn for r in first} & {r.ssn for r in second}
    assert not {r.card_no for r in first} & {r.card_no for r in second}
    for city in (first, second):
        assert len({r.ssn for r in city}) == len(city)
        assert all(is_ssn(r.ssn) for r in city)
    # nor with the persons of the drills and tests, which use REGION_CODE
    assert all(not r.ssn.startswith(REGION_CODE) for r in first + second)
    assert {r.ssn[:6] for r in first} == {city_region(2026)}
