"""Command line: ``ecavg run``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ecavg import __version__


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="experiment TOML file (see configs/)")
    p.add_argument("--data-dir", "-d", help="directory holding <dataset>/ folders (not needed for mnist-sample)")
    p.add_argument("--output", "-o", type=Path, help="output directory (default runs/<name>-<timestamp>)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set edge.epochs=3 --set data.partition=dirichlet (repeatable)")


def _cmd_run(args: argparse.Namespace) -> int:
    from ecavg.config import apply_overrides, load_toml
    from ecavg.experiment import run_experiment
    from ecavg.report import results_table

    if args.resume is not None:
        if args.config is not None or args.overrides:
            raise _UsageError("--resume continues a run with the config it started with; drop --config/--set")
        results = run_experiment(data_dir=args.data_dir, resume=args.resume)
    else:
        if args.config is None:
            raise _UsageError("give --config FILE (e.g. configs/quickstart.toml) or --resume DIR")
        user = apply_overrides(load_toml(args.config), args.overrides)
        user.setdefault("name", args.config.stem)
        results = run_experiment(user, data_dir=args.data_dir, output_dir=args.output)
    print(results_table(results))
    print(f"Results written to {results['output_dir']}/ (results.json, results.md, accuracy.png, metrics.jsonl)")
    return 0


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecavg", description="Edge-cloud collaborative learning with averaged weights.")
    parser.add_argument("--version", action="version", version=f"ecavg {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment in this process (all edges simulated)")
    _add_run_arguments(run)
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted run in DIR")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    from ecavg.errors import USER_ERRORS

    try:
        return args.func(args)
    except _UsageError as e:
        parser.error(str(e))
    except USER_ERRORS as e:
        print(f"ecavg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "output", None) or "the output directory"
        print(f"\necavg: interrupted; finished phases are kept, continue with `ecavg run --resume {where}`",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
