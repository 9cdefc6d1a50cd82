"""What each transfer codec costs a trained model: its server model sent once under each codec, scored on the test set.

    python bench/codec_trained.py RUN_DIR [RUN_DIR ...] [--data-dir D] [--threads N]

For each finished run directory (an ``ecavg run`` output with ``server.safetensors``), the server's final weights
are encoded and decoded under every codec of ``ecavg.core.codecs.CODECS`` exactly as a transfer does
(``ecavg.core.transfer.Transfer``, sent whole: the first download of a run, or any download without
``transfer.delta``), and each decoded copy is scored on the run's full test set, as results.json scores
``accuracy_finetuned``. The difference from fp32 is what one transfer of that model costs, free of the training
noise that separates whole runs with different codecs (docs/findings.md, "What a codec costs in accuracy"), and
for any model a user has trained, at any scale. The data and model are rebuilt from the run's own config.json;
``--data-dir`` overrides the directory it recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script (`python bench/codec_trained.py`): make the repository root importable for `bench` and `ecavg`.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, print_table
from ecavg.core.codecs import CODECS
from ecavg.core.serialization import load_state_dict
from ecavg.core.transfer import Transfer
from ecavg.errors import ConfigError, EcavgError
from ecavg.host import host_info
from ecavg.runtime.setup import RunDirectory, build_participants, prepare_compute


def measure(run: Path, data_dir: str | None, threads: int | None) -> list[dict[str, object]]:
    """One row per codec: bytes of the payload, its share of fp32's, test accuracy and its change from fp32."""
    weights_path = run / "server.safetensors"
    if not weights_path.is_file():
        raise ConfigError(f"{run}: no server.safetensors (is it a finished ecavg run directory?)")
    _, cfg, saved_data_dir = RunDirectory.for_resume(run)
    if threads:
        cfg["threads"] = threads
    device, splits, _ = prepare_compute(cfg, data_dir if data_dir is not None else saved_data_dir)
    server = build_participants(cfg, splits, device).server
    weights = load_state_dict(weights_path, name="server")
    rows: list[dict[str, object]] = []
    for name in CODECS:
        transfer = Transfer(name)
        payload = transfer.encode(weights)
        decoded = transfer.decode(payload, reference=weights, name=f"{name} payload")
        rows.append({"codec": name, "bytes": len(payload), "accuracy": server.evaluate(decoded)})
    fp32 = next(row for row in rows if row["codec"] == "fp32")
    for row in rows:
        row["of_fp32"] = row["bytes"] / fp32["bytes"]
        row["change_pp"] = 100 * (row["accuracy"] - fp32["accuracy"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished ecavg run directories")
    parser.add_argument("--data-dir", "-d", default=None, help="dataset directory (default: the one each run used)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.json:
        print(f"{json.dumps(host_info())}, load average before: {load_average():.2f}")
    results = {}
    for run in args.runs:
        try:
            rows = measure(run, args.data_dir, args.threads)
        except EcavgError as error:  # a missing or corrupt run, weights or dataset: one line, no traceback
            print(f"codec_trained: {error}", file=sys.stderr)
            return 2
        results[str(run)] = rows
        if not args.json:
            print_table(
                f"{run}: the server's model sent once under each codec, scored on the full test set",
                ["codec", "bytes", "of fp32", "accuracy", "change (pp)"],
                [[r["codec"], r["bytes"], f"{r['of_fp32']:.1%}", f"{100 * r['accuracy']:.2f}%",
                  f"{r['change_pp']:+.2f}"] for r in rows],
            )
    print(json.dumps(results, indent=2) if args.json else f"\nload average after: {load_average():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
