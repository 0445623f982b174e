"""What the stack decides about its Kafka nodes before any JVM starts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medclear.stack import kafka

ID_CHARS = 22  # 16 bytes in URL-safe base64, unpadded: Kafka's own form


def test_the_nodes_of_a_new_cluster_asking_at_once_get_one_cluster_id(tmp_path: Path) -> None:
    """start_nodes formats every node side by side; once, two of them made two ids and the
    second node never joined (INCONSISTENT_CLUSTER_ID, found by the broker-kill drill)."""
    for attempt in range(20):
        base = tmp_path / str(attempt)
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = set(pool.map(kafka.cluster_id, [base] * 8))
        (only,) = ids
        assert len(only) == ID_CHARS and not only.startswith("-")
        assert [p.name for p in base.iterdir()] == ["cluster.id"]  # nothing left aside
        assert kafka.cluster_id(base) == only  # kept
