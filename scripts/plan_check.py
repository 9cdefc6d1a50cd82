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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ecavg.plan import measured_phases  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[0]).read_text())
    measured = measured_phases(json.loads((Path(argv[1]) / "results.json").read_text()))
    print(f"{'phase':<12}{'predicted s':>12}{'measured s':>12}{'ratio':>8}")
    for phase in plan["phases"]:
        if phase["phase"] in measured and phase["total_s"] > 0:
            m = measured[phase["phase"]]
            print(f"{phase['phase']:<12}{phase['total_s']:>12.2f}{m:>12.2f}{m / phase['total_s']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
