"""TeacherPool: N teacher replicas (actors ``teacher-<i>``) behind least-loaded dispatch.

A teacher turns a batch of prompts plus the student's responses into preference pairs: it generates
y_t from the (primed) teacher prompt, scores y_t and y_s (log-prob of each token and its top-k), and
returns the pairs as one Arrow table in the replay-buffer schema.

A teacher with another tokenizer than the student's (``student_tokenizer``: the text path,
docs/teachers.md) exchanges text: y_t is re-tokenized for the student, y_s for the teacher, and the
teacher's log-probs are kept as one sum per sequence.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import pyarrow as pa
import ray

from actors import lifecycle, metrics
from actors.engines import Generation, SamplingParams, make_engine
from kd.data import BUFFER_SCHEMA


class TeacherWorker:
    """Ray actor: one teacher engine."""

    name = "default"  # the teacher pool it belongs to (``teachers:``), written in each row's teacher_name
    text = None  # the text path: (the student's tokenizer, the teacher's); None: one tokenizer

    def __init__(self, index: int, model_path: str, backend: str, engine_opts: dict, sampling: dict,
                 top_k: int, score_with: str = "primed", name: str = "default",
                 student_tokenizer: str | None = None):
        self.index, self.name = index, name
        self.engine = make_engine(backend, model_path, **engine_opts)
        if student_tokenizer is not None:
            from transformers import AutoTokenizer

            from kd.models import hf_kwargs

            self.text = tuple(AutoTokenizer.from_pretrained(m, **hf_kwargs()) for m in (student_tokenizer, model_path))
        self.params = SamplingParams(**sampling, top_k_logprobs=top_k)
        self.top_k = top_k
        self.score_with = score_with
        self.pairs = 0
        self.busy_s = 0.0
        self.generated_tokens = self.scored_tokens = 0  # the teacher work done, in tokens
        self.reused_answers = 0  # y_t taken from a stored teacher dataset instead of generated

    def ready(self) -> bool:
        return True

    def make_pairs(self, requests: list[dict], student: list[Generation] | None,
                   needs: dict | None = None, select: list[int] | None = None) -> pa.Table:
        """Rows for ``requests`` (dicts: prompt_id, prompt_ids, teacher_prompt_ids, priming,
        reference_answer). With the student's generations (same order) these are preference pairs;
        with ``student=None`` they are offline teacher rows (no y_s, ``policy_version`` -1).

        ``needs`` (``kd.objective.loss_needs`` of the loss these rows feed; default everything): the
        teacher generates y_t only if ``y_t`` is needed, and scores y_s only if ``teacher_scores_y_s``
        is; what is not needed stays empty in the row (same schema). ``select``: the positions in
        ``student`` of ``requests`` (a routed share of a sampler's batch; default all, in order)."""
        if student is not None and select is not None:
            student = [student[j] for j in select]
        if student is not None and len(requests) != len(student):
            raise ValueError(f"{len(requests)} requests but {len(student)} student generations")
        needs = needs or {"y_t": True, "teacher_scores_y_s": True}
        t = time.perf_counter()
        n = len(requests)
        if self.text is not None:
            cols = self._text_columns(requests, student, needs)
        else:
            cols = self._token_columns(requests, student, needs)
        table = pa.Table.from_pydict(
            {
                "prompt_id": [r["prompt_id"] for r in requests],
                "prompt_ids": [r["prompt_ids"] for r in requests],
                "teacher_prompt_ids": [r["teacher_prompt_ids"] for r in requests],
                "rejected_ids": [g.token_ids for g in student] if student is not None else [[]] * n,
                "rejected_behaviour_logps": [g.logprobs for g in student] if student is not None else [None] * n,
                "policy_version": [g.version for g in student] if student is not None else [-1] * n,
                "priming": [r.get("priming", "none") for r in requests],
                "created_at": [time.time()] * n,
                "reference_answer": [r.get("reference_answer") for r in requests],
                "teacher_name": [self.name] * n,
                "chosen_teacher_logp_sum": [None] * n,
                "rejected_teacher_logp_sum": [None] * n,
                **cols,
            },
            schema=BUFFER_SCHEMA,
        )
        self.pairs += n
        self.busy_s += time.perf_counter() - t
        return table

    def _token_columns(self, requests: list[dict], student: list[Generation] | None, needs: dict) -> dict:
        """The same-tokenizer path: y_t and the teacher's per-token log-probs / top-k of y_t and y_s."""
        # y_t to generate: every prompt the loss needs it for, except those that carry a stored answer
        fresh = [i for i, r in enumerate(requests) if needs["y_t"] and r.get("teacher_answer") is None]
        teacher = [_stored_answer(r.get("teacher_answer"), self.engine.version) for r in requests]
        if fresh:
            t = time.perf_counter()
            made = self.engine.generate([requests[i]["teacher_prompt_ids"] for i in fresh], self.params)
            metrics.record_generation(f"teacher-{self.index}", len(made),
                                      sum(len(g.token_ids) for g in made), time.perf_counter() - t)
            for i, g in zip(fresh, made):
                teacher[i] = g
        key = "teacher_prompt_ids" if self.score_with == "primed" else "prompt_ids"
        ctx = [r[key] for r in requests]
        student_ids = [g.token_ids for g in student] if student is not None else []
        to_score = student_ids if needs["teacher_scores_y_s"] else []
        # a stored answer carries the scores it was stored with (the same score_with: checked at start)
        chosen = list(teacher)
        if self.score_with == "primed":
            # y_t was sampled from the primed prompt: its raw log-probs and top-k came with it
            rejected = self.engine.score(ctx, to_score, self.top_k) if to_score else []
        else:
            both = [teacher[i].token_ids for i in fresh] + to_score
            scores = self.engine.score([ctx[i] for i in fresh] + ctx[: len(to_score)], both, self.top_k) if both else []
            for i, sc in zip(fresh, scores):
                chosen[i] = sc
            rejected = scores[len(fresh):]
        n = len(requests)
        empty = [[]] * n
        made_tokens = sum(len(teacher[i].token_ids) for i in fresh)
        self.generated_tokens += made_tokens
        self.reused_answers += sum(r.get("teacher_answer") is not None for r in requests)
        self.scored_tokens += sum(len(x.logprobs) for x in rejected) + (0 if self.score_with == "primed" else made_tokens)
        return {
            "chosen_ids": [g.token_ids for g in teacher],
            "chosen_teacher_logps": [s.logprobs for s in chosen],
            "rejected_teacher_logps": [s.logprobs for s in rejected] or empty,
            "chosen_topk_ids": [s.topk_ids or None for s in chosen],
            "chosen_topk_logps": [s.topk_logprobs or None for s in chosen],
            "rejected_topk_ids": [s.topk_ids or None for s in rejected] or [None] * n,
            "rejected_topk_logps": [s.topk_logprobs or None for s in rejected] or [None] * n,
        }

    def _text_columns(self, requests: list[dict], student: list[Generation] | None, needs: dict) -> dict:
        """The text path: y_t generated from the teacher-tokenized prompt and re-tokenized for the
        student (``chosen_ids``); y_s re-tokenized for the teacher and scored; each side's teacher
        log-probs summed (every token floored as the per-token path floors them). Per-token columns
        stay empty: no teacher token lines up with a student token."""
        from kd.losses import _LOG_TINY
        from kd.vocab import retokenize

        s_tok, t_tok = self.text
        n = len(requests)
        t = time.perf_counter()
        teacher = self.engine.generate([r["teacher_prompt_ids"] for r in requests], self.params) if needs["y_t"] else []
        if teacher:
            metrics.record_generation(f"teacher-{self.index}", len(teacher),
                                      sum(len(g.token_ids) for g in teacher), time.perf_counter() - t)
        key = "teacher_prompt_ids" if self.score_with == "primed" else "teacher_plain_prompt_ids"
        ctx = [r[key] for r in requests]
        chosen = [g.logprobs for g in teacher]
        if teacher and self.score_with != "primed":  # y_t sampled from the primed prompt, scored unprimed
            chosen = [x.logprobs for x in self.engine.score(ctx, [g.token_ids for g in teacher], 0)]
        y_s = [retokenize(g.token_ids, g.finish_reason == "stop", s_tok, t_tok) for g in student] \
            if student is not None and needs["teacher_scores_y_s"] else []
        rejected = [x.logprobs for x in self.engine.score(ctx, y_s, 0)] if y_s else []
        total = lambda lps: float(sum(max(x, _LOG_TINY) for x in lps))  # noqa: E731
        self.generated_tokens += sum(len(g.token_ids) for g in teacher)
        self.scored_tokens += sum(map(len, y_s)) + (
            0 if self.score_with == "primed" else sum(len(g.token_ids) for g in teacher))
        return {
            "chosen_ids": [retokenize(g.token_ids, g.finish_reason == "stop", t_tok, s_tok) for g in teacher]
            or [[]] * n,
            "chosen_teacher_logps": [[]] * n, "rejected_teacher_logps": [[]] * n,
            "chosen_topk_ids": [None] * n, "chosen_topk_logps": [None] * n,
            "rejected_topk_ids": [None] * n, "rejected_topk_logps": [None] * n,
            "chosen_teacher_logp_sum": [total(x) for x in chosen] or [None] * n,
            "rejected_teacher_logp_sum": [total(x) for x in rejected] or [None] * n,
        }

    def make_pairs_split(self, requests: list[dict], student: list[Generation] | None,
                         needs: dict | None = None) -> tuple[dict, pa.Table]:
        """``make_pairs`` as two objects (call with ``num_returns=2``): what the replay buffer keeps
        of each row in ``buffer.rows=object_store`` mode (prompt ids, policy versions, the table's
        bytes), and the rows themselves, which then stay in this node's object store."""
        table = self.make_pairs(requests, student, needs)
        meta = {"prompt_id": table.column("prompt_id").to_pylist(),
                "policy_version": table.column("policy_version").to_pylist(), "nbytes": table.nbytes}
        return meta, table

    def generate(self, requests: list[dict], greedy: bool = True, max_new_tokens: int | None = None,
                 seed: int | None = None) -> list[Generation]:
        """The teacher's own answers to the student-side (unprimed) prompts: the reference score of a
        held-out evaluation, on exactly the prompts the student is scored on."""
        params = replace(self.params, temperature=0.0 if greedy else self.params.temperature, seed=seed,
                         top_k_logprobs=0, max_new_tokens=max_new_tokens or self.params.max_new_tokens)
        return self.engine.generate([r["prompt_ids"] for r in requests], params)

    def stats(self) -> dict:
        return {"name": self.name, "index": self.index, "pairs": self.pairs, "busy_s": self.busy_s,
                "generated_tokens": self.generated_tokens, "scored_tokens": self.scored_tokens,
                "reused_answers": self.reused_answers}


class TeacherPool:
    """Driver-side handle on the teacher replicas: dispatches each batch to the replica with the
    fewest requests in flight."""

    def __init__(self, num_replicas: int, actor_options: dict, **worker_kwargs):
        remote = ray.remote(TeacherWorker)
        name = worker_kwargs.get("name", "default")
        prefix = "teacher" if name == "default" else f"teacher-{name}"
        self.names = [f"{prefix}-{i}" for i in range(num_replicas)]  # the actors' names
        self.workers = [
            # Ray restarts a dead replica; the driver re-sends its failed requests (max_task_retries=0)
            remote.options(name=f"{prefix}-{i}", max_restarts=-1, **actor_options).remote(i, **worker_kwargs)
            for i in range(num_replicas)
        ]
        self.in_flight = [0] * num_replicas
        self._owner: dict[ray.ObjectRef, int] = {}
        self.retired: set[int] = set()  # replicas whose node is gone and that no other node can hold

    @property
    def active(self) -> list[int]:
        return [i for i in range(len(self.workers)) if i not in self.retired]

    def retire(self, i: int) -> None:
        """Go on without replica ``i`` (its node was lost and no alive node can hold it again). The last
        replica is never retired: ``lifecycle.ActorUnplaceable`` says what the cluster lacks instead."""
        if self.active == [i]:
            lifecycle.check_placeable(self.workers[i])  # raises, naming what cannot be placed
        name = lifecycle.retire(self.workers[i])
        self.retired.add(i)
        print(f"raykd: warning: {name} was lost with its node and no alive node can hold it; going on with "
              f"{len(self.active)} teacher replica(s)", file=sys.stderr)

    def ready_refs(self) -> list:
        return [w.ready.remote() for w in self.workers]

    def submit(self, requests: list[dict], student_ref, avoid: int | None = None,
               needs: dict | None = None, split: bool = False, select: list[int] | None = None):
        """``student_ref``: the sampler's ObjectRef (Ray resolves it before the teacher runs), or None
        for offline rows. ``avoid``: a replica not to use (one that just failed) if there is another.
        ``needs``: what the loss reads (see ``TeacherWorker.make_pairs``). Returns the rows' ref, or
        with ``split`` a tuple ``(meta ref, rows ref)`` (``TeacherWorker.make_pairs_split``)."""
        while True:
            choices = [i for i in self.active if i != avoid] or self.active
            i = min(choices, key=self.in_flight.__getitem__)
            if lifecycle.is_alive(self.workers[i]) or lifecycle.replaceable(self.workers[i]):
                break
            self.retire(i)  # a request to it would wait forever for a node that is gone
        if split:
            ref = tuple(self.workers[i].make_pairs_split.options(num_returns=2).remote(requests, student_ref, needs))
        else:
            ref = self.workers[i].make_pairs.remote(requests, student_ref, needs, select)
        self.in_flight[i] += 1
        self._owner[ref[0] if split else ref] = i
        return ref

    def done(self, ref) -> int | None:
        """Forget a finished (or failed) request (its ref, or ``submit``'s tuple); returns the
        replica that had it."""
        i = self._owner.pop(ref[0] if isinstance(ref, tuple) else ref, None)
        if i is not None:
            self.in_flight[i] -= 1
        return i

    def stats(self) -> list[dict]:
        out = []
        for i, w in enumerate(self.workers):
            if i in self.retired:
                out.append({"index": i, "lost": True})
                continue
            try:
                out.append(ray.get(w.stats.remote()))
            except ray.exceptions.RayActorError:  # restarting after a failure: no counts to give
                out.append({"index": i, "unavailable": True})
        return out


def _stored_answer(answer: dict | None, version: int) -> Generation:
    """A y_t from a teacher dataset (``driver.offline.load_answers``) as the engine would have returned
    it; no answer: the empty y_t of a loss that does not read one."""
    if answer is None:
        return Generation([], [], "length", version)
    return Generation(answer["chosen_ids"], answer["chosen_teacher_logps"], "stored", version,
                      answer["chosen_topk_ids"] or [], answer["chosen_topk_logps"] or [])


@ray.remote(num_cpus=0)
def _concat(*tables: pa.Table) -> pa.Table:
    return pa.concat_tables(tables)


class MultiTeacherPool:
    """Several named teacher pools (``teachers:``) behind one ``TeacherPool``-like handle: each request
    goes to the pool its ``teacher`` key names (set at prepare time by ``driver.router``); a batch that
    spans pools is split, each share scored by its pool, and the rows concatenated again."""

    def __init__(self, pools: dict[str, TeacherPool]):
        self.pools = pools
        self.workers = [w for p in pools.values() for w in p.workers]
        self.names = [n for p in pools.values() for n in p.names]
        self.retired: set[int] = set()  # replica loss is handled inside each pool's own indices
        self._parts: dict = {}

    @property
    def active(self) -> list[int]:
        return list(range(len(self.workers)))

    def ready_refs(self) -> list:
        return [r for p in self.pools.values() for r in p.ready_refs()]

    def submit(self, requests: list[dict], student_ref, avoid: int | None = None,
               needs: dict | None = None, split: bool = False):
        if split:
            raise ValueError("several teachers need buffer.rows=actor")
        groups: dict[str, list[int]] = {}
        for j, r in enumerate(requests):
            groups.setdefault(r["teacher"], []).append(j)
        parts = [(name, self.pools[name].submit([requests[j] for j in idx], student_ref, needs=needs,
                                                select=idx if student_ref is not None else None))
                 for name, idx in groups.items()]
        ref = parts[0][1] if len(parts) == 1 else _concat.remote(*[r for _, r in parts])
        self._parts[ref] = parts
        return ref

    def done(self, ref) -> None:
        for name, part in self._parts.pop(ref, []):
            self.pools[name].done(part)
        return None  # no single replica to blame: a failed request is re-sent to the pools as routed

    def stats(self) -> list[dict]:
        return [s for p in self.pools.values() for s in p.stats()]
