"""raykd against TRL's ``GKDTrainer`` on the same on-policy GKD job, runs alternated.

    python benchmarks/vs_trl.py                                   # 2 runs each, 32 steps, synthetic math
    python benchmarks/vs_trl.py --data ../shared/data/gsm8k/train.jsonl   # GSM8K questions instead
    python benchmarks/vs_trl.py --tiny                            # random tiny models, a few steps (its test)

The job (issue #13): teacher SmolLM2-135M-Instruct fp32 (raykd's embedded ``smollm2-135m-instruct``),
student its 5-layer truncation (layers 0, 7, 14, 21, 29), on-policy generalised JSD with beta 0.5 on the
student's own samples (TRL ``GKDConfig(lmbda=1, beta=0.5)``; raykd ``loss: {type: jsd, jsd_beta: 0.5,
student_ratio: 1, sft_coef: 0}``), samples of at most 64 new tokens at temperature 1, 4 prompts per step,
AdamW at a constant learning rate of 1e-5, gradient clipping 1. raykd also runs with
``sampler.prompts_per_request=4``, ``sampler.max_in_flight=2``, ``sampler.max_steps_ahead=auto`` (it
kept 3 steps ahead here), ``sync.every_steps=2`` and the teacher's
top-1024 log-probs (its divergence is on the whole vocabulary, the teacher's mass outside those 1024
spread evenly over the other ids: ``loss.topk_tail: uniform``, the default; TRL's on the full logits; on
the student's samples the top-1024 held about 0.78 of the teacher's mass, the top-16 0.30, and at
top-16 raykd's student ended measurably further from the teacher: docs/benchmarks.md). TRL's
loss is taken as one token mean over the step's samples, as raykd's (``TokenMeanGKDTrainer`` below says
why that needs a one-line override). Both see the same prompts, tokenised by raykd's ``driver.prepare.build_requests``
(chat template and system prompt applied).

Each run is its own subprocess: TRL through this script's ``--worker trl`` mode, raykd through its CLI
(``python -m driver.cli train``), so a run's peak memory is its own: the summed RSS (and, every few
samples, PSS) of the subprocess and every descendant (Ray's GCS, raylet and workers included), sampled
in a thread. Reported per run: steady-state samples/s (trained samples between the end of step
``--skip-steps`` and the last step, over that time: start-up and the first steps excluded), wall time
of the subprocess (start-up included), peak memory, and the held-out KL(teacher||student) and
KL(student||teacher) of the final student, teacher-forced on held-out reference solutions (synthetic
problems of another generator seed, or the last ``--heldout`` lines of ``--data``, which neither tool
trains on); the teacher's side is computed once (``driver.evaluate.TeacherReference``). Then the ratio
of the tools' mean steady-state samples/s. The last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

TOOLS = ("trl", "raykd")


def job_settings(tiny: bool) -> dict:
    """What both tools share."""
    if tiny:
        return {"batch_size": 4, "max_new_tokens": 8, "lr": 1e-5, "beta": 0.5, "temperature": 1.0,
                "num_prompts": 16, "max_prompt_tokens": 128, "top_k_logprobs": 4}
    return {"batch_size": 4, "max_new_tokens": 64, "lr": 1e-5, "beta": 0.5, "temperature": 1.0,
            "num_prompts": 256, "max_prompt_tokens": 128, "top_k_logprobs": 1024}


def raykd_config(job: dict, models: dict, steps: int, seed: int, data: str, tiny: bool) -> dict:
    """raykd's side of the job (a YAML config for ``raykd train``)."""
    cfg = {
        "run": {"name": "vs-trl", "seed": seed},
        "models": ({"teacher": models["teacher"], "student": models["student"], "student_keep_layers": None}
                   if tiny else {"teacher": "smollm2-135m-instruct", "student_keep_layers": [0, 7, 14, 21, 29]}),
        "data": {"source": data, "num_prompts": job["num_prompts"], "max_prompt_tokens": job["max_prompt_tokens"]},
        "teacher": {"top_k_logprobs": job["top_k_logprobs"], "max_new_tokens": job["max_new_tokens"]},
        "sampler": {"prompts_per_request": 4, "max_in_flight": 2, "max_new_tokens": job["max_new_tokens"],
                    "temperature": job["temperature"], "max_steps_ahead": "auto"},
        "buffer": {"min_size_to_train": job["batch_size"]},
        "learner": {"batch_size": job["batch_size"], "lr": job["lr"], "warmup_steps": 0, "grad_clip": 1.0},
        "loss": {"type": "jsd", "jsd_beta": job["beta"], "student_ratio": 1.0, "sft_coef": 0.0, "kd_coef": 1.0},
        "schedule": [{"kind": "online", "steps": steps}],
        "sync": {"every_steps": 2},
        "checkpoint": {"export_hf": False},
    }
    if tiny:
        cfg["teacher"]["engine"] = {"backend": "hf"}
        cfg["sampler"]["engine"] = {"backend": "hf"}
    return cfg


