"""The pure parts of `medclear bench state`: the bench city, its fast changelog records
(byte-identical to what core.handle leaves), partitions, and the doc section."""

from __future__ import annotations

from pathlib import Path

from aiokafka.partitioner import DefaultPartitioner

from clearing import codec, validate
from clearing.codes import InsuranceCategory
from medclear.bench import state
from medclear.bench.city import (
    BIRTH_DAYS,
    CATEGORIES,
    MAX_PERSONS,
    City,
    genuine_person,
    holder,
    partition_of,
    seed_store,
)
from medclear.infra.policy import load_policy
from medclear.infra.settings import Settings
from stream_jobs import worker
from stream_runtime.store import PartitionStore


def test_holders_are_valid_and_unique() -> None:
    indices = [*range(3000), BIRTH_DAYS - 1, BIRTH_DAYS, 2_899_999, MAX_PERSONS - 1]
    holders = [holder(i) for i in indices]
    assert len({h.ssn for h in holders}) == len(holders)
    assert len({h.card_no for h in holders}) == len(holders)
    for h in holders:
        assert validate.is_ssn(h.ssn) and validate.is_card_no(h.card_no)
        assert validate.is_name(h.name) and validate.is_phone(h.phone)
        assert (h.balance_fen > 0) == (h.category == InsuranceCategory.EMPLOYEE)
    assert holder(17) == holder(17)  # from (seed, index) alone


def test_template_records_equal_the_cores() -> None:
    city = City(load_policy(Settings()), at_ms=1_795_000_000_123)
    seen = set()
    for i in [*range(400), 2_899_999]:
        h, value = city.record(i)
        seen.add(h.category)
        assert value == codec.encode(genuine_person(h, city.policy, city.at_ms))
    assert seen == set(CATEGORIES)
    person = codec.decode(city.record(5)[1])
    assert person.ssn == holder(5).ssn and person.cards[0].pvv == holder(5).pvv


def test_partition_is_the_default_partitioners() -> None:
    every = list(range(6))
    for i in range(500):
        key = holder(i).ssn.encode()
        assert partition_of(key, 6) == DefaultPartitioner()(key, every, every)


def test_doc_section_is_replaced_and_keeps_other_rows(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(
        "# Performance\n\n<!-- bench:pipeline:begin -->\nother\n<!-- bench:pipeline:end -->\n"
    )
    first = [state.Run("memory", 1000), state.Run("rocksdb", 1000)]
    state.write_doc(state._markdown(first, state.earlier_rows(doc), "cmd", "machine"), doc)
    assert len(state.earlier_rows(doc)) == 2
    second = [state.Run("rocksdb", 1000, recovery_s=7.5), state.Run("rocksdb", 5000)]
    state.write_doc(state._markdown(second, state.earlier_rows(doc), "cmd", "machine"), doc)
    rows = state.earlier_rows(doc)
    assert [state._row_id(r) for r in rows] == [
        ("memory", "1,000"),
        ("rocksdb", "1,000"),
        ("rocksdb", "5,000"),
    ]
    assert "| 7.5 |" in rows[1]
    text = doc.read_text()
    assert text.count(state.BEGIN) == 1 and "other" in text  # the other section untouched


def test_seed_store_writes_the_layout_the_worker_reads(tmp_path: Path) -> None:
    """`--direct`: every person lands in the store of the partition its commands arrive
    on, in the runtime's layout for worker-0's persons table."""
    settings = Settings(state_dir=tmp_path / ".medclear", command_partitions=3)
    city = City(load_policy(settings), at_ms=1_795_000_000_123)
    progress: list[int] = []
    result = seed_store(settings, city, 25, progress.append)
    assert result.persons == 25 == sum(progress)
    base = worker.data_dir(settings, 0) / worker.PERSONS_TABLE
    stores = [PartitionStore(base / str(p)) for p in range(3)]
    try:
        for i in range(25):
            h, value = city.record(i)
            key = h.ssn.encode()
            home = partition_of(key, 3)
            assert stores[home].get(key) == value
            assert all(stores[p].get(key) is None for p in range(3) if p != home)
        # the stored changelog offset is 0: the worker reads its (empty) changelog from the start
        assert all(store.next_offset == 0 for store in stores)
        records = [city.record(i) for i in range(25)]
        assert result.changelog_bytes == sum(len(h.ssn) + len(v) for h, v in records)
    finally:
        for store in stores:
            store.close()
