"""Config parsing: typed tree, overrides, and one-line errors that name the dotted field."""

import pytest
import yaml

from driver.config import Config, ConfigError, dump_config, load_config


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, {"learner": {"lr": 1e-4, "max_steps": 7}}))
    assert isinstance(cfg, Config)
    assert cfg.learner.lr == 1e-4 and cfg.learner.max_steps == 7
    assert cfg.loss.type == "dpkd" and cfg.loss.beta == 0.1  # defaults from the dataclasses


def test_overrides_parse_yaml_scalars_and_lists(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["learner.lr=3e-4", "models.student_keep_layers=[0, 5]",
                                           "loss.length_normalize=false", "teacher.engine.num_cpus=2"])
    assert cfg.learner.lr == 3e-4
    assert cfg.models.student_keep_layers == [0, 5]
    assert cfg.loss.length_normalize is False
    assert cfg.teacher.engine.num_cpus == 2.0


def test_offline_torch_threads_is_auto_unless_a_number_is_given(tmp_path):
    assert load_config(None).learner.offline_torch_threads == "auto"
    assert load_config(None, ["learner.offline_torch_threads=3"]).learner.offline_torch_threads == 3
    assert load_config(None, ["learner.offline_torch_threads=0"]).learner.offline_torch_threads == 0


def test_int_field_accepts_int_float_field_accepts_int(tmp_path):
    cfg = load_config(write(tmp_path, {"learner": {"lr": 1}}))
    assert cfg.learner.lr == 1.0 and isinstance(cfg.learner.lr, float)


@pytest.mark.parametrize(
    "data, overrides, expect",
    [
        ({"lerner": {"lr": 1}}, [], "lerner: unknown key"),
        ({"learner": {"lrr": 1}}, [], "learner.lrr: unknown key"),
        ({}, ["learner.batch_size=abc"], "learner.batch_size='abc': expected an integer"),
        ({}, ["learner.batch_size=0"], "learner.batch_size=0: must be a positive integer"),
        ({}, ["learner.batch_size=-3"], "learner.batch_size=-3"),
        ({}, ["loss.type=kl"], "loss.type='kl': must be one of dpkd"),
        ({}, ["priming.strategy=shout"], "priming.strategy='shout': must be one of none"),
        ({}, ["learner.zero_stage=4"], "learner.zero_stage=4"),
        ({}, ["learner.offline_torch_threads=-1"], "learner.offline_torch_threads=-1: must be >= 0"),
        ({}, ["learner.offline_torch_threads=lots"],
         "learner.offline_torch_threads='lots': expected an integer, or must be one of 'auto'"),
        ({}, ["learner.lr=.nan"], "learner.lr=nan: must be a finite number"),
        ({}, ["engine=1"], "engine: unknown key"),
        ({}, ["run.name=../../etc"], "run.name='../../etc': letters, digits"),
        ({}, ["run.name=a/b"], "run.name='a/b'"),
        ({}, ["data.source=/nope/prompts.jsonl"], "data.source='/nope/prompts.jsonl': file does not exist"),
        ({}, ["data.source=prompts.csv"], "data.source='prompts.csv'"),
        ({}, ["buffer.sampling=random"], "buffer.sampling='random': must be one of 'fifo', 'uniform'"),
        ({}, ["loss.length_normalize=maybe"], "loss.length_normalize='maybe': expected true or false"),
        ({}, ["loss.topk_tail=spread"], "loss.topk_tail='spread': must be 'uniform'"),
        ({}, ["learner.batch_size=5", "learner.num_learners=2"], "divisible by learner.num_learners"),
        ({"models": {"student_keep_layers": None}}, [], "models.student=None"),
        ({}, ["teacher.engine.resources=[1]"], "teacher.engine.resources=[1]: expected a mapping"),
    ],
)
def test_bad_values_fail_with_the_dotted_field(tmp_path, data, overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data), overrides)
    msg = str(e.value)
    assert expect in msg
    assert "\n" not in msg  # one line


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_override_without_equals(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(write(tmp_path, {}), ["learner.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"run": {"name": "x"}}), ["loss.beta=0.2"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert paths
    for p in paths:
        load_config(p, check_files=False)  # their data paths exist where they run, not here


def test_schedule_of_phases(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "manifest.json").write_text("{}")
    cfg = load_config(write(tmp_path, {"loss": {"type": "dpkd"}, "schedule": [
        {"kind": "offline", "steps": 3, "data": str(ds), "loss": {"type": "sft"}},
        {"kind": "online", "steps": 5, "lr": 1.0e-5}], "learner": {"lr": 2.0e-4}}))
    phases = cfg.phases()
    assert [(p.kind, p.steps, p.loss.type, p.lr) for p in phases] == [("offline", 3, "sft", 2e-4),
                                                                       ("online", 5, "dpkd", 1e-5)]
    assert cfg.total_steps() == 8
    assert load_config(write(tmp_path, {"learner": {"max_steps": 4}})).phases()[0].steps == 4
    # with a schedule, learner.max_steps shows the run's length; a different one is refused, not ignored
    assert cfg.learner.max_steps == 8
    sched = {"schedule": [{"kind": "online", "steps": 5}, {"kind": "online", "steps": 2}]}
    assert load_config(write(tmp_path, {**sched, "learner": {"max_steps": 7}})).learner.max_steps == 7
    with pytest.raises(ConfigError, match=r"learner.max_steps=20: a schedule sets the run's length \(7 steps in 2"):
        load_config(write(tmp_path, {**sched, "learner": {"max_steps": 20}}))


@pytest.mark.parametrize("phase, expect", [
    ({"kind": "offline", "steps": 3, "data": "/nope", "loss": {"type": "sft"}},
     "schedule[0].data='/nope': must be a dataset directory"),
    ({"kind": "online", "steps": 0}, "schedule[0].steps=0: must be a positive integer"),
    ({"kind": "sideways", "steps": 1}, "schedule[0].kind='sideways': must be one of 'online', 'offline'"),
    ({"kind": "online", "steps": 1, "loss": {"type": "nope"}}, "schedule[0].loss.type='nope'"),
    ({"kind": "online", "steps": 1, "lr": 0}, "schedule[0].lr=0.0: must be > 0"),
])
def test_bad_schedule(tmp_path, phase, expect):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"schedule": [phase]}))
    assert expect in str(e.value)