# ---------------------------------------------------------------------------------------------
# Peak memory of a process tree
# ---------------------------------------------------------------------------------------------


RAY_SERVICES = "Ray services (GCS, raylet, dashboard, agents)"


def process_role(proc, root_pid: int) -> str:
    """What a process of a run's tree is: a Ray actor's class (its own subprocesses, such as vLLM's engine
    core, count as the actor), idle Ray workers, Ray's own services, the driver, or the program's name."""
    import psutil

    q = proc
    try:
        while q is not None:
            head = (q.cmdline() or [q.name()])[0]
            if head.startswith("ray::"):  # Ray titles a worker ray::<Class>.<method> or ray::IDLE
                name = head[5:].split()[0].split(".")[0]
                if name.endswith("Agent"):  # ray::DashboardAgent, ray::RuntimeEnvAgent: Ray's own
                    return RAY_SERVICES
                return "idle Ray workers" if name == "IDLE" else name
            if q.pid == root_pid:
                break
            q = q.parent()
        if proc.pid == root_pid:
            return "driver"
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "exited"
    if "ray" in cmd:
        return RAY_SERVICES
    return proc.name()


class TreeMemory:
    """Max over time of the summed RSS (every ``interval`` s) and PSS (every ``pss_every``-th sample)
    of a process and all its descendants; the RSS of each ``process_role`` at the sample with the
    largest sum; and the machine's used memory (total less available, so shared memory counts once)
    over what it was when measuring began."""

    def __init__(self, pid: int, interval: float = 0.5, pss_every: int = 10):
        import psutil

        self.root, self.interval, self.pss_every = psutil.Process(pid), interval, pss_every
        self.peak_rss = self.peak_pss = self.peak_used = 0
        self.idle_used = self._used()
        self.roles_at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total - vm.available

    def _sample(self, pss: bool) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total_pss = 0
        read: list[tuple] = []  # (process, its RSS)
        for p in procs:
            try:
                if pss:
                    info = p.memory_full_info()
                    total_pss += info.pss
                else:
                    info = p.memory_info()
            except psutil.Error:  # exited between the listing and the read
                continue
            read.append((p, info.rss))
        rss = sum(r for _, r in read)
        if rss > self.peak_rss:  # the parts are named only at a new peak, not at every sample
            roles: dict[str, int] = {}
            for p, r in read:
                role = process_role(p, self.root.pid)
                roles[role] = roles.get(role, 0) + r
            self.peak_rss, self.roles_at_peak = rss, roles
        if pss:
            self.peak_pss = max(self.peak_pss, total_pss)
        self.peak_used = max(self.peak_used, self._used() - self.idle_used)

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._sample(pss=n % self.pss_every == 0)
            n += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": self.peak_rss / 2**20, "peak_pss_mb": self.peak_pss / 2**20,
                "peak_used_over_idle_mb": self.peak_used / 2**20,
                "rss_mb_at_peak_by_role": {k: v / 2**20 for k, v in
                                           sorted(self.roles_at_peak.items(), key=lambda kv: -kv[1])}}


