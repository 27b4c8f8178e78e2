"""BufferCore semantics: capacity, FIFO eviction of consumed rows, staleness, sampling modes."""

import pyarrow as pa
import pytest

from actors.replay_buffer import BufferCore
from kd.data import BUFFER_SCHEMA


def rows(n: int, version: int = 0, start: int = 0) -> pa.Table:
    return pa.Table.from_pydict({
        "prompt_id": [f"p{start + i}" for i in range(n)],
        "prompt_ids": [[1, 2]] * n, "teacher_prompt_ids": [[1, 2]] * n,
        "chosen_ids": [[3]] * n, "rejected_ids": [[4]] * n,
        "chosen_teacher_logps": [[-0.5]] * n, "rejected_teacher_logps": [[-1.5]] * n,
        "chosen_topk_ids": [None] * n, "chosen_topk_logps": [None] * n,
        "rejected_topk_ids": [None] * n, "rejected_topk_logps": [None] * n,
        "rejected_behaviour_logps": [[-1.0]] * n, "policy_version": [version] * n,
        "priming": ["none"] * n, "created_at": [0.0] * n, "reference_answer": [None] * n, "teacher_name": [None] * n,
        "chosen_teacher_logp_sum": [None] * n, "rejected_teacher_logp_sum": [None] * n,
    }, schema=BUFFER_SCHEMA)


def ids(table):
    return table.column("prompt_id").to_pylist()


def test_fifo_hands_out_each_row_once_in_order():
    b = BufferCore(capacity=10, max_policy_lag=5)
    b.add(rows(6))
    assert ids(b.sample(4, 0)) == ["p0", "p1", "p2", "p3"]
    assert b.sample(4, 0) is None  # only 2 unconsumed left
    assert ids(b.sample(2, 0)) == ["p4", "p5"]
    assert b.stats()["consumed"] == 6


def test_capacity_evicts_oldest_consumed_and_refuses_unconsumed():
    b = BufferCore(capacity=4, max_policy_lag=5)
    b.add(rows(4))
    assert b.room() == 0
    with pytest.raises(ValueError, match="do not fit"):
        b.add(rows(1, start=4))
    b.sample(2, 0)  # p0, p1 consumed -> evictable
    assert b.room() == 2
    b.add(rows(2, start=4))
    assert len(b) == 4 and b.stats()["evicted"] == 2
    assert ids(b.table) == ["p2", "p3", "p4", "p5"]


def test_stale_rows_are_never_handed_out_and_are_counted():
    b = BufferCore(capacity=10, max_policy_lag=1)
    b.add(rows(3, version=0))
    b.add(rows(2, version=2, start=3))
    assert b.sample(3, current_version=2) is None  # version 0 rows are 2 behind > lag 1
    s = b.stats()
    assert s["dropped_stale"] == 3 and s["size"] == 2
    out = b.sample(2, current_version=2)
    assert set(out.column("policy_version").to_pylist()) == {2}


def test_offline_rows_never_go_stale():
    b = BufferCore(capacity=10, max_policy_lag=0)
    b.add(rows(3, version=-1))
    assert b.sample(3, current_version=100) is not None
    assert b.stats()["mean_policy_lag"] == 0.0


def test_uniform_reuses_rows_and_reports_lag():
    b = BufferCore(capacity=10, max_policy_lag=3, sampling="uniform", seed=1)
    b.add(rows(4, version=1))
    first, second = b.sample(3, 2), b.sample(3, 2)
    assert first.num_rows == second.num_rows == 3
    assert b.stats()["mean_policy_lag"] == pytest.approx(1.0)
    assert b.stats()["consumed"] == 6


def test_rows_keep_their_schema():
    b = BufferCore(capacity=10, max_policy_lag=3)
    b.add(rows(2))
    assert b.sample(2, 0).schema.equals(BUFFER_SCHEMA)


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        BufferCore(capacity=0, max_policy_lag=1)
    with pytest.raises(ValueError, match="sampling"):
        BufferCore(capacity=1, max_policy_lag=1, sampling="lifo")


