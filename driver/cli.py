"""The ``raykd`` command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path


def _train(args) -> int:
    import shlex

    cfg, run_dir, plan = _train_setup(args)  # light: no ray/torch import before these checks
    if plan is not None and plan.complete:
        print(f"raykd: {plan.run_dir} is complete ({plan.checkpoint.name} is the final step "
              f"{plan.step}); nothing to do", file=sys.stderr)
        return 0
    from driver.monitoring import format_summary
    from driver.online import run_online
    from driver.prepare import prepare

    from driver.runs import commit_resume

    prep = prepare(cfg, str(run_dir), resume=plan is not None, overwrite=args.overwrite)
    print(f"raykd: run directory {prep.run_dir}", file=sys.stderr)
    # a resume records config changes only once its checkpoint is restored, before any new step:
    # a refused or failed resume leaves config.yaml untouched
    summary = run_online(cfg, prep, progress=not args.no_progress,
                         resume=plan.checkpoint if plan is not None else False,
                         on_resumed=(lambda: commit_resume(plan)) if plan is not None else None)
    print(format_summary(summary))
    if summary.get("interrupted_at"):
        print(f"raykd: stopped at step {summary['steps']}, checkpoint {summary['interrupted_at']}; continue "
              f"with: raykd train --resume {shlex.quote(str(prep.run_dir))}", file=sys.stderr)
        return 130
    return 0


def _train_setup(args):
    """(config, run directory, resume plan or None), checked before anything is written."""
    from driver.config import load_config
    from driver.runs import RunDirError as SetupError
    from driver.runs import claim_run_dir, plan_resume

    if args.resume:
        if args.run_dir and Path(args.run_dir) != Path(args.resume):
            raise SetupError("--resume RUN_DIR continues that run in place; do not also give --run-dir")
        if args.overwrite:
            raise SetupError("--overwrite starts a run over; it cannot be combined with --resume")
        plan = plan_resume(args.resume, args.config, args.set, args.allow_config_change)
        return plan.cfg, plan.run_dir, plan
    if args.config is None:
        raise SetupError("train: a config file is required (or --resume RUN_DIR to continue a run)")
    if args.allow_config_change:
        raise SetupError("--allow-config-change only applies with --resume RUN_DIR")
    cfg = load_config(args.config, args.set)
    return cfg, claim_run_dir(cfg, args.run_dir, args.overwrite), None


SUBCOMMAND_MODULES = ("driver.offline", "driver.evaluate", "driver.report", "driver.grafana")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Distributed knowledge distillation on Ray")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an input error")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a distillation job from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (optional with --resume: the run's saved config)")
    t.add_argument("--set", action="append", default=[], metavar="dotted.key=value",
                   help="override a config value (repeatable)")
    t.add_argument("--run-dir", default=None, help="where to write the run (default runs/<name>-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest intact checkpoint, with its saved config")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config/--set that differs from the saved one (recorded)")
    t.add_argument("--overwrite", action="store_true", help="clear an existing run in --run-dir first")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    # Other subcommands live with their code: each module has register(subparsers), which adds a
    # parser whose `func(args) -> int` runs it. Imports stay light (no ray/torch at parse time).
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    for command in sub.choices.values():  # also accepted after the subcommand: `raykd train --debug`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an input error")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from kd.errors import UserInputError

    try:
        return args.func(args)
    except UserInputError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"raykd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