def run_measured(cmd: list[str], log: Path, env: dict) -> dict:
    """Run ``cmd`` to completion; its wall time and its process tree's peak memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        mem = TreeMemory(proc.pid)
        rc = proc.wait()
    result = {"wall_s": time.perf_counter() - started, **mem.stop()}
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"vs_trl: {' '.join(cmd[:4])} ... failed (exit {rc}); log {log}:\n{tail}")
    return result


def steady_samples_per_s(step_times: list[float], batch_size: int, skip: int) -> float:
    """Samples trained per second from the end of step ``skip`` to the end of the last step."""
    skip = min(skip, len(step_times) - 1)
    if skip < 1:
        raise SystemExit(f"vs_trl: {len(step_times)} steps: need at least 2 to measure a steady state")
    return batch_size * (len(step_times) - skip) / (step_times[-1] - step_times[skip - 1])


# ---------------------------------------------------------------------------------------------
# TRL's side (run in a subprocess: --worker trl)
# ---------------------------------------------------------------------------------------------


def trl_worker(spec_file: Path, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    spec = json.loads(spec_file.read_text())
    job = spec["job"]
    torch.manual_seed(spec["seed"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["student"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    # the prompts exactly as raykd tokenises them; the completion (one EOS) is replaced by the student's
    # own sample at every step (lmbda=1), the collator only reads where the prompt ends
    rows = [{"prompt": tok.decode(p), "input_ids": p + [tok.eos_token_id],
             "completion_mask": [0] * len(p) + [1]} for p in spec["prompts"]]
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - t0)

    args = GKDConfig(
        output_dir=str(out / "trainer"), max_steps=spec["steps"], per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", lmbda=1.0, beta=job["beta"],
        temperature=job["temperature"], max_new_tokens=job["max_new_tokens"], seed=spec["seed"],
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
        dataloader_num_workers=0, disable_tqdm=True)

    class TokenMeanGKDTrainer(GKDTrainer):
        """GKD's JSD as one token mean over the step's sampled tokens, as raykd's ``jsd``. Left alone,
        the Trainer divides the loss by the number of completion tokens of the *dataset* rows
        (``num_items_in_batch``, counted before the on-policy samples replace them): one placeholder
        token per row here, which would make the loss a per-sequence sum. With one device and no
        gradient accumulation nothing else reads it."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)

    trainer = TokenMeanGKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                                  train_dataset=Dataset.from_list(rows), callbacks=[StepTimes()])
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    (out / "steps.json").write_text(json.dumps({"step_times": times, "torch_threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def prepare_job(args, work: Path) -> tuple[dict, dict, list, dict]:
    """(shared settings, model paths, training prompt ids, held-out (prompts, continuations)); no Ray."""
    from driver.config import load_config
    from driver.evaluate import HELD_OUT_SEED, encode_prompts, load_examples
    from driver.prepare import build_requests, prepare_models
    from kd.data import load_prompts

    job = job_settings(args.tiny)
    models = {}
    if args.tiny:
        from kd.models import make_tiny_model

        models = {"teacher": str(make_tiny_model(work / "tiny-teacher", 4, 0)),
                  "student": str(make_tiny_model(work / "tiny-student", 2, 1))}
    data, heldout_rows = "synthetic_math", None
    if args.data:  # train on all but the last --heldout lines, hold those out
        lines = [ln for ln in Path(args.data).read_text().splitlines() if ln.strip()]
        if len(lines) <= args.heldout:
            raise SystemExit(f"vs_trl: --data {args.data}: {len(lines)} rows, need more than --heldout {args.heldout}")
        data = str(work / "train.jsonl")
        Path(data).write_text("\n".join(lines[:-args.heldout]) + "\n")
        held_file = work / "heldout.jsonl"
        held_file.write_text("\n".join(lines[-args.heldout:]) + "\n")
        heldout_rows = str(held_file)
    cfg_dict = raykd_config(job, models, args.steps, args.seed, data, args.tiny)
    cfg_file = work / "raykd.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cfg = load_config(str(cfg_file))
    teacher, student = prepare_models(cfg)
    models = {"teacher": teacher, "student": student, "config": str(cfg_file)}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    records = load_prompts(cfg.data.source, cfg.data.prompt_field, cfg.data.answer_field, cfg.data.num_prompts,
                           cfg.run.seed)
    requests, _ = build_requests(cfg, tok, records)
    examples = (load_examples("synthetic_math", limit=args.heldout, seed=HELD_OUT_SEED) if heldout_rows is None
                else load_examples(heldout_rows, cfg.data.prompt_field, cfg.data.answer_field))
    prompts = encode_prompts(tok, examples, cfg.data.system_prompt, cfg.data.chat_template, cfg.data.max_prompt_tokens)
    conts = [tok.encode(ex.reference, add_special_tokens=False)[:args.heldout_tokens] for ex in examples]
    return job, models, [r["prompt_ids"] for r in requests], {"prompts": prompts, "continuations": conts}


def run_tool(tool: str, i: int, args, job: dict, models: dict, prompts: list, work: Path) -> dict:
    out = work / f"{tool}-{i}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1")
    if tool == "trl":
        out.mkdir(parents=True)
        spec = out / "spec.json"
        spec.write_text(json.dumps({"job": job, "teacher": models["teacher"], "student": models["student"],
                                    "prompts": prompts, "steps": args.steps, "seed": args.seed + i,
                                    "threads": args.trl_threads}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--spec", str(spec),
               "--work", str(out)]
        measured = run_measured(cmd, work / f"{tool}-{i}.log", env)
        steps = json.loads((out / "steps.json").read_text())
        times, measured["torch_threads"] = steps["step_times"], steps["torch_threads"]
        final = out / "final"
    else:
        cmd = [sys.executable, "-m", "driver.cli", "train", models["config"], "--run-dir", str(out), "--no-progress",
               "--set", f"run.seed={args.seed + i}"]
        for kv in args.raykd_set:  # raykd's side of a variant (reported with the result)
            cmd += ["--set", kv]
        measured = run_measured(cmd, work / f"{tool}-{i}.log", env)
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        times = [r["elapsed_s"] for r in rows]
        final = out / "final"
    if len(times) != args.steps:
        raise SystemExit(f"vs_trl: {tool} run {i} recorded {len(times)} steps, expected {args.steps}")
    return {"tool": tool, "run": i, "steps": len(times), "samples": len(times) * job["batch_size"],
            "steady_samples_per_s": steady_samples_per_s(times, job["batch_size"], args.skip_steps),
            **measured, "final_model": str(final)}


def print_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """``rows`` under a header and a rule; a column is (header, row key, format spec such as '>10.3f'),
    the header taking the spec's alignment and width."""
    def width(spec: str) -> str:
        return "".join(c for c in spec.split(".")[0] if c.isdigit() or c in "<>^")

    head = " ".join(f"{h:{width(spec)}}" for h, _, spec in columns)
    print(head)
    print("-" * len(head))
    for r in rows:
        print(" ".join(format(r[key], spec) if r[key] is not None else format("-", width(spec))
                       for _, key, spec in columns))


def emit_result(result: dict, json_out: str | None) -> None:
    """A benchmark's whole result: into ``json_out`` (indented) when given, and as stdout's last line."""
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def report(runs: list[dict], args, initial: dict) -> dict:
    speed = {t: mean([r["steady_samples_per_s"] for r in runs if r["tool"] == t]) for t in TOOLS}
    result = {"setting": {"steps": args.steps, "skip_steps": args.skip_steps, "tiny": args.tiny,
                          "data": args.data or "synthetic_math", "heldout": args.heldout,
                          "tools": list(args.tools), "raykd_set": list(args.raykd_set)},
              "runs": runs, "mean_samples_per_s": speed, "ratio_raykd_over_trl": speed["raykd"] / speed["trl"],
              "mean_kl_teacher_student": {t: mean([r["kl_teacher_student"] for r in runs if r["tool"] == t])
                                          for t in TOOLS},
              "initial_kl_teacher_student": initial["kl_teacher_student"],
              "initial_kl_student_teacher": initial["kl_student_teacher"]}
    print_table([("tool", "tool", "<6"), ("run", "run", ">3"), ("samples/s", "steady_samples_per_s", ">10.3f"),
                 ("wall s", "wall_s", ">8.1f"), ("peak RSS MB", "peak_rss_mb", ">12.0f"),
                 ("peak PSS MB", "peak_pss_mb", ">12.0f"), ("KL(t||s)", "kl_teacher_student", ">9.4f"),
                 ("KL(s||t)", "kl_student_teacher", ">9.4f")], runs)
    print(f"the student before training: KL(t||s) {initial['kl_teacher_student']:.4f}, "
          f"KL(s||t) {initial['kl_student_teacher']:.4f}")
    print(f"mean steady-state samples/s: TRL {speed['trl']:.3f}, raykd {speed['raykd']:.3f}; "
          f"raykd/TRL = {result['ratio_raykd_over_trl']:.2f}x")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None, help="runs per tool, alternated (trl, raykd, trl, ...); "
                    "default 2 (--tiny: 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (x 4 prompts); default 32 "
                    "(--tiny: 4)")
    ap.add_argument("--skip-steps", type=int, default=None,
                    help="steps left out of the steady state (start-up); default 4 (--tiny: 1)")
    ap.add_argument("--data", default=None, help="a JSONL of {question, answer} rows (default: synthetic math)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out problems for the KL")
    ap.add_argument("--heldout-tokens", type=int, default=128, help="reference-solution tokens scored per problem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-threads", type=int, default=None,
                    help="TRL's torch threads; default 0, torch's own (all cores); --tiny: 1")
    ap.add_argument("--work", default="runs/vs_trl", help="scratch directory (runs, logs, final students)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--tiny", action="store_true", help="random tiny models, 4 steps, 1 run each (its test)")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help="which tools to run, comma-separated (default trl,raykd; one alone gives no ratio)")
    ap.add_argument("--raykd-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for raykd's runs (repeatable), as 'raykd train --set'")
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    if args.worker == "trl":
        trl_worker(Path(args.spec), work)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("vs_trl: TRL is not installed; pip install -e '.[bench]'") from None
    # --tiny: one TRL thread: on a loaded machine its tiny steps took 0.07 s with one thread, 3-5 s with two
    defaults = (1, 4, 1, 1) if args.tiny else (2, 32, 4, 0)
    given = (args.runs, args.steps, args.skip_steps, args.trl_threads)
    args.runs, args.steps, args.skip_steps, args.trl_threads = (d if v is None else v for v, d in zip(given, defaults))
    if args.tiny:
        args.heldout, args.heldout_tokens = 4, 16
    args.tools = tuple(t.strip() for t in args.tools.split(",") if t.strip())
    if not args.tools or set(args.tools) - set(TOOLS):
        raise SystemExit(f"vs_trl: --tools {','.join(args.tools) or repr('')}: choose from {','.join(TOOLS)}")
    if args.runs < 1 or args.steps < 2 or not 1 <= args.skip_steps < args.steps or args.trl_threads < 0:
        raise SystemExit("vs_trl: need --runs >= 1, --steps >= 2, 1 <= --skip-steps < --steps, --trl-threads >= 0")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    job, models, prompts, heldout = prepare_job(args, work)
    runs = []
    for i in range(args.runs):
        for tool in (t for t in TOOLS if t in args.tools):
            print(f"vs_trl: {tool} run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            runs.append(run_tool(tool, i, args, job, models, prompts, work))
    from driver.evaluate import TeacherReference

    reference = TeacherReference(models["teacher"], heldout["prompts"], heldout["continuations"])
    initial = reference.kl(models["student"])  # the student before training, for scale
    for r in runs:
        kl = reference.kl(r["final_model"])
        r.update(kl_teacher_student=kl["kl_teacher_student"], kl_student_teacher=kl["kl_student_teacher"])
    result = report(runs, args, initial)
    emit_result(result, args.json_out)
    return 0 if all(math.isfinite(r["steady_samples_per_s"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