def test_save_load_round_trip(tmp_path):
    b = BufferCore(capacity=10, max_policy_lag=2, sampling="fifo")
    b.add(rows(5, version=1))
    b.sample(2, 1)
    path = tmp_path / "buf" / "buffer.parquet"
    assert b.save(path) == 5
    assert not list(path.parent.glob(".*tmp"))  # no temporary left behind
    c = BufferCore(capacity=10, max_policy_lag=2, sampling="fifo")
    assert c.load(path) == 5
    assert c.table.equals(b.table)
    assert c.uses.tolist() == b.uses.tolist() and c.versions.tolist() == b.versions.tolist()
    drop_bytes = lambda d: {k: v for k, v in d.items() if k != "bytes"}  # noqa: E731  (layout-dependent)
    assert drop_bytes(c.stats()) == drop_bytes(b.stats())
    # both continue identically
    assert ids(c.sample(3, 1)) == ids(b.sample(3, 1)) == ["p2", "p3", "p4"]


def test_load_rejects_other_parquet(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(rows(2), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a raykd replay-buffer file"):
        BufferCore(capacity=4, max_policy_lag=1).load(tmp_path / "x.parquet")


def test_clear_keeps_counters():
    b = BufferCore(capacity=10, max_policy_lag=2)
    b.add(rows(4))
    assert b.clear() == 4 and len(b) == 0 and b.stats()["inserted"] == 4


def test_force_goes_over_capacity_only_when_asked():
    b = BufferCore(capacity=4, max_policy_lag=5)
    b.add(rows(4))
    with pytest.raises(ValueError, match="do not fit"):
        b.add(rows(2, start=4))
    b.sample(1, 0)
    assert b.add(rows(2, start=4), force=True) == 2  # evicts the consumed row, then goes over
    assert len(b) == 5 and ids(b.table)[0] == "p1"


def test_a_resent_request_is_added_once_even_after_save_load(tmp_path):
    b = BufferCore(capacity=10, max_policy_lag=5)
    assert b.add(rows(2), request_id="0:p0,p1") == 2
    assert b.add(rows(2), request_id="0:p0,p1") == 0  # the producer re-sent it after an error
    assert len(b) == 2 and b.stats()["duplicates_dropped"] == 2
    b.save(tmp_path / "b.parquet")
    c = BufferCore(capacity=10, max_policy_lag=5)
    c.load(tmp_path / "b.parquet")
    assert c.add(rows(2), request_id="0:p0,p1") == 0 and c.add(rows(2, start=2), request_id="0:p2,p3") == 2


@pytest.mark.parametrize("consumed_mask, expect", [
    ([1, 1, 1, 1, 1, 1, 0, 0], ["p4", "p5", "p6", "p7"]),  # oldest consumed go: back to 4/4, not 8/4
    ([1, 1, 0, 0, 0, 0, 0, 0], ["p2", "p3", "p4", "p5", "p6", "p7"]),  # unconsumed rows always stay
    ([0, 0, 0, 0, 0, 0, 0, 0], ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]),
    ([0, 1, 0, 1, 0, 1, 0, 1], ["p0", "p2", "p4", "p6"]),
])
def test_shrink_to_capacity_evicts_only_consumed_rows(consumed_mask, expect):
    """Draining producers before a checkpoint adds with force (overflow mode): when overflow ends,
    consumed rows go (oldest first) down to capacity."""
    b = BufferCore(capacity=4, max_policy_lag=5)
    b.add(rows(4))
    b.add(rows(4, start=4), force=True)
    b.uses[:] = consumed_mask
    b.shrink_to_capacity()
    assert ids(b.table) == expect and len(b.versions) == len(b.uses) == len(expect)


def test_rows_over_capacity_are_evicted_as_soon_as_they_are_consumed():
    b = BufferCore(capacity=4, max_policy_lag=5)
    b.add(rows(4))
    b.add(rows(4, start=4), force=True)  # 8/4, all unconsumed
    assert ids(b.sample(2, 0)) == ["p0", "p1"] and len(b) == 6
    assert ids(b.sample(4, 0)) == ["p2", "p3", "p4", "p5"] and len(b) == 4
    assert b.stats()["evicted"] == 4


def test_a_saved_buffer_over_capacity_loads_within_capacity(tmp_path):
    b = BufferCore(capacity=8, max_policy_lag=5)
    b.add(rows(8))
    b.sample(6, 0)
    b.save(tmp_path / "b.parquet")
    small = BufferCore(capacity=4, max_policy_lag=5)
    small.load(tmp_path / "b.parquet")
    assert len(small) == 4 and ids(small.table) == ["p4", "p5", "p6", "p7"]
    assert small.stats()["evicted"] == 4
