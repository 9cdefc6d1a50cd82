"""``run_experiment``: one experiment from config to output directory, in the embedded runtime.

The CLI (``ecavg run``) and notebooks call this same function.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ecavg.config import resolve_config
from ecavg.core.phases import own_weights_reader
from ecavg.core.transfer import Transfer
from ecavg.runtime.embedded import EmbeddedEdgePool
from ecavg.runtime.setup import RunDirectory, build_participants, default_output_dir, execute, prepare_compute
from ecavg.tracking import require_backend

log = logging.getLogger("ecavg")


def run_experiment(
    config: Mapping[str, Any] | None = None,
    *,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Run one experiment in the embedded runtime and return its results dict (as written to results.json).

    ``config`` is a dict as read from a TOML file (missing keys take defaults). With ``resume``, the run in that
    directory continues from its last finished phase, with the config and data dir it started with.
    """
    if resume is not None:
        run_dir, cfg, saved_data_dir = RunDirectory.for_resume(resume)
        data_dir = data_dir if data_dir is not None else saved_data_dir
        run_dir.prune_metrics()
        log.info("resuming %s", run_dir.path)
    else:
        cfg = resolve_config(config)
        run_dir = RunDirectory.for_new_run(output_dir if output_dir is not None else default_output_dir(cfg))
    require_backend(cfg)
    device, splits, load_s = prepare_compute(cfg, data_dir)
    participants = build_participants(cfg, splits, device)
    participants.server.new_model()  # a model that cannot be built fails here, before anything is written
    if resume is None:
        run_dir.start(cfg, str(data_dir) if data_dir is not None else None)
    pool = EmbeddedEdgePool(participants.edges, participants.union, Transfer.from_config(cfg),
                            own_weights=own_weights_reader(run_dir.store))
    log.info("%s: %s, %d edges, %s on %s, output %s", cfg["strategy"], cfg["data"]["dataset"],
             cfg["data"]["num_edges"], cfg["model"]["name"], device, run_dir.path)
    return execute(cfg, pool, participants.server, run_dir, runtime="embedded", device=device, load_s=load_s)
