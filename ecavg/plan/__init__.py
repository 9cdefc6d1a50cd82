"""``ecavg plan``: how long each phase of a run will take deployed on Flower, before running it.

``ecavg.plan.model`` is the time model (a pure function of numbers, unit-tested); ``ecavg.plan.inputs`` counts
the bytes, builds the partition and measures (``--calibrate``) or reads (``--from RUN_DIR``) the compute rates;
:func:`make_plan` puts them together and :func:`plan_table` prints the result.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ecavg.deploy.rates import format_rate
from ecavg.errors import ConfigError
from ecavg.formatting import transfer_label
from ecavg.plan.model import (
    FLOWER_ROUTING_S,
    MESSAGE_OVERHEAD_S,
    ComputeRates,
    EdgeInputs,
    Payloads,
    PhaseEstimate,
    PlanInputs,
    crossover_rate_bps,
    predict,
    round_summary,
)

__all__ = [
    "FLOWER_ROUTING_S",
    "MESSAGE_OVERHEAD_S",
    "ComputeRates",
    "EdgeInputs",
    "Payloads",
    "PhaseEstimate",
    "PlanInputs",
    "crossover_rate_bps",
    "make_plan",
    "measured_phases",
    "plan_table",
    "predict",
    "round_summary",
]


def make_plan(cfg: dict[str, Any], *, data_dir: str | None, links: Mapping[int, int],
              cpu_shares: Mapping[int, float], from_runs: Sequence[Path] = (),
              message_overhead_s: float | None = None, warm_clientapps: bool = False) -> dict[str, Any]:
    """The plan of ``cfg`` (resolved): inputs, per-phase estimates and the run's summary, as JSON-ready data.
    ``from_runs``: earlier runs to read the compute rates (and, if deployed, Flower's overhead) from, the median of
    each figure over them; none: calibrate here. ``warm_clientapps``: a deployment with one long-lived ClientApp
    per SuperNode (``ecavg deploy local --warm-clientapps``)."""
    from ecavg.plan import inputs

    if cfg["strategy"] not in ("ecavg", "fedavg", "centralized", "local"):
        raise ConfigError(f"ecavg plan has no time model for strategy = {cfg['strategy']!r} "
                          "(it models ecavg, fedavg, centralized and local)")
    if message_overhead_s is not None and not 0.0 <= message_overhead_s < float("inf"):
        raise ConfigError(f"--message-overhead must be a number of seconds >= 0, got {message_overhead_s!r}")
    bases = ([(f"the run in {run} used", inputs.run_config(run).get("threads")) for run in from_runs]
             or [("the config has", cfg["threads"])])
    for where, basis_threads in bases if cpu_shares else ():
        if basis_threads != 1:
            raise ConfigError(f"--edge-cpu is a share of one core, relative to one-thread compute, but {where} "
                              f"threads = {basis_threads}; plan with --set threads=1 (and deploy with it too)")
    participants = inputs.setup(cfg, data_dir)
    overheads = None
    if from_runs:
        rates = inputs.median_rates([inputs.rates_from_run(run, cfg) for run in from_runs])
        source = f"read from {', '.join(str(run) for run in from_runs)}"
        if any(share < 1.0 for share in cpu_shares.values()):
            # A CPU share slows the edge's process start too: time it here (the runs do not separate it).
            start, _ = inputs.edge_start_seconds(cfg, data_dir)
            rates = replace(rates, edge_start_s=start)
            source += f"; edge process start {start:.1f} s timed here (divided by an edge's CPU share)"
        fitted = [o for o in (inputs.overheads_from_run(run, rates, data_dir) for run in from_runs) if o is not None]
        if fitted:
            overheads = inputs.median_overheads(fitted)
            runs = "that deployed run" if len(fitted) == 1 else f"those {len(fitted)} deployed runs (median)"
            source += (f"; Flower's overhead fitted to {runs} (message {overheads.message_s:.1f} s, first message "
                       f"{overheads.hello_s:.1f} s, first optimizer {overheads.train_start_s:.1f} s"
                       + (f", the server's {overheads.server_train_start_s:.1f} s"
                          if overheads.server_train_start_s is not None else "") + ")")
    else:
        rates = inputs.calibrate(cfg, participants, data_dir=data_dir)
        source = (f"calibrated here (threads = {cfg['threads']}; edge process start {rates.edge_start_s:.1f} s, "
                  f"first optimizer {rates.train_start_s:.1f} s)")
    plan_in = inputs.plan_inputs(cfg, participants, rates, data_dir=data_dir, links=links, cpu_shares=cpu_shares,
                                 message_overhead_s=message_overhead_s, overheads=overheads,
                                 warm_clientapps=warm_clientapps)
    phases = predict(plan_in)
    crossover = crossover_rate_bps(plan_in)
    return {
        "config": {"strategy": cfg["strategy"], "dataset": cfg["data"]["dataset"], "model": cfg["model"]["name"],
                   "edges": cfg["data"]["num_edges"], "transfer": dict(cfg["transfer"]), "threads": cfg["threads"]},
        "compute_source": source,
        "rates": plan_in.rates.__dict__,
        "payloads": plan_in.payloads.__dict__,
        "edges": [e.__dict__ for e in plan_in.edges],
        "message_overhead_s": plan_in.message_overhead_s,
        "hello_overhead_s": plan_in.hello_overhead_s,
        "train_start_s": plan_in.train_start_s,
        "server_train_start_s": plan_in.server_train_start_s,
        "warm_clientapps": plan_in.warm_clientapps,
        "phases": [ph.to_dict() for ph in phases],
        "summary": round_summary(phases),
        "crossover_rate_bps": crossover,
    }


def measured_phases(results: Mapping[str, Any]) -> dict[str, float]:
    """What a deployed run's results.json says each planned phase took: message exchanges from
    ``deploy.phase_wall_s``, the server's steps from ``timing_s`` (a centralized run's training is its ``finetune``)."""
    timing = results.get("timing_s", {})
    measured = {"aggregate": timing.get("aggregate"), "finetune": timing.get("finetune"),
                "centralized": timing.get("finetune")}
    measured.update(results.get("deploy", {}).get("phase_wall_s", {}))
    return {k: float(v) for k, v in measured.items() if v}


def _bytes(n: int) -> str:
    if n == 0:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def plan_table(plan: Mapping[str, Any]) -> str:
    """The plan as text: one row per phase (the slowest edge's figures), then the run's total."""
    c = plan["config"]
    transfer = transfer_label(c["transfer"])
    links = sorted({format_rate(e["rate_bps"]) if e["rate_bps"] else "unlimited" for e in plan["edges"]})
    lines = [f"Plan: {c['strategy']} on {c['dataset']}, {c['model']}, {c['edges']} edges, transfer {transfer}, "
             f"links {', '.join(links)}; compute {plan['compute_source']}",
             f"Weights payload {_bytes(plan['payloads']['whole'])} whole"
             + (f", {_bytes(plan['payloads']['upload'])} as a delta" if plan["payloads"]["delta"] else "")
             + f"; Flower overhead {plan['message_overhead_s']:.1f} s per message ({plan['hello_overhead_s']:.1f} s "
               "for the first)", ""]
    header = ("phase", "compute s", "transfer s", "overhead s", "total s", "down/edge", "up/edge", "slowest",
              "dominant")
    rows = [header] + [(ph["phase"], f"{ph['compute_s']:.2f}", f"{ph['transfer_s']:.2f}", f"{ph['overhead_s']:.2f}",
                        f"{ph['total_s']:.2f}", _bytes(ph["bytes_down"]), _bytes(ph["bytes_up"]), ph["slowest"],
                        ph["dominant"]) for ph in plan["phases"]]
    s = plan["summary"]
    rows.append(("run", f"{s['compute_s']:.2f}", f"{s['communication_s']:.2f}", f"{s['overhead_s']:.2f}",
                 f"{s['total_s']:.2f}", "", "", "", s["dominant"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i in (0, 7, 8) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    if plan["crossover_rate_bps"]:
        crossover = float(f"{plan['crossover_rate_bps']:.3g}")  # an estimate: three significant digits
        lines += ["", f"Transfers outweigh compute below {format_rate(crossover)} per edge link "
                      "(the slowest edge's bytes over the run's compute time)."]
    if not any(e["rate_bps"] for e in plan["edges"]):
        lines.append("No --link given: transfers count as instantaneous.")
    return "\n".join(lines)
