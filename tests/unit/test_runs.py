"""Runs, resume and checkpoints without Ray: every refusal is one line and leaves the run untouched.

The cases that need a real run (an interrupted run resumed with the printed command, a damaged
checkpoint resumed, a learner dying before the first checkpoint) are in tests/integration/test_run_lifecycle.py.
"""

import json
import time

import pytest
import yaml

from driver.cli import main
from driver.config import dump_config, load_config
from driver.runs import (RunDirError, claim_run_dir, commit_resume, phase_position, plan_resume,
                         scan_checkpoints, verify_checkpoint, write_manifest)

SAVED = ["learner.max_steps=40", "checkpoint.every_steps=5"]


def fake_run(root, steps=(10, 15), overrides=SAVED):
    """A run directory as `raykd train` leaves it: config.yaml and checkpoints with manifests."""
    run = root / "run"
    run.mkdir()
    dump_config(load_config(None, overrides), run / "config.yaml")
    (run / "metrics.jsonl").write_text("")
    for s in steps:
        ck = run / "checkpoints" / f"step-{s:06d}"
        (ck / "learner").mkdir(parents=True)
        (ck / "learner" / "state.pt").write_bytes(bytes(range(256)) * 40)
        (ck / "buffer.parquet").write_bytes(b"PAR1" + bytes(1000) + b"PAR1")
        (ck / "driver_state.json").write_text(json.dumps({"step": s}))
        write_manifest(ck)
    return run


