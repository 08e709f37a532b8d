"""Lanes by the rows a request touches, and the one notion of "the same row"."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from processor.contract import DeleteRequest, RelatedEntity, UpdateRequest
from processor.db.registry import Column, Entity, Registry
from processor.engine.engine import round_numbers, rows_of
from processor.worker import lanes


def _registry() -> Registry:
    integer = Column("id", "integer", "integer", "N", False)
    uuid_key = Column("id", "uuid", "uuid", "U", False)
    text = Column("name", "text", "text", "S", True)
    return Registry(
        {
            "account": Entity(
                "account", "app", "account", integer, None, True, "AlwaysOverwrite", {"name": text}
            ),
            "device": Entity(
                "device", "app", "device", uuid_key, None, True, "AlwaysOverwrite", {"name": text}
            ),
        }
    )


def test_a_uuid_spelled_two_ways_is_one_row() -> None:
    registry = _registry()
    lower = DeleteRequest(
        request_id="a", entity="device", id="0e6f1ad0-2b7c-4c1a-9e55-3c2a7d1f4b10"
    )
    upper = DeleteRequest(
        request_id="b", entity="device", id="{0E6F1AD0-2B7C-4C1A-9E55-3C2A7D1F4B10}"
    )
    assert rows_of(registry, lower) == rows_of(registry, upper)


def test_related_rows_count_and_unparsable_keys_stay_as_sent() -> None:
    registry = _registry()
    request = UpdateRequest(
        request_id="a",
        entity="account",
        id=7,
        attributes={"name": "x"},
        related=[
            RelatedEntity(entity="device", id="not-a-uuid", attributes={"name": "y"}),
            RelatedEntity(entity="nope", id=3, attributes={"name": "z"}),
        ],
    )
    assert rows_of(registry, request) == [("account", 7), ("device", "not-a-uuid"), ("nope", 3)]


def test_round_numbers_follow_each_rows_order() -> None:
    a, b, c = ("e", 1), ("e", 2), ("e", 3)
    assert round_numbers([[a], [b], [a], [a, c], [c], [b]]) == [0, 0, 1, 2, 3, 1]


def test_requests_sharing_a_row_directly_or_through_a_chain_share_a_lane() -> None:
    items = ["x1", "y1", "xy", "z1", "yz", "w1", "w2", "v1"]
    rows = [["x"], ["y"], ["x", "y"], ["z"], ["y", "z"], ["w"], ["w"], ["v"]]
    result = lanes.split(items, rows, 3)
    assert ["x1", "y1", "xy", "z1", "yz"] in result  # one chain, in batch order
    assert sorted(i for lane in result for i in lane) == sorted(items)
    assert len(result) == 3


def test_disjoint_rows_spread_over_the_lanes_evenly() -> None:
    items = list(range(100))
    result = lanes.split(items, [[i] for i in items], 4)
    assert [len(lane) for lane in result] == [25, 25, 25, 25]
    assert all(lane == sorted(lane) for lane in result)


@given(
    st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=3), max_size=60),
    st.integers(1, 6),
)
def test_every_item_once_no_row_on_two_lanes_and_batch_order_kept(
    rows: list[list[int]], count: int
) -> None:
    items = list(range(len(rows)))
    result = lanes.split(items, rows, count)
    assert sorted(i for lane in result for i in lane) == items
    assert len(result) <= count
    seen: dict[int, int] = {}
    for n, lane in enumerate(result):
        assert lane == sorted(lane)
        for i in lane:
            for row in rows[i]:
                assert seen.setdefault(row, n) == n, f"row {row} on lanes {seen[row]} and {n}"


def test_the_split_is_deterministic() -> None:
    rng = random.Random(3)
    rows = [[rng.randrange(50)] for _ in range(500)]
    assert lanes.split(list(range(500)), rows, 4) == lanes.split(list(range(500)), rows, 4)


def test_rows_of_an_execute_request_are_its_requests_rows() -> None:
    """The lanes and the rounds see a batch as touching every row its requests touch."""
    from processor.contract import decode_request
    from processor.db.registry import Registry
    from processor.engine.engine import rows_of

    batch = decode_request(
        b'{"type":"execute_multiple","request_id":"b","requests":['
        b'{"type":"update","request_id":"1","entity":"a","id":1,"attributes":{"x":1},'
        b'"related":[{"entity":"b","id":"k","attributes":{"y":1}}]},'
        b'{"type":"delete","request_id":"2","entity":"a","id":2},'
        b'{"type":"retrieve","request_id":"3","entity":"a","id":1}]}'
    )
    assert rows_of(Registry({}), batch) == [("a", 1), ("b", "k"), ("a", 2)]
    meta = decode_request(b'{"type":"retrieve_entity","request_id":"m","entity":"a"}')
    assert rows_of(Registry({}), meta) == []


def test_a_small_batch_takes_one_lane_and_a_large_one_all_configured() -> None:
    assert lanes.lane_count(0, 4) == 1
    assert lanes.lane_count(lanes.LANE_MIN_REQUESTS * 2 - 1, 4) == 1
    assert lanes.lane_count(lanes.LANE_MIN_REQUESTS * 2, 4) == 2
    assert lanes.lane_count(lanes.LANE_MIN_REQUESTS * 100, 4) == 4
    assert lanes.lane_count(lanes.LANE_MIN_REQUESTS * 100, 1) == 1
