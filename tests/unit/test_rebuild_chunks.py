"""How `aggregates rebuild` cuts the businesses into chunks (figures.plan_chunks)."""

from __future__ import annotations

import uuid

from cdc_dashboard.figures.rebuild import plan_chunks

IDS = [uuid.UUID(int=i) for i in range(1, 11)]


def sizes(*rows: int) -> list[tuple[uuid.UUID, int]]:
    return list(zip(IDS, rows, strict=False))


def rows_of(chunks: list[list[tuple[uuid.UUID, int]]]) -> list[list[int]]:
    return [[n for _, n in chunk] for chunk in chunks]


def test_bounded_by_businesses_and_by_rows_in_order() -> None:
    assert rows_of(plan_chunks(sizes(1, 1, 1, 1, 1), max_businesses=2, max_rows=100)) == [[1, 1], [1, 1], [1]]
    assert rows_of(plan_chunks(sizes(4, 4, 4, 1, 9), max_businesses=10, max_rows=9)) == [[4, 4], [4, 1], [9]]
    flat = [b for chunk in plan_chunks(sizes(3, 0, 5, 2, 7, 1), max_businesses=3, max_rows=8) for b, _ in chunk]
    assert flat == IDS[:6]  # every business once, in the order given


def test_a_business_larger_than_a_chunk_is_a_chunk_of_its_own() -> None:
    assert rows_of(plan_chunks(sizes(1, 500, 2, 3), max_businesses=10, max_rows=10)) == [[1], [500], [2, 3]]


def test_nothing_to_rebuild() -> None:
    assert plan_chunks([], max_businesses=10, max_rows=10) == []
