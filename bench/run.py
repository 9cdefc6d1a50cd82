"""ECAvg benchmarks: ``python bench/run.py [--quick] [--sections ...] [--e2e]``.

Sections (default: training, aggregation, transfer; ``experiments`` joins them in full mode):

  training     samples/s of our trainer against the plain pipeline, and as a fraction of the sgemm peak
  aggregation  averaging K = 2, 10, 100 ResNet50 state dicts against the memory-bandwidth floor; peak memory
  transfer     bytes on the wire, safetensors GB/s, compression codecs and their accuracy cost
  experiments  variants of the trainer (threads, memory format, batch size, bf16 autocast, torch.compile)
  e2e          (long, only with --e2e or --sections e2e) CIFAR-10 MobileNetV2 ECAvg end to end
  scale        (only with --sections scale) ECAvg with 10, 100, 1,000 edges: wall time, peak RSS, checkpoint disk
  deploy-overhead  (only with --sections deploy-overhead) `ecavg deploy local` per phase against embedded and
               against a no-op Flower app's round trip on the same kind of federation (written as deploy_overhead)
  time-to-accuracy  (only with --sections time-to-accuracy) configs/fast/ runs, ECAvg and centralized, timed to
               the paper's after-update accuracy on every edge (written as time_to_accuracy)

Every section prints a table and is merged into bench/results/latest.json (schema in bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python bench/run.py`): make the repository root importable for `bench` and `ecavg`.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA_DIR,
    LATEST,
    RESULTS_DIR,
    earlier_section,
    load_average,
    now_iso,
    write_results,
)
from ecavg.host import host_info

SECTIONS = ("training", "aggregation", "transfer", "experiments", "e2e", "scale", "deploy-overhead", "time-to-accuracy")
DEFAULT_SECTIONS = ("training", "aggregation", "transfer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (under 5 minutes in all)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated sections from {', '.join(SECTIONS)} "
                             f"(default: {', '.join(DEFAULT_SECTIONS)}"
                             ", plus experiments when not --quick)")
    parser.add_argument("--e2e", action="store_true", help="run only the long end-to-end section 4")
    parser.add_argument("--e2e-parts", default="fast+smallmap,plain,ours,ours+smallmap",
                        help="e2e parts to run, in order (plain, ours, ours+smallmap, fast, fast+smallmap)")
    parser.add_argument("--models", default=None,
                        help="comma-separated models for the training and experiments sections "
                             "(mlp, cnn, resnet18, mobilenet_v2, resnet50)")
    parser.add_argument("--ks", default=None, help="comma-separated K values for the aggregation section")
    parser.add_argument("--no-plain", action="store_true", help="training: skip the plain pipeline")
    parser.add_argument("--scale-ks", default=None, help="comma-separated numbers of edges for the scale section "
                                                         "(embedded; default 10,100,1000)")
    parser.add_argument("--scale-sim-ks", default=None, help="comma-separated numbers of edges for the scale "
                                                             "section's Flower simulation (default 10,100; '' none)")
    parser.add_argument("--deploy-modes", default="per-message,warm",
                        help="deploy-overhead: ClientApp modes to measure (per-message: Flower's fresh process per "
                             "message; warm: --warm-clientapps)")
    parser.add_argument("--noop-rounds", type=int, default=None, help="deploy-overhead: rounds of the no-op app")
    parser.add_argument("--tasks", default=None,
                        help="time-to-accuracy: comma-separated tasks of configs/fast/ (default cifar10_mobilenetv2; "
                             "also cifar100_resnet50)")
    parser.add_argument("--keep-runs", type=Path, default=None,
                        help="time-to-accuracy: keep the runs as DIR/<task>/fast/strategy=<ecavg|centralized> "
                             "(e.g. results)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="where the plain baseline's extracted JPEG trees live")
    parser.add_argument("--output", type=Path, default=LATEST, help="results file to merge into")
    return parser.parse_args(argv)


def selected_sections(args: argparse.Namespace) -> list[str]:
    if args.e2e:
        return ["e2e"]
    if args.sections:
        names = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in names if s not in SECTIONS]
        if unknown:
            raise SystemExit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return names
    return list(DEFAULT_SECTIONS) + ([] if args.quick else ["experiments"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = [Path(sys.executable).name, "bench/run.py", *(argv if argv is not None else sys.argv[1:])]
    sections = selected_sections(args)
    print(f"bench: sections {', '.join(sections)} ({'quick' if args.quick else 'full'}); {json.dumps(host_info())}")
    started = time.perf_counter()
    for name in sections:
        section_started = time.perf_counter()
        load_before = load_average()
        if name == "training":
            from bench import training

            models = args.models.split(",") if args.models else tuple(training.CASES)
            bench = training.Workbench(args.data_dir, args.cache_dir)
            body = training.run(models, quick=args.quick, bench=bench, with_plain=not args.no_plain)
        elif name == "aggregation":
            from bench import aggregation

            ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else aggregation.DEFAULT_KS
            body = aggregation.run(ks)
        elif name == "transfer":
            from bench import transfer

            body = transfer.run(quick=args.quick, data_dir=args.data_dir)
        elif name == "experiments":
            from bench import training

            bench = training.Workbench(args.data_dir, args.cache_dir)
            chosen = {"models": args.models.split(",")} if args.models else {}
            body = training.run_experiments(**chosen, quick=args.quick, bench=bench)
        elif name == "e2e":
            from bench import e2e

            partial_path = RESULTS_DIR / f"e2e-{now_iso().replace(':', '')}.json"

            def save_partial(results: dict, path: Path = partial_path) -> None:
                # A long run keeps what it has: each finished part is written at once.
                path.write_text(json.dumps(results, indent=2, default=str) + "\n")

            body = e2e.run([p.strip() for p in args.e2e_parts.split(",") if p.strip()], data_dir=args.data_dir,
                           cache_dir=args.cache_dir, on_part=save_partial)
        elif name == "scale":
            from bench import scale

            def numbers(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
                return default if text is None else tuple(int(k) for k in text.split(",") if k.strip())

            body = scale.run(args.data_dir, numbers(args.scale_ks, scale.DEFAULT_KS),
                             numbers(args.scale_sim_ks, scale.DEFAULT_SIM_KS))
        elif name == "deploy-overhead":
            from bench import deploy_overhead

            body = deploy_overhead.run([m.strip() for m in args.deploy_modes.split(",") if m.strip()],
                                       rounds=args.noop_rounds or deploy_overhead.DEFAULT_ROUNDS)
        elif name == "time-to-accuracy":
            from bench import time_to_accuracy

            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else \
                time_to_accuracy.DEFAULT_TASKS
            body = time_to_accuracy.run(args.data_dir, tasks, keep_runs=args.keep_runs)
            body = time_to_accuracy.keep_other_tasks(body, earlier_section(args.output, "time_to_accuracy"))
        else:  # pragma: no cover - selected_sections validates names
            raise AssertionError(name)
        body = {**body, "seconds": time.perf_counter() - section_started,
                "load_average_before": load_before, "load_average_after": load_average()}
        path = write_results({name.replace("-", "_"): body}, path=args.output, command=command)
        print(f"[{name}: {body['seconds']:.0f} s; load average {load_before} -> {body['load_average_after']}; "
              f"written to {path}]")
    print(f"bench: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
