"""ReplayBuffer: the one place producers (teachers, samplers) and learners meet.

Rows are Arrow (``kd.data.BUFFER_SCHEMA``), kept as one ``pyarrow.Table`` plus two numpy columns of
bookkeeping (policy version, times handed out), so nothing on the hot path is a per-row Python object.

Semantics:
- ``capacity``: rows held at most. Room is made by evicting the oldest rows that have already been
  handed to a learner (FIFO). When every held row is still unconsumed the buffer is full and ``add``
  waits (backpressure) instead of dropping rows a learner has never seen.
- ``max_policy_lag``: a row produced by student version k is never handed out once the learner is at
  a version above k + lag; such rows are removed and counted as ``dropped_stale``. Rows with
  ``policy_version < 0`` (offline teacher data) never go stale.
- ``sampling``: ``fifo`` hands out the oldest unconsumed rows, each once; ``uniform`` draws uniformly
  among all fresh rows, with reuse.
- ``save`` / ``load``: one Parquet file with the rows, their use counts and the counters, so a run
  resumes with its buffer exactly as it was.

Where the rows live (``buffer.rows``):
- ``actor`` (the default): every row passes through this actor: a teacher's table is copied in on
  ``add`` and every ``sample`` copies a batch out, which each learner rank then fetches.
- ``object_store``: the rows stay in the Ray object store where the teacher put them (its node); the
  actor keeps only a stub per row (prompt id, policy version, which object, which row) under the
  same rules, and ``sample`` hands out ``RowRefs`` (object refs and row indexes) that each learner
  rank resolves itself (``resolve_rows``). The actor then does bookkeeping only, and the row bytes
  go from the teachers' nodes to the learners directly instead of through one node
  (docs/scaling.md). ``save`` still writes every held row (it fetches them); a node lost with rows
  not yet trained on loses those rows (the learner's fetch fails) instead of the buffer keeping a copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors import metrics
from kd.data import BUFFER_SCHEMA, with_optional_columns


# a row held in the object store: its table (``RowRefs.refs[_ref]`` in the actor) and row there
STUB_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("policy_version", pa.int64(), nullable=False),
    pa.field("_ref", pa.int64(), nullable=False),
    pa.field("_row", pa.int64(), nullable=False),
])


class RowRefs(list):
    """A batch handed out by a buffer in ``object_store`` mode: ``[(table ref, [row indexes]), ...]``
    in batch order; ``resolve_rows`` turns it into the table."""


def resolve_rows(batch):
    """The batch as one Arrow table (fetching the rows of a ``RowRefs``; a table stays as it is)."""
    if not isinstance(batch, RowRefs):
        return batch
    import ray

    tables = ray.get([ref for ref, _ in batch])
    return pa.concat_tables([t.take(pa.array(rows)) for t, (_, rows) in zip(tables, batch)])


class BufferCore:
    """The buffer's state and rules, without Ray: unit-testable and used in-process by the actor.
    ``schema``: the rows' schema (``STUB_SCHEMA`` in ``object_store`` mode)."""

    def __init__(self, capacity: int, max_policy_lag: int, sampling: str = "fifo", seed: int = 0,
                 schema: pa.Schema = BUFFER_SCHEMA):
        if capacity <= 0:
            raise ValueError(f"buffer.capacity={capacity}: must be a positive integer")
        if sampling not in ("fifo", "uniform"):
            raise ValueError(f"buffer.sampling={sampling!r}: must be 'fifo' or 'uniform'")
        self.capacity = capacity
        self.max_policy_lag = max_policy_lag
        self.sampling = sampling
        self.rng = np.random.default_rng(seed)
        self.schema = schema
        self.table = schema.empty_table()
        self.versions = np.zeros(0, dtype=np.int64)
        self.uses = np.zeros(0, dtype=np.int64)
        self.inserted = self.consumed = self.dropped_stale = self.evicted = self.duplicates = 0
        self.request_ids: set[str] = set()
        self._lag_sum = 0  # sum of policy lag over handed-out online rows
        self._lag_n = 0

    def __len__(self) -> int:
        return self.table.num_rows

    def room(self) -> int:
        """Rows that can be added now, counting consumed rows that may be evicted."""
        return self.capacity - int((self.uses == 0).sum())

    def add(self, rows: pa.Table | pa.RecordBatch, force: bool = False, request_id: str | None = None) -> int:
        """Insert ``rows`` (must fit: call ``room()`` first, unless ``force``, which goes over
        capacity when every held row is unconsumed); returns the number inserted. A ``request_id``
        seen before is a re-sent request whose rows are already here: nothing is added."""
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        if request_id is not None:
            if request_id in self.request_ids:
                self.duplicates += rows.num_rows
                return 0
            self.request_ids.add(request_id)
        if rows.num_rows == 0:
            return 0
        if rows.num_rows > self.room() and not force:
            raise ValueError(f"{rows.num_rows} rows do not fit (room for {self.room()})")
        rows = rows.select(self.schema.names).cast(self.schema)
        overflow = len(self) + rows.num_rows - self.capacity
        if overflow > 0:
            self._evict_consumed(overflow)
        self.table = pa.concat_tables([self.table, rows])
        if self.table.column(0).num_chunks > 64:
            self.table = self.table.combine_chunks()
        self.versions = np.concatenate([self.versions, rows.column("policy_version").to_numpy()])
        self.uses = np.concatenate([self.uses, np.zeros(rows.num_rows, dtype=np.int64)])
        self.inserted += rows.num_rows
        return rows.num_rows

    def _keep(self, mask: np.ndarray) -> None:
        idx = np.flatnonzero(mask)
        if len(idx) == len(self):
            return
        if len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx):
            # a contiguous run (the usual case: the oldest rows go): a zero-copy slice
            start = int(idx[0]) if len(idx) else 0
            self.table = self.table.slice(start, len(idx))
        else:
            self.table = self.table.take(pa.array(idx))
        self.versions = self.versions[idx]
        self.uses = self.uses[idx]

    def shrink_to_capacity(self) -> int:
        """Evict consumed rows (oldest first) while over capacity, as after a drain in overflow mode
        or a load into a smaller buffer; unconsumed rows stay. Returns the rows evicted."""
        before = len(self)
        if before > self.capacity:
            self._evict_consumed(before - self.capacity)
        return before - len(self)

    def _evict_consumed(self, n: int) -> None:
        consumed = np.flatnonzero(self.uses > 0)[:n]  # oldest first: rows are in insertion order
        mask = np.ones(len(self), dtype=bool)
        mask[consumed] = False
        self.evicted += len(consumed)
        self._keep(mask)

    def drop_stale(self, current_version: int) -> int:
        stale = (self.versions >= 0) & (self.versions < current_version - self.max_policy_lag)
        n = int(stale.sum())
        if n:
            self.dropped_stale += int((stale & (self.uses == 0)).sum())
            self._keep(~stale)
        return n

    def available(self, current_version: int) -> int:
        self.drop_stale(current_version)
        return int((self.uses == 0).sum()) if self.sampling == "fifo" else len(self)

    def sample(self, n: int, current_version: int) -> pa.Table | None:
        """``n`` rows for a learner at ``current_version``, or None if not enough fresh rows."""
        if self.available(current_version) < n:
            return None
        if self.sampling == "fifo":
            idx = np.flatnonzero(self.uses == 0)[:n]
        else:
            idx = self.rng.choice(len(self), size=n, replace=False)
        self.uses[idx] += 1
        self.consumed += n
        online = self.versions[idx] >= 0
        self._lag_sum += int((current_version - self.versions[idx][online]).sum())
        self._lag_n += int(online.sum())
        batch = self.table.take(pa.array(idx))
        self.shrink_to_capacity()  # rows held over capacity (after overflow) go once consumed
        return batch

    # -- persistence ----------------------------------------------------------------------------

    _COUNTERS = ("inserted", "consumed", "dropped_stale", "evicted", "duplicates", "_lag_sum", "_lag_n")

    def save(self, path: str | Path) -> int:
        """Write rows, their use counts and the counters to one Parquet file, atomically (a crash
        mid-write leaves the previous file intact). Returns the number of rows written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = self.table.append_column("_uses", pa.array(self.uses, pa.int64()))
        meta = {"capacity": self.capacity, "max_policy_lag": self.max_policy_lag, "sampling": self.sampling,
                **{k: getattr(self, k) for k in self._COUNTERS}, "request_ids": sorted(self.request_ids)}
        table = table.replace_schema_metadata({b"raykd_buffer": json.dumps(meta).encode()})
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return table.num_rows

    def load(self, path: str | Path) -> int:
        """Replace the contents with a file written by ``save``; returns the number of rows."""
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"raykd_buffer", b"{}"))
        if "_uses" not in table.column_names or not meta:
            raise ValueError(f"{path}: not a raykd replay-buffer file")
        self.uses = table.column("_uses").to_numpy().astype(np.int64)
        self.table = with_optional_columns(table.drop_columns(["_uses"]).replace_schema_metadata(None)).cast(BUFFER_SCHEMA)
        self.versions = self.table.column("policy_version").to_numpy().astype(np.int64)
        for k in self._COUNTERS:
            setattr(self, k, meta.get(k, 0))
        self.request_ids = set(meta.get("request_ids", []))
        self.shrink_to_capacity()
        return self.table.num_rows

    def clear(self) -> int:
        """Drop every row (at a phase change); counters stay. Returns the rows dropped."""
        n = len(self)
        self._keep(np.zeros(n, dtype=bool))
        return n

    def stats(self) -> dict:
        return {
            "size": len(self),
            "unconsumed": int((self.uses == 0).sum()),  # rows no learner has taken yet
            "capacity": self.capacity,
            "inserted": self.inserted,
            "consumed": self.consumed,
            "dropped_stale": self.dropped_stale,
            "evicted": self.evicted,
            "duplicates_dropped": self.duplicates,
            "mean_policy_lag": self._lag_sum / self._lag_n if self._lag_n else 0.0,
            "bytes": self.table.nbytes,
            "size_by_teacher": self._by_teacher(),
        }

    def _by_teacher(self) -> dict[str, int]:
        """Rows held per teacher pool (``teacher_name``; rows without one count under '')."""
        if "teacher_name" not in self.table.column_names or not len(self):
            return {}
        names, counts = np.unique(np.asarray(self.table.column("teacher_name").fill_null("").to_pylist(), dtype=object),
                                  return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}


class ReplayBuffer:
    """The Ray actor around ``BufferCore`` (async: ``add`` and ``sample`` wait without blocking
    each other). Create with ``ray.remote(ReplayBuffer).options(name="replay-buffer")``.
    ``rows``: 'actor' (rows held here) or 'object_store' (stubs here, rows in the object store)."""

    def __init__(self, capacity: int, max_policy_lag: int, sampling: str = "fifo", seed: int = 0,
                 rows: str = "actor"):
        if rows not in ("actor", "object_store"):
            raise ValueError(f"buffer.rows={rows!r}: must be 'actor' or 'object_store'")
        self.rows = rows
        self.core = self._new_core(BufferCore(capacity, max_policy_lag, sampling, seed))
        self.refs: dict[int, object] = {}  # object_store mode: table id -> ObjectRef of its rows
        self.ref_row_bytes: dict[int, float] = {}  # table id -> bytes per row (stats)
        self.next_ref = 0
        self.changed = asyncio.Condition()
        self.version = 0
        self.closed = False
        self.overflow = False  # while the driver drains producers (no learner is consuming)
        self.incarnation = os.urandom(8).hex()  # new after every (re)start: tells the driver it lost state

    def _new_core(self, like: BufferCore) -> BufferCore:
        core = BufferCore(like.capacity, like.max_policy_lag, like.sampling,
                          schema=STUB_SCHEMA if self.rows == "object_store" else BUFFER_SCHEMA)
        core.rng = like.rng
        return core

    # -- object_store mode: stubs here, rows elsewhere --------------------------------------------

    def _stub(self, ref, prompt_ids: list, versions: list, nbytes: float) -> pa.Table:
        i, n = self.next_ref, len(prompt_ids)
        self.next_ref += 1
        self.refs[i], self.ref_row_bytes[i] = ref, nbytes / max(n, 1)
        return pa.table({"prompt_id": prompt_ids, "policy_version": versions, "_ref": [i] * n,
                         "_row": list(range(n))}, schema=STUB_SCHEMA)

    def _prune(self) -> None:
        """Forget the tables no held row points into (their objects can then be freed)."""
        if self.rows != "object_store" or not self.refs:
            return
        live = set(np.unique(self.core.table.column("_ref").to_numpy()).tolist()) if len(self.core) else set()
        for i in [i for i in self.refs if i not in live]:
            del self.refs[i], self.ref_row_bytes[i]

    def _segments(self, stub: pa.Table) -> list[tuple[int, list[int]]]:
        """Consecutive rows of ``stub`` from the same table: ``[(table id, [rows]), ...]`` in order."""
        out: list[tuple[int, list[int]]] = []
        for i, r in zip(stub.column("_ref").to_pylist(), stub.column("_row").to_pylist()):
            if out and out[-1][0] == i:
                out[-1][1].append(r)
            else:
                out.append((i, [r]))
        return out

    async def _materialize(self, stub: pa.Table) -> pa.Table:
        """The full rows behind ``stub`` (fetched from the object store), in its order."""
        segs = self._segments(stub)
        if not segs:
            return BUFFER_SCHEMA.empty_table()
        ids = sorted({i for i, _ in segs})
        tables = dict(zip(ids, await asyncio.gather(*[self.refs[i] for i in ids])))
        return pa.concat_tables([tables[i].take(pa.array(rows)).select(BUFFER_SCHEMA.names).cast(BUFFER_SCHEMA)
                                 for i, rows in segs])

    # -- the API ------------------------------------------------------------------------------------

    async def add(self, rows: pa.Table, timeout: float | None = None, request_id: str | None = None) -> int:
        """Insert rows, waiting while the buffer is full of unconsumed rows (backpressure).
        ``request_id``: the producer's id for this request; a repeat is dropped (see BufferCore.add)."""
        if self.rows == "object_store":  # rows given here (offline data) go to the object store too
            import ray

            return await self._insert(rows.num_rows, lambda: self._stub(
                ray.put(rows), rows.column("prompt_id").to_pylist(), rows.column("policy_version").to_pylist(),
                rows.nbytes), timeout, request_id)
        return await self._insert(rows.num_rows, lambda: rows, timeout, request_id)

    async def add_ref(self, meta: dict, refs: list, timeout: float | None = None,
                      request_id: str | None = None) -> int:
        """``add`` for rows a teacher left in the object store: ``refs[0]`` is their table (in a list,
        so Ray does not fetch it here), ``meta`` their ``prompt_id`` and ``policy_version`` lists and
        ``nbytes`` (``TeacherWorker.make_pairs_split``). In 'actor' mode the table is fetched."""
        n = len(meta["prompt_id"])
        if self.rows != "object_store":
            table = await refs[0]
            return await self._insert(n, lambda: table, timeout, request_id)
        return await self._insert(n, lambda: self._stub(refs[0], meta["prompt_id"], meta["policy_version"],
                                                        meta["nbytes"]), timeout, request_id)

    async def _insert(self, n: int, make, timeout: float | None, request_id: str | None) -> int:
        if request_id is not None and request_id in self.core.request_ids:
            self.core.duplicates += n  # a re-sent request whose rows are here: nothing is added
            return 0
        if n > self.core.capacity:
            raise ValueError(f"{n} rows exceed buffer.capacity={self.core.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self.changed:
            while self.core.room() < n and not self.closed and not self.overflow:
                self.core.drop_stale(self.version)
                if self.core.room() >= n:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"buffer full for {timeout}s ({len(self.core)} unconsumed rows)")
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    continue
            if self.closed:
                return 0
            added = self.core.add(make(), force=self.overflow, request_id=request_id)
            self._prune()
            self.changed.notify_all()
            metrics.record_buffer(len(self.core), capacity=self.core.capacity)
            return added

    async def sample(self, n: int, current_version: int, timeout: float | None = None) -> pa.Table | None:
        """``n`` fresh rows, waiting up to ``timeout`` seconds for producers; None on timeout/close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self.changed:
            self.version = max(self.version, current_version)
            while True:
                batch = self.core.sample(n, current_version)
                if batch is not None or self.closed:
                    if batch is not None and self.rows == "object_store":
                        batch = RowRefs((self.refs[i], rows) for i, rows in self._segments(batch))
                    self._prune()
                    self.changed.notify_all()  # consumed rows make room for waiting producers
                    metrics.record_buffer(len(self.core), capacity=self.core.capacity)
                    return batch
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass

    async def set_version(self, version: int) -> None:
        async with self.changed:
            self.version = max(self.version, version)
            self.core.drop_stale(self.version)
            self._prune()
            self.changed.notify_all()
            metrics.record_buffer(len(self.core), capacity=self.core.capacity)

    async def set_overflow(self, on: bool) -> None:
        """While on, ``add`` never waits: rows beyond capacity are kept (consumed rows go first).
        The driver turns it on to drain producers while no learner consumes (checkpoint, phase end),
        where backpressure would otherwise wait forever."""
        async with self.changed:
            self.overflow = on
            if not on:
                self.core.shrink_to_capacity()
                self._prune()
            self.changed.notify_all()

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def stats(self) -> dict:
        out = self.core.stats()
        if self.rows == "object_store":  # bytes: of the rows held, wherever they are
            ids, counts = np.unique(self.core.table.column("_ref").to_numpy(), return_counts=True)
            out["actor_bytes"] = out["bytes"]
            out["bytes"] = float(sum(self.ref_row_bytes[i] * c for i, c in zip(ids.tolist(), counts.tolist())))
        # cpu_s: this actor process's CPU time (all its threads, Ray's deserialisation included)
        return {**out, "rows": self.rows, "incarnation": self.incarnation, "cpu_s": time.process_time()}

    async def save(self, path: str) -> int:
        async with self.changed:
            if self.rows == "actor":
                return self.core.save(path)
            full = BufferCore(self.core.capacity, self.core.max_policy_lag, self.core.sampling)
            full.table = await self._materialize(self.core.table)  # the same file as in 'actor' mode
            full.versions, full.uses, full.request_ids = self.core.versions, self.core.uses, self.core.request_ids
            for k in BufferCore._COUNTERS:
                setattr(full, k, getattr(self.core, k))
            return full.save(path)

    async def load(self, path: str) -> int:
        async with self.changed:
            if self.rows == "actor":
                n = self.core.load(path)
            else:
                import ray

                full = BufferCore(self.core.capacity, self.core.max_policy_lag, self.core.sampling)
                n = full.load(path)
                self.refs.clear()
                self.ref_row_bytes.clear()
                t = full.table
                self.core.table = (self._stub(ray.put(t), t.column("prompt_id").to_pylist(),
                                              t.column("policy_version").to_pylist(), t.nbytes)
                                   if n else STUB_SCHEMA.empty_table())
                self.core.versions, self.core.uses, self.core.request_ids = full.versions, full.uses, full.request_ids
                for k in BufferCore._COUNTERS:
                    setattr(self.core, k, getattr(full, k))
            self.version = 0  # the loader sets the version that goes with these rows
            self.changed.notify_all()
            return n

    async def reset(self) -> None:
        """Empty, as just created (counters, request ids and version too): the run went back to step 0."""
        async with self.changed:
            self.core = self._new_core(self.core)
            self.refs.clear()
            self.ref_row_bytes.clear()
            self.version = 0
            self.changed.notify_all()

    async def clear(self) -> int:
        async with self.changed:
            n = self.core.clear()
            self._prune()
            self.changed.notify_all()
            return n

    async def ready(self) -> str:
        return self.incarnation
