"""The ``raykd`` command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _train(args) -> int:
    from driver.config import load_config
    from driver.online import run_online
    from driver.prepare import prepare

    from driver.online import latest_checkpoint
    from driver.prepare import SetupError

    cfg = load_config(args.config, args.set)
    if args.resume:
        from pathlib import Path

        if args.run_dir and Path(args.run_dir) != Path(args.resume):
            raise SetupError("--resume RUN_DIR continues that run in place; do not also give --run-dir")
        if latest_checkpoint(Path(args.resume)) is None:
            raise SetupError(f"--resume {args.resume}: no checkpoint under {args.resume}/checkpoints")
    prep = prepare(cfg, args.resume or args.run_dir)
    print(f"raykd: run directory {prep.run_dir}", file=sys.stderr)
    summary = run_online(cfg, prep, progress=not args.no_progress, resume=bool(args.resume))
    from driver.monitoring import format_summary

    print(format_summary(summary))
    if summary.get("interrupted_at"):
        print(f"raykd: stopped at step {summary['steps']}, checkpoint {summary['interrupted_at']}; continue "
              f"with: raykd train {args.config} --resume {prep.run_dir}", file=sys.stderr)
        return 130
    return 0


SUBCOMMAND_MODULES = ("driver.offline", "driver.evaluate", "driver.report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Distributed knowledge distillation on Ray")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an input error")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a distillation job from a YAML config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="dotted.key=value",
                   help="override a config value (repeatable)")
    t.add_argument("--run-dir", default=None, help="where to write the run (default runs/<name>-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint")
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
