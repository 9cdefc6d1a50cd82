"""Deploy ECAvg over emulated edge links, each run beside the `ecavg plan` prediction made before it.

    sudo python scripts/edge_conditions.py --config configs/quickstart.toml --set threads=1 \
        --output results/edge_conditions/mnist_mlp [--data-dir D] [--rates 100mbit,10mbit,1mbit] \
        [--codecs fp32,int8,int8+deflate] [--straggler] [--warm-clientapps]

1. `calibration/`, `calibration-2/`: `ecavg deploy local` twice with no shaping. `ecavg plan --from` reads the
   compute rates from them and fits Flower's per-message overhead to them (the median of the two: one run's
   exchanges vary by a few seconds with Flower's polling), so the plans below use nothing measured on another
   machine or day.
2. For each codec and rate, `codec=C,link=R/`: `plan.json` (`ecavg plan --from calibration --link all=R --set
   transfer.codec=C --json`, from both calibration runs), then `ecavg deploy local --link all=R --set transfer.codec=C`
   (a codec named like `int8+deflate` or `int8+delta` also sets `transfer.deflate` or `transfer.delta`).
3. With `--straggler`, `straggler,codec=C/` for the last codec: every link at the second rate, edge-1 at the
   slowest rate and half a core (`--edge-cpu edge-1=0.5`, hence `threads = 1`).

Each run directory keeps what the docs read (results.json, config.json, metrics.jsonl, results.md, plan.json,
command.json); weights and Flower's logs are removed. A finished run is skipped, so an interrupted
measurement resumes; `--replan` rewrites the finished runs' plans (still from the calibration runs alone).
`scripts/build_docs.py` renders the directory with `@@conditions`. Needs root (namespaces, veth pairs, tc), like
`ecavg deploy local --link`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KEEP = ("results.json", "config.json", "metrics.jsonl", "results.md", "plan.json", "command.json")


def ecavg(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecavg.cli", *args], **kwargs)


def prune(run: Path) -> None:
    """Keep what the docs read (results.json records the links and CPU shares); weights, checkpoints and logs go."""
    for path in run.iterdir():
        if path.name not in KEEP:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def deploy(run: Path, common: list[str], conditions: list[str], timeout_s: float) -> None:
    if (run / "results.json").exists():
        print(f"{run}: finished, kept")
        return
    if run.exists():  # an interrupted or failed run: kept aside for its logs, and started again
        attempt = 1
        while run.with_name(f"{run.name}.failed-{attempt}").exists():
            attempt += 1
        run.rename(run.with_name(f"{run.name}.failed-{attempt}"))
    command = ["deploy", "local", *common, *conditions, "--output", str(run), "--timeout", str(int(timeout_s))]
    started, load = time.time(), os.getloadavg()[0]
    print(f"{time.strftime('%H:%M:%S')} {run}: ecavg {' '.join(command)}", flush=True)
    done = ecavg(command)
    if done.returncode != 0 or not (run / "results.json").exists():
        raise SystemExit(f"{run}: ecavg deploy local failed (exit {done.returncode}); see {run}")
    (run / "command.json").write_text(json.dumps({
        "command": ["ecavg", *command], "wall_s": round(time.time() - started, 3), "load_average_before": load,
        "load_average_after": os.getloadavg()[0]}, indent=1) + "\n")
    prune(run)


def transfer_settings(label: str) -> list[str]:
    """``--set`` options for a transfer label as the docs write it: ``int8``, ``int8+delta``, ``int8+deflate``."""
    codec, *flags = label.split("+")
    unknown = sorted(set(flags) - {"delta", "deflate"})
    if unknown:
        raise SystemExit(f"--codecs: {label!r} has unknown flag(s) {', '.join(unknown)} (known: delta, deflate)")
    return [f"--set=transfer.codec={codec}", *(f"--set=transfer.{flag}=true" for flag in flags)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rates", default="100mbit,10mbit,1mbit")
    parser.add_argument("--codecs", default="fp32,int8")
    parser.add_argument("--straggler", action="store_true")
    parser.add_argument("--warm-clientapps", action="store_true",
                        help="every deployment (the calibration runs too) with one long-lived ClientApp per SuperNode")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per deployed run")
    parser.add_argument("--replan", action="store_true",
                        help="also rewrite the plan.json of finished runs (from the calibration runs only, as before "
                             "they ran), e.g. after a change to the time model")
    args = parser.parse_args(argv)
    common = ["--config", args.config, *(f"--set={o}" for o in args.overrides)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    # `ecavg plan --from` reads the calibration runs' overhead, so warm runs are planned from warm calibrations.
    warm = ["--warm-clientapps"] if args.warm_clientapps else []
    rates, codecs = args.rates.split(","), args.codecs.split(",")
    for codec in codecs:
        transfer_settings(codec)  # a bad label fails before the first deployment
    args.output.mkdir(parents=True, exist_ok=True)
    calibrations = [args.output / "calibration", args.output / "calibration-2"]
    for calibration in calibrations:
        deploy(calibration, common, warm, args.timeout)

    runs: list[tuple[str, list[str], str]] = [(f"codec={c},link={r}", [f"--link=all={r}"], c)
                                              for c in codecs for r in rates]
    if args.straggler:
        slow = [f"--link=all={rates[min(1, len(rates) - 1)]}", f"--link=edge-1={rates[-1]}", "--edge-cpu=edge-1=0.5"]
        runs.append((f"straggler,codec={codecs[-1]}", slow, codecs[-1]))
    for name, conditions, codec in runs:
        run = args.output / name
        finished = (run / "results.json").exists()
        if finished and not args.replan:
            print(f"{run}: finished, kept")
            continue
        plan = ecavg(["plan", *common, *transfer_settings(codec), *(f"--from={c}" for c in calibrations),
                      *conditions, *warm, "--json"], capture_output=True, text=True)
        if plan.returncode != 0:
            raise SystemExit(f"{run}: ecavg plan failed: {plan.stderr.strip().splitlines()[-1:]}")
        if not finished:
            deploy(run, [*common, *transfer_settings(codec)], [*conditions, *warm], args.timeout)
        (run / "plan.json").write_text(plan.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