OFF = {"kind": "offline", "steps": 2, "loss": {"type": "sft"}}


@pytest.mark.parametrize("schedule, extra, expect", [
    ([{**OFF, "teacher_answers": "offline"}], {},
     "schedule[0].teacher_answers='offline': only for online phases"),
    ([{"kind": "online", "steps": 1, "teacher_answers": "offline", "loss": {"type": "jsd"}}], {},
     "schedule[0].teacher_answers='offline': loss.type=jsd with these weights never reads the teacher's response"),
    ([{"kind": "online", "steps": 1, "teacher_answers": "offline", "loss": {"type": "dpkd"}}], {},
     "schedule[0].teacher_answers='offline': needs an offline phase before this one"),
    ([OFF, {"kind": "online", "steps": 1, "teacher_answers": "/nope", "loss": {"type": "dpkd"}}], {},
     "schedule[1].teacher_answers='/nope': must be 'offline' or a dataset directory"),
    ([OFF, {"kind": "online", "steps": 1, "teacher_answers": "offline", "loss": {"type": "dpkd"}}],
     {"teachers": [{"name": "a"}, {"name": "b"}], "route": {"weights": {"a": 1, "b": 1}}},
     "schedule[1].teacher_answers='offline': needs a single teacher"),
])
def test_bad_teacher_answers(tmp_path, schedule, extra, expect):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"schedule": schedule, **extra}))
    assert expect in str(e.value)


def test_teacher_answers_of_the_offline_phase(tmp_path):
    cfg = load_config(write(tmp_path, {"schedule": [
        OFF, {"kind": "online", "steps": 1, "teacher_answers": "offline", "loss": {"type": "dpkd"}}]}))
    assert cfg.schedule[1].teacher_answers == "offline" and cfg.schedule[0].teacher_answers is None


def test_phase_lr_with_a_deepspeed_config_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(ConfigError, match=r"schedule\[0\].lr=0.001: cannot be combined with learner.deepspeed_config"):
        load_config(write(tmp_path, {"learner": {"deepspeed_config": str(ds)},
                                     "schedule": [{"kind": "online", "steps": 1, "lr": 1e-3}]}))


def test_offline_phase_cannot_use_a_pairwise_loss(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"schedule\[0\].loss.type='dpkd': needs the student's responses"):
        load_config(write(tmp_path, {"schedule": [{"kind": "offline", "steps": 2, "data": str(ds)}]}))


# ------------------------------------------------------------------------------------ the loss's terms


