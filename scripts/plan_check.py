"""Compare an `ecavg plan --json` prediction with a deployed run: measured / predicted seconds per phase.

    ecavg plan --config C --set threads=1 [--link ...] --json > plan.json
    ecavg deploy local --config C --set threads=1 [--link ...] --output RUN
    python scripts/plan_check.py plan.json RUN

Message exchanges are compared with results.json ``deploy.phase_wall_s``; the server's steps with ``timing_s``
(``aggregate``, and ``finetune`` / ``centralized`` under timing_s.finetune).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def measured_phases(run_dir: Path) -> dict[str, float]:
    results = json.loads((run_dir / "results.json").read_text())
    timing = results.get("timing_s", {})
    measured = {"aggregate": timing.get("aggregate"), "finetune": timing.get("finetune"),
                "centralized": timing.get("finetune")}
    measured.update(results.get("deploy", {}).get("phase_wall_s", {}))
    return {k: float(v) for k, v in measured.items() if v}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[0]).read_text())
    measured = measured_phases(Path(argv[1]))
    print(f"{'phase':<12}{'predicted s':>12}{'measured s':>12}{'ratio':>8}")
    for phase in plan["phases"]:
        if phase["phase"] in measured and phase["total_s"] > 0:
            m = measured[phase["phase"]]
            print(f"{phase['phase']:<12}{phase['total_s']:>12.2f}{m:>12.2f}{m / phase['total_s']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
