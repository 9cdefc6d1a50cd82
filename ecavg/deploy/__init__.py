"""Running an experiment on a Flower federation: ``ecavg deploy local``, ``ecavg deploy sim``, ``ecavg deploy submit``.

- ``drivers``: the three commands (and the Flower App they submit);
- ``processes``: process supervision: a SuperLink and SuperNodes on this machine, and stopping all of them and
  the helpers Flower starts;
- ``workdir``: the launcher's work directory and its watchdog, and removing what a killed launcher left;
- ``flwr_cli``: Flower's command-line tools: their offline environment, the ``flwr`` CLI and its output;
- ``reaper``: finding a deployment's processes, namespaces, links and cgroups by their tag (standard library only:
  also the watchdog script);
- ``links``: emulated edge links for ``deploy local --link`` (network namespaces, veth pairs, ``tc tbf``);
- ``conditions``: ``deploy local``'s edge conditions: the links and CPU shares (``--edge-cpu``, cgroup quotas);
- ``rates``: the parsers of ``--link`` and ``--edge-cpu`` values, shared by ``deploy local`` and ``ecavg plan``.
"""

from __future__ import annotations

from ecavg.deploy.drivers import (
    FAILURE_FILE,
    deploy_local,
    deploy_simulation,
    deploy_submit,
    follow_run,
    prepare_config,
    write_app,
)
from ecavg.deploy.flwr_cli import (
    CONNECTION,
    flower_command,
    offline_env,
    run_status,
    save_run_log,
    submit_run,
    write_connection,
)
from ecavg.deploy.processes import (
    STARTUP_TIMEOUT_S,
    STOP_GRACE_S,
    LocalFederation,
    Tls,
    free_ports,
)
from ecavg.deploy.workdir import WorkDir, remove_stale_workdirs
from ecavg.errors import DeployError

__all__ = [
    "CONNECTION", "FAILURE_FILE", "STARTUP_TIMEOUT_S", "STOP_GRACE_S", "DeployError", "LocalFederation", "Tls",
    "WorkDir", "deploy_local", "deploy_simulation", "deploy_submit", "flower_command", "follow_run", "free_ports",
    "offline_env", "prepare_config", "remove_stale_workdirs", "run_status", "save_run_log", "submit_run",
    "write_app", "write_connection",
]
