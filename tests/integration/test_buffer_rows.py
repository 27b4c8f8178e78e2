"""``buffer.rows: object_store``: the replay-buffer actor keeps stubs and hands out references; the
rows a learner resolves, the checkpoint file and the rules (FIFO, duplicates, staleness) are those of
``buffer.rows: actor``. On a real local Ray cluster."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.replay_buffer import ReplayBuffer, RowRefs, resolve_rows
from kd.data import BUFFER_SCHEMA

pytestmark = pytest.mark.usefixtures("ray_cluster")


def rows(start: int, n: int, version: int = 0) -> pa.Table:
    """``n`` rows whose prompt ids and token ids identify them (p<start>, ...)."""
    ids = range(start, start + n)
    return pa.Table.from_pylist([{
        "prompt_id": f"p{i}", "prompt_ids": [1, i], "teacher_prompt_ids": [1, i], "chosen_ids": [i, i + 1],
        "rejected_ids": [i + 2], "chosen_teacher_logps": [-1.0, -2.0], "rejected_teacher_logps": [-0.5],
        "chosen_topk_ids": [[i, 3], [i + 1, 3]], "chosen_topk_logps": [[-1.0, -3.0], [-2.0, -3.0]],
        "rejected_topk_ids": [[i + 2, 3]], "rejected_topk_logps": [[-0.5, -1.0]],
        "rejected_behaviour_logps": [-0.7], "policy_version": version, "priming": "none",
        "created_at": 0.0, "reference_answer": None} for i in ids], schema=BUFFER_SCHEMA)


def add_ref(buf, table: pa.Table, request_id: str):
    """As the producer does: the rows' ref inside a list (not fetched by the buffer), meta beside it."""
    meta = {"prompt_id": table.column("prompt_id").to_pylist(),
            "policy_version": table.column("policy_version").to_pylist(), "nbytes": table.nbytes}
    return ray.get(buf.add_ref.remote(meta, [ray.put(table)], None, request_id))


def new_buffer(rows_mode: str, capacity: int = 16, lag: int = 1):
    return ray.remote(ReplayBuffer).options(num_cpus=0).remote(capacity, lag, "fifo", 0, rows_mode)


def test_object_store_rows_round_trip_and_follow_the_buffer_rules(tmp_path):
    buf = new_buffer("object_store")
    first, second = rows(0, 3), rows(3, 4)
    assert add_ref(buf, first, "r0") == 3
    assert add_ref(buf, second, "r1") == 4
    assert add_ref(buf, first, "r0") == 0  # a re-sent request: nothing added

    batch = ray.get(buf.sample.remote(5, 0))
    assert isinstance(batch, RowRefs) and [len(r) for _, r in batch] == [3, 2]  # two source tables
    got = resolve_rows(batch)
    expected = pa.concat_tables([first, second]).slice(0, 5)  # FIFO: the oldest five
    assert got.to_pylist() == expected.to_pylist()

    stats = ray.get(buf.stats.remote())
    assert (stats["size"], stats["inserted"], stats["consumed"], stats["duplicates_dropped"]) == (7, 7, 5, 3)
    assert stats["rows"] == "object_store"
    assert stats["bytes"] == pytest.approx(first.nbytes + second.nbytes, rel=0.01)
    assert stats["actor_bytes"] < stats["bytes"] / 2  # the actor holds stubs only

    # the checkpoint file holds the full rows (read back with pyarrow's own reader) ...
    path = tmp_path / "buffer.parquet"
    assert ray.get(buf.save.remote(str(path))) == 7
    on_disk = pq.read_table(path)
    assert on_disk.drop_columns(["_uses"]).to_pylist() == pa.concat_tables([first, second]).to_pylist()
    assert on_disk.column("_uses").to_pylist() == [1] * 5 + [0] * 2

    # ... and loads into either kind of buffer, which then hands out the two unconsumed rows
    for mode in ("actor", "object_store"):
        other = new_buffer(mode)
        assert ray.get(other.load.remote(str(path))) == 7
        assert resolve_rows(ray.get(other.sample.remote(2, 0))).to_pylist() == second.slice(2).to_pylist()
        assert ray.get(other.stats.remote())["duplicates_dropped"] == 3
        ray.kill(other)

    # stale rows go, and with them the buffer's references
    ray.get(buf.set_version.remote(5))  # rows of version 0 are beyond max_policy_lag=1
    stats = ray.get(buf.stats.remote())
    assert stats["size"] == 0 and stats["bytes"] == 0
    assert ray.get(buf.__ray_call__.remote(lambda self: len(self.refs))) == 0
    ray.kill(buf)


def test_actor_mode_is_unchanged_and_add_of_a_table_works_in_both():
    for mode in ("actor", "object_store"):
        buf = new_buffer(mode)
        t = rows(10, 4, version=-1)  # offline rows (never stale) added as a table
        assert ray.get(buf.add.remote(t, None, "offline:0:0")) == 4
        batch = ray.get(buf.sample.remote(4, 3))
        assert isinstance(batch, RowRefs) == (mode == "object_store")
        assert resolve_rows(batch).to_pylist() == t.to_pylist()
        ray.kill(buf)