def offline_ds(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir(exist_ok=True)
    (ds / "manifest.json").write_text("{}")
    return str(ds)


@pytest.mark.parametrize("loss, expect", [
    ({"type": "dpkd"}, {"kd_coef": 0.5, "sft_coef": 0.5, "student_ratio": None}),
    ({"type": "dpkd_token"}, {"kd_coef": 0.5, "sft_coef": 0.5, "student_ratio": None}),
    ({"type": "fkl"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 0.0}),
    ({"type": "rkl"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0}),
    ({"type": "jsd"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0}),
    ({"type": "skew_fkl"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0}),
    ({"type": "skew_rkl"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0}),
    ({"type": "tvd"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0}),
    ({"type": "sft"}, {"kd_coef": 0.0, "sft_coef": 1.0, "student_ratio": None}),
    ({"type": "pg_rkl"}, {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": None}),
    ({"type": "jsd", "sft_coef": 0.25, "student_ratio": 0.5}, {"kd_coef": 1.0, "sft_coef": 0.25, "student_ratio": 0.5}),
])
def test_resolved_loss_is_written_with_numbers(tmp_path, loss, expect):
    """The run directory's config.yaml shows every term's weight and sequences, for the top-level loss and
    a schedule phase's own loss alike; and it loads back to the same config."""
    cfg = load_config(write(tmp_path, {"loss": loss, "schedule": [{"kind": "online", "steps": 2, "loss": loss}]}))
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    written = yaml.safe_load(out.read_text())
    for section in (written["loss"], written["schedule"][0]["loss"]):
        assert {k: section[k] for k in expect} == expect
    assert load_config(out) == cfg


def test_a_phase_without_a_loss_takes_the_resolved_top_level_one(tmp_path):
    cfg = load_config(write(tmp_path, {"loss": {"type": "jsd"}, "schedule": [{"kind": "online", "steps": 2}]}))
    assert cfg.phases()[0].loss.student_ratio == 1.0 and cfg.phases()[0].loss.kd_coef == 1.0


@pytest.mark.parametrize("data, expect", [
    ({"loss": {"lm_coef": 0.5}}, "loss.lm_coef: renamed to sft_coef, the weight of cross-entropy on the teacher's "
                                 "response y_t"),
    ({"schedule": [{"kind": "online", "steps": 1, "loss": {"type": "dpkd", "lm_coef": 0.0}}]},
     "schedule[0].loss.lm_coef: renamed to sft_coef"),
    ({"loss": {"type": "rkl", "temperature": 2.0}}, "loss.temperature=2.0: must be 1 with loss.type=rkl: the learner "
                                                    "gets the teacher's top-k log-probs, and a tempered top-k divergence "
                                                    "is a different objective, not an approximation (set "
                                                    "loss.temperature=1)"),
    ({"schedule": [{"kind": "online", "steps": 1, "loss": {"type": "tvd", "temperature": 0.5}}]},
     "schedule[0].loss.temperature=0.5: must be 1"),
    ({"loss": {"type": "dpkd", "student_ratio": 0.5}}, "loss.student_ratio=0.5: only for the token-level divergences"),
    ({"loss": {"type": "pg_rkl", "student_ratio": 1.0}}, "loss.type=pg_rkl fixes its sequences"),
    ({"loss": {"type": "jsd", "student_ratio": 1.5}}, "loss.student_ratio=1.5: must be in [0, 1]"),
    ({"loss": {"type": "sft", "kd_coef": 0.5}}, "loss.kd_coef=0.5: must be 0 for loss.type=sft"),
    ({"loss": {"type": "dpkd", "kd_coef": 0.0, "sft_coef": 0.0}}, "loss.kd_coef=0.0: must be > 0 when loss.sft_coef is 0"),
    ({"loss": {"type": "fkl", "sft_coef": -0.1}}, "loss.sft_coef=-0.1: must be >= 0"),
    ({"loss": {"type": "fkl", "kd_coef": -1}}, "loss.kd_coef=-1.0: must be >= 0"),
])
def test_bad_loss_terms(tmp_path, data, expect):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_offline_phase_divergence_must_use_the_teacher_text(tmp_path):
    ds = offline_ds(tmp_path)
    with pytest.raises(ConfigError, match=r"schedule\[0\].loss.student_ratio=1.0: an offline phase has no student"):
        load_config(write(tmp_path, {"schedule": [{"kind": "offline", "steps": 2, "data": ds, "loss": {"type": "rkl"}}]}))
    with pytest.raises(ConfigError, match=r"schedule\[0\].loss.student_ratio=0.5"):
        load_config(write(tmp_path, {"loss": {"type": "fkl", "student_ratio": 0.5},
                                     "schedule": [{"kind": "offline", "steps": 2, "data": ds}]}))
    cfg = load_config(write(tmp_path, {"schedule": [{"kind": "offline", "steps": 2, "data": ds,
                                                     "loss": {"type": "rkl", "student_ratio": 0.0}}]}))
    assert cfg.phases()[0].loss.student_ratio == 0.0
    load_config(write(tmp_path, {"schedule": [{"kind": "offline", "steps": 2, "data": ds, "loss": {"type": "fkl"}}]}))


def test_student_vocab_size_needs_the_truncated_student(tmp_path):
    with pytest.raises(ConfigError, match=r"models.student_vocab_size=400: trims the truncated student, but "
                                          r"models.student='tiny' is given"):
        load_config(None, ["models.student=tiny", "models.student_vocab_size=400"])
    with pytest.raises(ConfigError, match=r"models.student_vocab_size=0: must be a positive integer"):
        load_config(None, ["models.student_vocab_size=0"])