def snapshot(run) -> dict:
    """Every file's bytes: what a refused command must leave exactly as it was."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(["train", *map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err.strip()


# -- 1. resume continues the saved run --------------------------------------------------------------

REFUSED_RESUMES = [
    # (extra arguments, the exact one-line message after "raykd: error: --resume RUN: ")
    (["--set", "learner.max_steps=2"],
     "the config ends at step 2, before the checkpoint step-000015; a resume never goes back "
     "(learner.max_steps: 40 -> 2)"),
    (["--set", "learner.max_steps=2", "--allow-config-change"],
     "the config ends at step 2, before the checkpoint step-000015; a resume never goes back "
     "(learner.max_steps: 40 -> 2)"),
    (["--set", "learner.max_steps=60", "--set", "learner.lr=0.001"],
     "config differs from the run's config.yaml: learner.lr: 5e-05 -> 0.001, learner.max_steps: 40 -> 60; "
     "resume with no config to continue as saved, or add --allow-config-change"),
]


@pytest.mark.parametrize("extra, message", REFUSED_RESUMES)
def test_a_resume_with_a_different_config_is_refused_and_writes_nothing(tmp_path, capsys, extra, message):
    run = fake_run(tmp_path)
    before = snapshot(run)
    code, err = cli(capsys, "--resume", run, *extra)
    assert (code, err) == (2, f"raykd: error: --resume {run}: {message}")
    assert snapshot(run) == before


def test_the_original_yaml_without_its_overrides_is_refused(tmp_path, capsys):
    run = fake_run(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learner: {max_steps: 2}\n")
    before = snapshot(run)
    code, err = cli(capsys, cfg, "--resume", run)
    assert code == 2 and err == (f"raykd: error: --resume {run}: the config ends at step 2, before the checkpoint "
                                 "step-000015; a resume never goes back (checkpoint.every_steps: 5 -> 0, "
                                 "learner.max_steps: 40 -> 2)")
    assert snapshot(run) == before


def test_an_allowed_change_is_recorded_and_config_yaml_rewritten(tmp_path):
    run = fake_run(tmp_path)
    plan = plan_resume(run, None, ["learner.max_steps=60"], allow_change=True)
    assert (plan.step, plan.checkpoint.name, plan.complete) == (15, "step-000015", False)
    assert (run / "config.yaml").read_bytes() == snapshot(run)["config.yaml"]  # planning writes nothing
    commit_resume(plan)
    assert load_config(run / "config.yaml").learner.max_steps == 60
    [change] = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert {k: change[k] for k in ("checkpoint_step", "key", "old", "new")} == {
        "checkpoint_step": 15, "key": "learner.max_steps", "old": 40, "new": 60}
    assert time.strptime(change["time"][:19], "%Y-%m-%dT%H:%M:%S")


def test_a_resume_that_fails_at_start_up_records_nothing(tmp_path, tiny_models, monkeypatch):
    """The config change and the set-aside wait until the checkpoint is restored (``on_resumed``)."""
    import driver.online

    run = fake_run(tmp_path, overrides=[*SAVED, f"models.teacher={tiny_models['teacher']}",
                                        f"models.student={tiny_models['student']}", "data.num_prompts=8"])
    damage(run / "checkpoints" / "step-000015", "flip a byte")
    before = snapshot(run)

    def cluster_fails(*args, on_resumed=None, **kwargs):
        raise RuntimeError("the cluster did not start")

    monkeypatch.setattr(driver.online, "run_online", cluster_fails)
    with pytest.raises(RuntimeError, match="did not start"):
        main(["train", "--resume", str(run), "--set", "learner.max_steps=60", "--allow-config-change"])
    after = snapshot(run)
    assert after.pop("data_summary.json") and after == before  # config.yaml and checkpoints as they were


def test_resume_without_config_uses_the_saved_one(tmp_path):
    run = fake_run(tmp_path)
    plan = plan_resume(run)
    assert plan.cfg.learner.max_steps == 40 and plan.changes == [] and not plan.complete


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
    run = fake_run(tmp_path, steps=(35, 40))
    before = snapshot(run)
    code, err = cli(capsys, "--resume", run)
    assert (code, err) == (0, f"raykd: {run} is complete (step-000040 is the final step 40); nothing to do")
    assert snapshot(run) == before


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{RUN}", "--run-dir", "{OTHER}"],
     "--resume RUN_DIR continues that run in place; do not also give --run-dir"),
    (["--resume", "{RUN}", "--overwrite"], "--overwrite starts a run over; it cannot be combined with --resume"),
    (["--resume", "{NOPE}"], "--resume {NOPE}: no such run directory"),
    (["--resume", "{FILE}"], "--resume {FILE}: is a file, not a run directory"),
    (["--resume", "{EMPTY}"], "--resume {EMPTY}: no config.yaml there (not a raykd run directory)"),
    ([], "train: a config file is required (or --resume RUN_DIR to continue a run)"),
    (["{CFG}", "--allow-config-change"], "--allow-config-change only applies with --resume RUN_DIR"),
])
def test_resume_arguments(tmp_path, capsys, argv, message):
    run = fake_run(tmp_path)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "CFG").write_text("{}")
    names = {"RUN": run, "OTHER": tmp_path / "other", "NOPE": tmp_path / "NOPE", "FILE": tmp_path / "FILE",
             "EMPTY": tmp_path / "EMPTY", "CFG": tmp_path / "CFG"}
    before = snapshot(run)
    code, err = cli(capsys, *[a.format(**names) for a in argv])
    assert (code, err) == (2, f"raykd: error: {message.format(**names)}")
    assert snapshot(run) == before


# -- 2. a new run never mixes with another -------------------------------------------------------------

@pytest.mark.parametrize("setup, overwrite, outcome", [
    ("missing", False, "ok"),
    ("empty", False, "ok"),
    ("run", False, "already holds a run; continue it with `raykd train --resume {p}` or start over "
                   "(deleting it) with --overwrite"),
    ("run", True, "ok"),
    ("file", False, "is a file, not a directory"),
    ("other", True, "is not empty and holds no raykd run; choose an empty or new directory"),
])
def test_run_dir_claims(tmp_path, setup, overwrite, outcome):
    p = tmp_path / "d"
    if setup == "empty":
        p.mkdir()
    elif setup == "run":
        p = fake_run(tmp_path)
    elif setup == "file":
        p.write_text("x")
    elif setup == "other":
        p.mkdir()
        (p / "notes.txt").write_text("mine")
    before = snapshot(p) if p.is_dir() else None
    if outcome == "ok":
        assert claim_run_dir(load_config(), str(p), overwrite) == p
    else:
        with pytest.raises(RunDirError) as e:
            claim_run_dir(load_config(), str(p), overwrite)
        assert str(e.value) == f"--run-dir {p} {outcome.format(p=p)}"
    assert (snapshot(p) if p.is_dir() else None) == before  # claiming writes nothing (prepare does)


def test_an_existing_run_dir_is_refused_by_the_cli(tmp_path, capsys):
    run = fake_run(tmp_path)
    (tmp_path / "c.yaml").write_text("{}")
    before = snapshot(run)
    code, err = cli(capsys, tmp_path / "c.yaml", "--run-dir", run)
    assert code == 2 and err.startswith(f"raykd: error: --run-dir {run} already holds a run")
    assert snapshot(run) == before


def test_default_run_dir_gets_a_distinct_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    cfg = load_config(None, [f"run.runs_dir={tmp_path}", "run.name=x"])
    assert claim_run_dir(cfg, None) == tmp_path / "x-20260101-000000"
    (tmp_path / "x-20260101-000000").mkdir()
    (tmp_path / "x-20260101-000000-2").mkdir()
    assert claim_run_dir(cfg, None) == tmp_path / "x-20260101-000000-3"


def test_overwrite_clears_the_old_run_only_once_prepare_passed(tmp_path):
    from driver.prepare import make_run_dir

    run = fake_run(tmp_path)
    make_run_dir(load_config(), str(run), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


# -- 3. checkpoint manifests ------------------------------------------------------------------------------

def damage(ck, how):
    if how == "delete driver_state":
        (ck / "driver_state.json").unlink()
    elif how == "truncate buffer":
        (ck / "buffer.parquet").write_bytes((ck / "buffer.parquet").read_bytes()[:100])
    elif how == "flip a byte":
        data = bytearray((ck / "learner" / "state.pt").read_bytes())
        data[5] ^= 1
        (ck / "learner" / "state.pt").write_bytes(bytes(data))
    elif how == "delete manifest":
        (ck / "manifest.json").unlink()
    elif how == "garble manifest":
        (ck / "manifest.json").write_text("{not json")


@pytest.mark.parametrize("how, problem", [
    ("delete driver_state", "driver_state.json is missing"),
    ("truncate buffer", "buffer.parquet has 100 bytes, expected 1008"),
    ("flip a byte", "learner/state.pt does not match its checksum"),
    ("delete manifest", "no manifest.json, and buffer.parquet is missing or unreadable"),
    ("garble manifest", "manifest.json is unreadable"),
])
def test_a_damaged_checkpoint_is_detected(tmp_path, how, problem):
    run = fake_run(tmp_path)
    ck = run / "checkpoints" / "step-000015"
    assert verify_checkpoint(ck) is None
    damage(ck, how)
    assert verify_checkpoint(ck) == problem
    assert scan_checkpoints(run) == (run / "checkpoints" / "step-000010", [(ck, problem)])


@pytest.mark.parametrize("how, problem", [
    (None, None),  # whole: usable, though nothing can be checksummed
    ("driver_state", "no manifest.json, and driver_state.json is unreadable"),
    ("learner", "no manifest.json, and learner/ is missing or empty"),
])
def test_a_checkpoint_from_before_manifests(tmp_path, how, problem):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = fake_run(tmp_path, steps=(15,))
    ck = run / "checkpoints" / "step-000015"
    (ck / "manifest.json").unlink()
    pq.write_table(pa.table({"x": [1, 2]}), ck / "buffer.parquet")
    if how == "driver_state":
        (ck / "driver_state.json").write_text("{")
    elif how == "learner":
        (ck / "learner" / "state.pt").unlink()
    assert verify_checkpoint(ck) == problem


def test_resume_uses_the_newest_intact_checkpoint_and_sets_the_damaged_aside(tmp_path, capsys):
    run = fake_run(tmp_path, steps=(5, 10, 15))
    damage(run / "checkpoints" / "step-000015", "truncate buffer")
    plan = plan_resume(run)
    assert capsys.readouterr().err.strip() == (
        "raykd: warning: checkpoint step-000015 is damaged (buffer.parquet has 100 bytes, expected 1008); "
        "kept as damaged-step-000015; using step-000010")
    assert plan.checkpoint.name == "step-000010"
    assert (run / "checkpoints" / "step-000015").exists()  # nothing moved until the resume goes ahead
    commit_resume(plan)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged-step-000015", "step-000005", "step-000010"]


def test_no_intact_checkpoint_is_one_clear_error(tmp_path, capsys):
    run = fake_run(tmp_path)
    damage(run / "checkpoints" / "step-000015", "delete driver_state")
    damage(run / "checkpoints" / "step-000010", "delete manifest")
    before = snapshot(run)
    code, err = cli(capsys, "--resume", run)
    assert (code, err) == (2, f"raykd: error: --resume {run}: no intact checkpoint under {run}/checkpoints "
                              "(step-000015: driver_state.json is missing; step-000010: no manifest.json, and "
                              "buffer.parquet is missing or unreadable)")
    assert snapshot(run) == before


def test_a_run_without_checkpoints(tmp_path, capsys):
    run = fake_run(tmp_path, steps=())
    code, err = cli(capsys, "--resume", run)
    assert (code, err) == (2, f"raykd: error: --resume {run}: no intact checkpoint under {run}/checkpoints "
                              "(none written yet)")


# -- 4. config files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_text(""), "{p} is empty; for every default, write `{{}}` in it"),
    (lambda p: p.write_text("# only a comment\n"), "{p} is empty; for every default, write `{{}}` in it"),
    (lambda p: p.mkdir(), "config file {p} is a directory"),
    (lambda p: None, "config file {p} does not exist"),
    (lambda p: p.write_text("- a\n"), "{p}: top level must be a mapping"),
])
def test_config_file_errors(tmp_path, capsys, write, message):
    p = tmp_path / "c.yaml"
    write(p)
    code, err = cli(capsys, p, "--run-dir", tmp_path / "run")
    assert (code, err) == (2, "raykd: error: " + message.format(p=p))
    assert not (tmp_path / "run").exists()


def test_invalid_yaml_names_line_and_column(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  max_steps: 3\n  lr: [1, 2\nloss: {}\n")
    code, err = cli(capsys, p)
    assert (code, err) == (2, f"raykd: error: {p}:4:5: invalid YAML: expected ',' or ']', but got ':'")


@pytest.mark.parametrize("key", ["data.source", "eval.source"])
def test_a_directory_where_a_data_file_belongs(tmp_path, capsys, key):
    d = tmp_path / "prompts.jsonl"
    d.mkdir()
    (tmp_path / "c.yaml").write_text("{}")
    code, err = cli(capsys, tmp_path / "c.yaml", "--set", f"{key}={d}")
    assert (code, err) == (2, f"raykd: error: {key}='{d}': is a directory, not a file")


# -- where a checkpoint's step lies in a (changed) schedule ----------------------------------------------

@pytest.mark.parametrize("steps, step, saved, expect", [
    ([40], 15, (0, 15), (0, 15)),     # unchanged
    ([60], 40, (1, 0), (0, 40)),      # a finished run extended by --allow-config-change
    ([10, 30], 10, (0, 10), (0, 10)),  # at a phase boundary: the saved pair agrees
    ([5, 35], 10, (0, 10), (1, 5)),   # phase boundaries moved
    ([10, 30], 40, (2, 0), (2, 0)),   # finished
])
def test_phase_position(steps, step, saved, expect):
    from driver.config import PhaseConfig

    assert phase_position([PhaseConfig(steps=s) for s in steps], step, *saved) == expect


def test_a_run_saved_with_max_steps_beside_its_schedule_still_resumes(tmp_path):
    """Runs written before the schedule set learner.max_steps saved the unused default (20) beside a
    schedule; a new config with both that disagree is refused, the saved one resumes as scheduled."""
    run = fake_run(tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["learner"]["max_steps"] = 20
    saved["schedule"] = [{"kind": "online", "steps": 30}]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    plan = plan_resume(run)
    assert (plan.step, plan.cfg.learner.max_steps, plan.cfg.total_steps(), plan.changes) == (15, 30, 30, [])
    with pytest.raises(Exception, match=r"learner.max_steps=20: a schedule sets the run's length \(30 steps"):
        load_config(run / "config.yaml")


def test_a_checkpoint_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import collections
    import shutil

    from driver.runs import dir_bytes, save_failed_on_a_full_disk

    ckpt = tmp_path / "checkpoints" / "step-000004"
    (ckpt / "learner").mkdir(parents=True)
    (ckpt / "learner" / "model.pt").write_bytes(b"x" * 3000)
    (ckpt / "buffer.parquet").write_bytes(b"y" * 1000)
    assert dir_bytes(ckpt) == 4000 and dir_bytes(tmp_path / "absent") == 0
    usage = collections.namedtuple("usage", "total used free")
    # what torch.save raised inside the learner when the disk filled (a Ray error: many lines)
    err = RuntimeError("ray::Learner.save_checkpoint()\n  ...\nRuntimeError: [enforce fail at "
                       "inline_container.cc:672] . unexpected pos 297325376 vs 297325264")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 27 << 20))  # 27 MiB free
    e = save_failed_on_a_full_disk(tmp_path / "checkpoints", 6, err, 300 << 20, tmp_path)
    assert isinstance(e, RunDirError)
    assert str(e) == (f"{tmp_path / 'checkpoints'}: saving the step-000006 checkpoint failed with 27 MiB free "
                      "on its disk (a checkpoint here takes 300 MiB): RuntimeError: [enforce fail at "
                      "inline_container.cc:672] . unexpected pos 297325376 vs 297325264. The previous "
                      f"checkpoint is intact; free some space, then continue with: raykd train --resume {tmp_path}")
    # room for another checkpoint and 64 MiB more: not the disk, the save's own error stands
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 0, (300 + 65) << 20))
    assert save_failed_on_a_full_disk(tmp_path, 6, err, 300 << 20, tmp_path) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 0, (300 + 63) << 20))
    assert save_failed_on_a_full_disk(tmp_path, 6, err, 300 << 20, tmp_path) is not None
