"""Section ``deploy-overhead``: what ``ecavg deploy local`` costs per phase above Flower's own floor, in one run.

1. The floor: the no-op app (``bench/noop_app``: one empty message per round to each node, an empty reply) on a
   SuperLink and 2 SuperNodes started as ``ecavg deploy local`` starts them (``LocalFederation``), ``rounds`` rounds,
   each timed from the push to the last reply. The first round also pays each node's first message of a run (the
   app's install), as the hello does; the later rounds' median is the floor of every other phase.
2. ``ecavg deploy local`` of configs/quickstart.toml with ``threads=1``: ``deploy.phase_wall_s`` from results.json.
3. The same config embedded (``ecavg run``, a fresh process): ``timing_s`` from results.json.

Both 1 and 2 run once per ClientApp mode: ``per-message`` (Flower's default: the SuperNode's SuperExec starts a fresh
ClientApp process per message) and ``warm`` (``--warm-clientapps``: one long-lived runner per SuperNode). Per phase:
deployed, embedded, deployed - embedded, floor and the excess over the floor; the issue's goal is an excess <= 1 s.
The floor of each row is the per-message no-op app's (Flower's own path); the warm no-op is reported beside it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import REPO_ROOT, load_average, print_table

MODES = ("per-message", "warm")
DEFAULT_ROUNDS = 6
NUM_EDGES = 2
CONFIG = REPO_ROOT / "configs" / "quickstart.toml"
FLOOR_TIMEOUT_S = 600.0


def write_noop_app(app_dir: Path, *, rounds: int, output: Path) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text("\n".join([
        "[project]", 'name = "ecavg-noop"', 'version = "1.0.0"', 'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "ecavg"', "",
        "[tool.flwr.app.components]", 'serverapp = "bench.noop_app.server:server_app"',
        'clientapp = "bench.noop_app.client:client_app"', "",
        "[tool.flwr.app.config]", f"rounds = {rounds}", f"nodes = {NUM_EDGES}", f"output = {json.dumps(str(output))}",
        f"timeout-s = {FLOOR_TIMEOUT_S}", ""]))
    return app_dir


def noop_floor(mode: str, rounds: int, scratch: Path) -> dict[str, Any]:
    """The no-op app's round trips on a fresh SuperLink + SuperNodes (``mode``: their ClientApp mode)."""
    from ecavg.deploy.flwr_cli import submit_run
    from ecavg.deploy.processes import LocalFederation
    from ecavg.deploy.workdir import WorkDir

    output = scratch / f"noop-{mode}.json"
    started = time.monotonic()
    with WorkDir("deploy") as workdir, LocalFederation(workdir.path, scratch / f"logs-noop-{mode}") as federation:
        # Flower's processes import the app by name: the repository root is on their PYTHONPATH (offline_env).
        federation.start_superlink()
        for k in range(NUM_EDGES):
            federation.start_supernode(f"edge-{k}", {"partition-id": k}, warm_clientapp=mode == "warm")
        run_id = submit_run(federation.flwr, write_noop_app(workdir.path / "noop-app", rounds=rounds, output=output))
        deadline = time.monotonic() + FLOOR_TIMEOUT_S
        while not output.exists():
            if not federation.alive("superlink") or time.monotonic() > deadline:
                raise RuntimeError(f"the no-op run {run_id} ({mode}) wrote no {output.name}; logs in {scratch}")
            time.sleep(0.2)
    body = json.loads(output.read_text())
    seconds = [r["seconds"] for r in body["rounds"]]
    errors = {r["round"]: r["errors"] for r in body["rounds"] if r["errors"]}
    return {"mode": mode, "rounds": seconds, "first_round_s": seconds[0],
            "median_round_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "wall_s": round(time.monotonic() - started, 3), "errors": errors}


def deployed(mode: str, scratch: Path) -> dict[str, Any]:
    from ecavg.config import load_toml
    from ecavg.deploy import deploy_local

    user = load_toml(CONFIG)
    user["threads"] = 1
    user.setdefault("name", "quickstart")
    # A loaded machine has taken more than the default 300 s to start the first ClientApp processes: this measures,
    # it does not test the timeout.
    user["deploy"] = {**user.get("deploy", {}), "connect_timeout_s": 1800.0}
    started = time.monotonic()
    results = deploy_local(user, edges=NUM_EDGES, output_dir=scratch / f"deploy-{mode}", timeout_s=1800,
                           warm_clientapps=mode == "warm")
    return {"mode": mode, "phase_wall_s": results["deploy"]["phase_wall_s"], "timing_s": results["timing_s"],
            "wall_s": round(time.monotonic() - started, 3),
            "edge_accuracy_after": [e["accuracy_after"] for e in results["edges"]]}


def embedded(scratch: Path) -> dict[str, Any]:
    out = scratch / "embedded"
    command = [sys.executable, "-m", "ecavg.cli", "run", "--config", str(CONFIG), "--set", "threads=1",
               "--output", str(out), "--no-report"]
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    results = json.loads((out / "results.json").read_text())
    return {"timing_s": results["timing_s"], "wall_s": round(time.monotonic() - started, 3),
            "edge_accuracy_after": [e["accuracy_after"] for e in results["edges"]]}


def measured(stage, label: str) -> dict[str, Any]:
    """One stage's figures with the load average after it; a stage that fails is recorded, and the others run."""
    started_load = load_average()
    try:
        result = stage()
    except Exception as error:  # noqa: BLE001 - a loaded machine can time a stage out: keep the rest of the run
        print(f"  {label}: FAILED: {error}")
        return {"error": f"{type(error).__name__}: {error}"[:2000], "load_average_before": started_load,
                "load_average": load_average()}
    print(f"  {label}: {result.get('rounds') or result.get('phase_wall_s') or result.get('timing_s')}")
    return {**result, "load_average_before": started_load, "load_average": load_average()}


def phase_rows(deploy: dict[str, Any], embed: dict[str, Any], floors: dict[str, dict[str, Any]],
               ) -> list[dict[str, Any]]:
    """Per phase: deployed, embedded, their difference, and for each floor measured its value and the excess."""
    rows = []
    for phase, wall in deploy["phase_wall_s"].items():
        base = float(embed["timing_s"].get(phase, 0.0))  # the hello and the data upload have no embedded twin
        row: dict[str, Any] = {"phase": phase, "deployed_s": round(wall, 3), "embedded_s": round(base, 3),
                               "deployed_minus_embedded_s": round(wall - base, 3)}
        for mode, floor in floors.items():
            key = mode.replace("-", "_")
            floor_s = floor["first_round_s"] if phase == "hello" else floor["median_round_s"]
            row[f"floor_{key}_s"] = round(floor_s, 3)
            row[f"excess_over_floor_{key}_s"] = round(wall - base - floor_s, 3)
        rows.append(row)
    return rows


def run(modes: Sequence[str] = MODES, rounds: int = DEFAULT_ROUNDS) -> dict[str, Any]:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown ClientApp mode(s) {unknown}; choose from {', '.join(MODES)}")
    body: dict[str, Any] = {"config": "configs/quickstart.toml --set threads=1", "edges": NUM_EDGES,
                            "noop_rounds": rounds, "floor": {}, "deployed": {}, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="ecavg-bench-deploy-") as tmp:
        scratch = Path(tmp)
        for mode in modes:
            body["floor"][mode] = measured(lambda m=mode: noop_floor(m, rounds, scratch), f"no-op floor ({mode})")
        for mode in modes:
            body["deployed"][mode] = measured(lambda m=mode: deployed(m, scratch), f"deploy local ({mode})")
        body["embedded"] = measured(lambda: embedded(scratch), "embedded")
    floors = {m: f for m, f in body["floor"].items() if "error" not in f}
    if not floors or "error" in body["embedded"]:
        body["summary"] = {"error": "no floor or no embedded run was measured"}
        return body
    summary: dict[str, Any] = {"embedded_wall_s": body["embedded"]["wall_s"],
                               "floor_median_round_s": {m: f["median_round_s"] for m, f in floors.items()}}
    for mode in [m for m in modes if "error" not in body["deployed"][m]]:
        rows = phase_rows(body["deployed"][mode], body["embedded"], floors)
        body["phases"][mode] = rows
        print_table(f"deploy local ({mode} ClientApps) against embedded and the no-op app's round trip (floor) "
                    f"with each kind of ClientApp",
                    ["phase", "deployed s", "embedded s", "deployed - embedded",
                     *[f"{label} {m}" for m in floors for label in ("floor", "excess over")]],
                    [[r["phase"], r["deployed_s"], r["embedded_s"], r["deployed_minus_embedded_s"],
                      *[r[f"{key}_{m.replace('-', '_')}_s"] for m in floors for key in ("floor", "excess_over_floor")]]
                     for r in rows])
        summary[mode] = {"deployed_wall_s": body["deployed"][mode]["wall_s"],
                         **{f"max_excess_over_floor_{k}_s": max(r[f"excess_over_floor_{k}_s"] for r in rows)
                            for k in (m.replace("-", "_") for m in floors)}}
    body["summary"] = summary
    return body
